#include "service/store/memory_tier.h"

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/store/store_test_util.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::store {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::IsEmpty;

constexpr int64_t kSpanBytes = 4096;  // TinyModel, 16 tokens

using testing::FakeClock;

class MemoryTierTest : public ::testing::Test {
 protected:
  std::unique_ptr<MemoryTier> MakeTier(int spans, int shards = 1, double protected_fraction = 0.8) {
    MemoryTierOptions o;
    o.capacity_bytes = spans * kSpanBytes;
    o.shards = shards;
    o.protected_fraction = protected_fraction;
    o.clock = clock_.AsFunction();
    auto tier = MemoryTier::Create(o);
    EXPECT_TRUE(tier.ok()) << tier.status();
    return std::move(tier).value();
  }
  StoredSpanPtr Span() { return testing::MakeLooseSpan(model_, rng_); }
  // Puts and completes every eviction (dropping the victims).
  std::vector<SpanKey> PutAndEvict(MemoryTier* tier, StoredSpanPtr span) {
    std::vector<SpanKey> victims;
    EXPECT_TRUE(tier->Put(std::move(span), TierPutOptions{}, &victims).ok());
    for (const SpanKey& v : victims) EXPECT_TRUE(tier->FinishEviction(v));
    return victims;
  }

  ModelGeometry model_ = testing::TinyModel();
  uint64_t seed_ = testing::TestSeed(17);
  std::mt19937_64 rng_{seed_};
  FakeClock clock_;
};

TEST_F(MemoryTierTest, RejectsBadOptions) {
  MemoryTierOptions o;
  o.capacity_bytes = 0;
  EXPECT_THAT(MemoryTier::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o.capacity_bytes = 1 << 20;
  o.shards = 0;
  EXPECT_THAT(MemoryTier::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o.shards = 257;
  EXPECT_THAT(MemoryTier::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o.shards = 4;
  o.protected_fraction = 1.5;
  EXPECT_THAT(MemoryTier::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(MemoryTierTest, RoundTripSharesTheStoredSpan) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto tier = MakeTier(8, 4);
  StoredSpanPtr span = Span();
  std::vector<SpanKey> victims;
  KVR_ASSERT_OK(tier->Put(span, TierPutOptions{}, &victims));
  EXPECT_THAT(victims, IsEmpty());
  KVR_ASSERT_OK_AND_ASSIGN(StoredSpanPtr got, tier->Get(span->key));
  EXPECT_EQ(got.get(), span.get());  // no copy
  EXPECT_TRUE(tier->Contains(span->key));
  TierStats s = tier->Stats();
  EXPECT_EQ(s.bytes, kSpanBytes);
  EXPECT_EQ(s.spans, 1);
  EXPECT_EQ(s.hits, 1);
  KVR_EXPECT_OK(tier->Delete(span->key));
  EXPECT_THAT(tier->Get(span->key), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(tier->Delete(span->key), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(tier->Stats().bytes, 0);
  EXPECT_EQ(tier->Stats().misses, 1);
}

TEST_F(MemoryTierTest, EvictsProbationaryLruFirstAndKeepsVictimsReadableUntilFinished) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto tier = MakeTier(4);
  std::vector<StoredSpanPtr> spans;
  for (int i = 0; i < 4; ++i) {
    spans.push_back(Span());
    EXPECT_THAT(PutAndEvict(tier.get(), spans.back()), IsEmpty());
  }
  KVR_ASSERT_OK(tier->Get(spans[0]->key).status());  // spans[0] becomes protected
  StoredSpanPtr fifth = Span();
  std::vector<SpanKey> victims;
  KVR_ASSERT_OK(tier->Put(fifth, TierPutOptions{}, &victims));
  // The least recently used probationary span goes, not the one read.
  ASSERT_THAT(victims, ElementsAre(spans[1]->key));
  // Leaving, but still readable until the eviction is finished.
  KVR_ASSERT_OK_AND_ASSIGN(StoredSpanPtr leaving, tier->GetVictim(spans[1]->key));
  EXPECT_EQ(leaving.get(), spans[1].get());
  EXPECT_TRUE(tier->Contains(spans[1]->key));
  EXPECT_THAT(tier->GetVictim(spans[2]->key), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_TRUE(tier->FinishEviction(spans[1]->key));
  EXPECT_FALSE(tier->FinishEviction(spans[1]->key));
  EXPECT_FALSE(tier->Contains(spans[1]->key));
  EXPECT_EQ(tier->Stats().evictions, 1);
  EXPECT_EQ(tier->Stats().bytes, 4 * kSpanBytes);
  // A reader holding the pointer keeps the bytes after the eviction.
  EXPECT_EQ(Checksum64(leaving->payload), leaving->meta.payload_checksum);
}

TEST_F(MemoryTierTest, SegmentedLruResistsAScanOfOneTimeSpans) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto tier = MakeTier(8, 1, 0.5);
  std::vector<StoredSpanPtr> hot;
  for (int i = 0; i < 3; ++i) {
    hot.push_back(Span());
    PutAndEvict(tier.get(), hot.back());
    KVR_ASSERT_OK(tier->Get(hot.back()->key).status());
  }
  // A scan of 50 spans read once each: plain LRU would have flushed `hot`.
  for (int i = 0; i < 50; ++i) PutAndEvict(tier.get(), Span());
  for (const auto& h : hot) EXPECT_TRUE(tier->Contains(h->key));
  EXPECT_EQ(tier->Stats().evictions, 50 + 3 - 8);
  EXPECT_LE(tier->Stats().bytes, 8 * kSpanBytes);
}

TEST_F(MemoryTierTest, SpanLargerThanAShardIsRefused) {
  auto tier = MakeTier(4, 4);  // one span per shard
  ModelGeometry big = testing::TinyModel("big", 32);
  StoredSpanPtr span = testing::MakeLooseSpan(big, rng_);
  std::vector<SpanKey> victims;
  EXPECT_THAT(tier->Put(span, TierPutOptions{}, &victims),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(tier->Stats().spans, 0);
}

TEST_F(MemoryTierTest, PinnedSpansAreNeverEvictedAndBoundedByCapacity) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto tier = MakeTier(3);
  std::vector<StoredSpanPtr> spans;
  for (int i = 0; i < 3; ++i) {
    spans.push_back(Span());
    PutAndEvict(tier.get(), spans.back());
  }
  KVR_ASSERT_OK(tier->Pin(spans[0]->key, absl::InfiniteFuture()));
  KVR_ASSERT_OK(tier->Pin(spans[1]->key, absl::InfiniteFuture()));
  std::vector<SpanKey> victims = PutAndEvict(tier.get(), Span());
  EXPECT_THAT(victims, ElementsAre(spans[2]->key));
  EXPECT_TRUE(tier->Contains(spans[0]->key));
  EXPECT_TRUE(tier->Contains(spans[1]->key));
  EXPECT_EQ(tier->PinnedSpans(), 2);

  // Everything but one slot pinned: a new span fits only by evicting the
  // unpinned one; with everything pinned, a put is refused and changes nothing.
  StoredSpanPtr third_pin = Span();
  PutAndEvict(tier.get(), third_pin);
  KVR_ASSERT_OK(tier->Pin(third_pin->key, absl::InfiniteFuture()));
  const TierStats before = tier->Stats();
  StoredSpanPtr refused = Span();
  EXPECT_THAT(tier->Put(refused, TierPutOptions{}, &victims),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_FALSE(tier->Contains(refused->key));
  EXPECT_EQ(tier->Stats().bytes, before.bytes);
}

TEST_F(MemoryTierTest, PinningBeyondCapacityIsResourceExhausted) {
  auto tier = MakeTier(2);
  StoredSpanPtr a = Span(), b = Span(), c = Span();
  PutAndEvict(tier.get(), a);
  PutAndEvict(tier.get(), b);
  std::vector<SpanKey> victims;
  KVR_ASSERT_OK(tier->Put(c, TierPutOptions{}, &victims));
  ASSERT_THAT(victims, ElementsAre(a->key));  // leaving: 3 spans held for now
  KVR_ASSERT_OK(tier->Pin(b->key, absl::InfiniteFuture()));
  KVR_ASSERT_OK(tier->Pin(c->key, absl::InfiniteFuture()));
  // Rescuing `a` by a pin would pin 3 spans' bytes in a 2-span shard.
  EXPECT_THAT(tier->Pin(a->key, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(tier->PinCount(a->key), 0);
  EXPECT_TRUE(tier->FinishEviction(a->key));
  EXPECT_EQ(tier->PinnedSpans(), 2);
}

TEST_F(MemoryTierTest, PinsNestAndUnpinErrors) {
  auto tier = MakeTier(4);
  StoredSpanPtr span = Span();
  PutAndEvict(tier.get(), span);
  EXPECT_THAT(tier->Unpin(span->key), StatusIs(absl::StatusCode::kFailedPrecondition));
  KVR_ASSERT_OK(tier->Pin(span->key, absl::InfiniteFuture()));
  KVR_ASSERT_OK(tier->Pin(span->key, absl::InfiniteFuture()));
  EXPECT_EQ(tier->PinCount(span->key), 2);
  KVR_ASSERT_OK(tier->Unpin(span->key));
  EXPECT_EQ(tier->PinnedSpans(), 1);
  KVR_ASSERT_OK(tier->Unpin(span->key));
  EXPECT_EQ(tier->PinnedSpans(), 0);
  EXPECT_THAT(tier->Unpin(span->key), StatusIs(absl::StatusCode::kFailedPrecondition));
  StoredSpanPtr absent = Span();
  EXPECT_THAT(tier->Unpin(absent->key), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(tier->Pin(absent->key, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(tier->Pin(span->key, clock_.Now()), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(MemoryTierTest, ExpiredPinsAreReleasedLazily) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto tier = MakeTier(2);
  StoredSpanPtr a = Span(), b = Span();
  PutAndEvict(tier.get(), a);
  PutAndEvict(tier.get(), b);
  KVR_ASSERT_OK(tier->Pin(a->key, clock_.Now() + absl::Seconds(10)));
  KVR_ASSERT_OK(tier->Pin(b->key, clock_.Now() + absl::Seconds(30)));
  // Both pinned: nothing can be evicted.
  std::vector<SpanKey> victims;
  EXPECT_THAT(tier->Put(Span(), TierPutOptions{}, &victims),
              StatusIs(absl::StatusCode::kResourceExhausted));
  clock_.Advance(absl::Seconds(11));
  EXPECT_EQ(tier->PinCount(a->key), 0);
  EXPECT_EQ(tier->PinCount(b->key), 1);
  // a's pin expired: it is the victim now.
  EXPECT_THAT(PutAndEvict(tier.get(), Span()), ElementsAre(a->key));
  clock_.Advance(absl::Seconds(20));
  EXPECT_EQ(tier->PinnedSpans(), 0);
}

TEST_F(MemoryTierTest, UnpinReleasesTheLatestDeadlineFirst) {
  auto tier = MakeTier(2);
  StoredSpanPtr a = Span();
  PutAndEvict(tier.get(), a);
  KVR_ASSERT_OK(tier->Pin(a->key, clock_.Now() + absl::Seconds(5)));
  KVR_ASSERT_OK(tier->Pin(a->key, absl::InfiniteFuture()));
  KVR_ASSERT_OK(tier->Unpin(a->key));  // releases the unbounded pin
  clock_.Advance(absl::Seconds(6));
  EXPECT_EQ(tier->PinCount(a->key), 0);  // the bounded one expired by itself
}

TEST_F(MemoryTierTest, PinRescuesALeavingSpan) {
  auto tier = MakeTier(1);
  StoredSpanPtr a = Span();
  PutAndEvict(tier.get(), a);
  std::vector<SpanKey> victims;
  KVR_ASSERT_OK(tier->Put(Span(), TierPutOptions{}, &victims));
  ASSERT_THAT(victims, ElementsAre(a->key));
  KVR_ASSERT_OK(tier->Pin(a->key, absl::InfiniteFuture()));
  EXPECT_FALSE(tier->FinishEviction(a->key));
  EXPECT_TRUE(tier->Contains(a->key));
}

TEST_F(MemoryTierTest, ConcurrentWritersAndReadersKeepTheAccounting) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto tier = MakeTier(16, 4);
  constexpr int kThreads = 4;
  constexpr int kOps = 400;
  std::vector<std::vector<StoredSpanPtr>> per_thread(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < 40; ++i) per_thread[t].push_back(Span());
  }
  std::atomic<int64_t> bad_reads{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed_ + t);
      for (int i = 0; i < kOps; ++i) {
        const StoredSpanPtr& s = per_thread[t][rng() % per_thread[t].size()];
        if (rng() % 2 == 0) {
          std::vector<SpanKey> victims;
          if (tier->Put(s, TierPutOptions{}, &victims).ok()) {
            for (const SpanKey& v : victims) tier->FinishEviction(v);
          }
        } else {
          auto got = tier->Get(s->key);
          if (got.ok() && (*got)->payload != s->payload) bad_reads.fetch_add(1);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad_reads.load(), 0);
  int64_t bytes = 0, spans = 0;
  tier->ForEachSpan([&](const SpanKey&, const SpanMeta& m) {
    bytes += m.payload_bytes;
    ++spans;
  });
  EXPECT_EQ(tier->Stats().bytes, bytes);
  EXPECT_EQ(tier->Stats().spans, spans);
  EXPECT_LE(bytes, 16 * kSpanBytes);
}

}  // namespace
}  // namespace kvrecall::store

namespace kvrecall::store {
namespace {

using ::testing::HasSubstr;

// Tenant quotas: a tenant at its share evicts its own spans, never another
// tenant's; pins are bounded per tenant.
TEST(MemoryTierQuotaTest, ATenantAtItsQuotaEvictsOnlyItsOwnSpans) {
  const ModelGeometry model = testing::TinyModel();
  std::mt19937_64 rng(testing::TestSeed(29));
  MemoryTierOptions o;
  o.capacity_bytes = 16 * kSpanBytes;
  o.shards = 1;
  o.tenant_capacity_bytes = 4 * kSpanBytes;
  o.tenant_pinned_bytes = 2 * kSpanBytes;
  KVR_ASSERT_OK_AND_ASSIGN(auto tier, MemoryTier::Create(o));
  std::vector<StoredSpanPtr> b;
  for (int i = 0; i < 4; ++i) {
    b.push_back(testing::MakeLooseSpan(model, rng, "b"));
    std::vector<SpanKey> victims;
    KVR_ASSERT_OK(tier->Put(b.back(), TierPutOptions{}, &victims));
    EXPECT_THAT(victims, IsEmpty());
  }
  // Tenant a writes 12 spans into a tier with room for 16: past its 4 it
  // evicts its own, oldest first; b keeps all of its spans.
  std::vector<StoredSpanPtr> a;
  for (int i = 0; i < 12; ++i) {
    a.push_back(testing::MakeLooseSpan(model, rng, "a"));
    std::vector<SpanKey> victims;
    KVR_ASSERT_OK(tier->Put(a.back(), TierPutOptions{}, &victims));
    for (const SpanKey& v : victims) {
      EXPECT_EQ(v.tenant, "a");
      EXPECT_TRUE(tier->FinishEviction(v));
    }
    if (i >= 4) {
      ASSERT_EQ(victims.size(), 1u);
      EXPECT_EQ(victims[0], a[i - 4]->key);
    }
  }
  for (const auto& s : b) EXPECT_TRUE(tier->Contains(s->key));
  for (int i = 8; i < 12; ++i) EXPECT_TRUE(tier->Contains(a[i]->key));

  // Pins: 2 spans' worth per tenant.
  KVR_ASSERT_OK(tier->Pin(a[8]->key, absl::InfiniteFuture()));
  KVR_ASSERT_OK(tier->Pin(a[9]->key, absl::InfiniteFuture()));
  KVR_ASSERT_OK(tier->Pin(a[9]->key, absl::InfiniteFuture()));  // nested: no new bytes
  EXPECT_THAT(tier->Pin(a[10]->key, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("--tenant_pinned_bytes")));
  EXPECT_EQ(tier->TenantPinnedBytes("a"), 2 * kSpanBytes);
  KVR_ASSERT_OK(tier->Pin(b[0]->key, absl::InfiniteFuture()));  // b has its own allowance
  // An unpin frees the allowance for another span.
  KVR_ASSERT_OK(tier->Unpin(a[8]->key));
  KVR_ASSERT_OK(tier->Pin(a[10]->key, absl::InfiniteFuture()));
  EXPECT_THAT(tier->Pin(a[11]->key, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kResourceExhausted));
}

TEST(MemoryTierQuotaTest, APutPastTheQuotaWithOnlyPinnedOwnSpansIsRefused) {
  const ModelGeometry model = testing::TinyModel();
  std::mt19937_64 rng(testing::TestSeed(31));
  MemoryTierOptions o;
  o.capacity_bytes = 16 * kSpanBytes;
  o.shards = 1;
  o.tenant_capacity_bytes = 2 * kSpanBytes;
  KVR_ASSERT_OK_AND_ASSIGN(auto tier, MemoryTier::Create(o));
  for (int i = 0; i < 2; ++i) {
    auto s = testing::MakeLooseSpan(model, rng, "a");
    std::vector<SpanKey> victims;
    KVR_ASSERT_OK(tier->Put(s, TierPutOptions{}, &victims));
    KVR_ASSERT_OK(tier->Pin(s->key, absl::InfiniteFuture()));
  }
  std::vector<SpanKey> victims;
  EXPECT_THAT(tier->Put(testing::MakeLooseSpan(model, rng, "a"), TierPutOptions{}, &victims),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("--tenant_memory_bytes")));
  KVR_EXPECT_OK(tier->Put(testing::MakeLooseSpan(model, rng, "b"), TierPutOptions{}, &victims));
}

}  // namespace
}  // namespace kvrecall::store
