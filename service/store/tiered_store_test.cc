#include "service/store/tiered_store.h"

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/checksum.h"
#include "common/metrics.h"
#include "common/npy.h"
#include "common/span_hash.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/store/store_test_util.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

extern char** environ;

namespace kvrecall::store {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;
using ::testing::UnorderedElementsAre;

constexpr int64_t kSpanBytes = 4096;  // TinyModel, 16 tokens

class TieredStoreTest : public ::testing::Test {
 protected:
  TieredStoreOptions Options() {
    TieredStoreOptions o;
    o.data_dir = dir_;
    o.memory_capacity_bytes = 4 * kSpanBytes;
    o.memory_shards = 1;
    o.disk_capacity_bytes = 1 << 20;
    o.disk_segment_bytes = 64 << 10;
    o.rocksdb_capacity_bytes = 64 << 20;
    o.rocksdb_compression = "lz4";
    o.clock = clock_.AsFunction();
    o.disk_background_compaction = false;
    return o;
  }
  std::unique_ptr<TieredStore> Open(const TieredStoreOptions& o) {
    auto store = TieredStore::Open(o);
    EXPECT_TRUE(store.ok()) << store.status();
    if (!store.ok()) return nullptr;
    EXPECT_TRUE((*store)->RegisterModel(model_).ok());
    return std::move(store).value();
  }
  std::unique_ptr<TieredStore> Open() { return Open(Options()); }

  std::vector<StoredSpan> Chain(int n, const std::string& tenant = "", bool durable = false) {
    return testing::MakeChain(model_, n, rng_, tenant, durable);
  }
  static void PutAll(TieredStore* store, const std::vector<StoredSpan>& spans) {
    for (const StoredSpan& s : spans) {
      auto put = store->Put(s, PutOptions{});
      ASSERT_TRUE(put.ok()) << put.status();
    }
  }
  // Expects a hit with exactly the stored bytes, and returns the tier.
  static TierId ExpectHit(TieredStore* store, const StoredSpan& s) {
    GetResult r = store->Get(s.key, s.meta.model_id);
    EXPECT_EQ(r.miss, MissReason::kNone) << MissReasonName(r.miss);
    if (r.span == nullptr) return r.tier;
    EXPECT_EQ(r.span->payload, s.payload);
    EXPECT_EQ(r.span->meta.token_ids, s.meta.token_ids);
    EXPECT_EQ(r.span->meta.parent, s.meta.parent);
    return r.tier;
  }
  static MissReason Miss(TieredStore* store, const SpanKey& key, absl::string_view model = "") {
    GetResult r = store->Get(key, model);
    EXPECT_EQ(r.span, nullptr);
    return r.miss;
  }
  static const TierStats& TierOf(const StoreStats& s, TierId id) {
    return s.tiers[static_cast<int>(id)];
  }

  std::string dir_ = kvrecall::testing::MakeTempDir("tiered-store");
  ModelGeometry model_ = testing::TinyModel();
  uint64_t seed_ = testing::TestSeed(41);
  std::mt19937_64 rng_{seed_};
  testing::FakeClock clock_;
};

TEST_F(TieredStoreTest, OpenValidatesOptions) {
  auto bad = [&](auto mutate) {
    TieredStoreOptions o = Options();
    mutate(o);
    return TieredStore::Open(o).status();
  };
  EXPECT_THAT(bad([](TieredStoreOptions& o) { o.data_dir = ""; }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bad([](TieredStoreOptions& o) { o.memory_shards = 0; }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bad([](TieredStoreOptions& o) { o.memory_shards = 300; }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bad([](TieredStoreOptions& o) { o.disk_compaction_live_fraction = 1.5; }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bad([](TieredStoreOptions& o) { o.rocksdb_compression = "gzip"; }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bad([](TieredStoreOptions& o) { o.memory_capacity_bytes = -1; }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bad([](TieredStoreOptions& o) { o.disk_segment_bytes = 100; }),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(TieredStoreTest, SecondOpenOfTheSameDataDirIsRefused) {
  auto store = Open();
  EXPECT_THAT(TieredStore::Open(Options()), StatusIs(absl::StatusCode::kFailedPrecondition));
  store.reset();
  EXPECT_NE(Open(), nullptr);
}

TEST_F(TieredStoreTest, RegisterModelIsIdempotentValidatedAndPersistent) {
  {
    auto store = Open();
    KVR_EXPECT_OK(store->RegisterModel(model_));  // identical: OK
    ModelGeometry different = model_;
    different.head_dim = 32;
    EXPECT_THAT(store->RegisterModel(different), StatusIs(absl::StatusCode::kAlreadyExists));
    ModelGeometry invalid = testing::TinyModel("bad");
    invalid.num_kv_heads = 0;
    EXPECT_THAT(store->RegisterModel(invalid), StatusIs(absl::StatusCode::kInvalidArgument));
    KVR_EXPECT_OK(store->RegisterModel(testing::TinyModel("second", 32)));
    EXPECT_THAT(store->GetModel("nope"), StatusIs(absl::StatusCode::kNotFound));
  }
  auto reopened = TieredStore::Open(Options());
  KVR_ASSERT_OK(reopened.status());
  KVR_ASSERT_OK_AND_ASSIGN(ModelGeometry second, (*reopened)->GetModel("second"));
  EXPECT_EQ(second.block_tokens, 32);
  std::vector<std::string> ids;
  for (const auto& m : (*reopened)->ListModels()) ids.push_back(m.model_id);
  EXPECT_THAT(ids, ElementsAre("second", "tiny"));
  EXPECT_EQ((*reopened)->Stats().models, 2);
}

TEST_F(TieredStoreTest, PutThenGetHitsMemory) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto store = Open();
  std::vector<StoredSpan> chain = Chain(3);
  for (const StoredSpan& s : chain) {
    KVR_ASSERT_OK_AND_ASSIGN(PutOutcome out, store->Put(s, PutOptions{}));
    EXPECT_FALSE(out.already_present);
  }
  for (const StoredSpan& s : chain) EXPECT_EQ(ExpectHit(store.get(), s), TierId::kMemory);
  StoreStats stats = store->Stats();
  ASSERT_EQ(stats.tiers.size(), 3u);
  EXPECT_EQ(TierOf(stats, TierId::kMemory).spans, 3);
  EXPECT_EQ(TierOf(stats, TierId::kMemory).bytes, 3 * kSpanBytes);
  EXPECT_EQ(TierOf(stats, TierId::kMemory).hits, 3);
  EXPECT_EQ(TierOf(stats, TierId::kDisk).spans, 0);
  // A partial last span (fewer tokens) is a valid span too.
  StoredSpan tail = testing::MakeSpan(model_, chain.back().key.hash, rng_, "", 5);
  KVR_ASSERT_OK(store->Put(tail, PutOptions{}).status());
  ExpectHit(store.get(), tail);
}

TEST_F(TieredStoreTest, EveryValidationErrorChangesNothing) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto store = Open();
  const StoredSpan good = Chain(1)[0];
  auto expect = [&](absl::StatusCode code, auto mutate, const PutOptions& options = {}) {
    StoredSpan s = good;
    mutate(s);
    EXPECT_THAT(store->Put(s, options), StatusIs(code));
    EXPECT_EQ(Miss(store.get(), s.key), MissReason::kNeverStored);
  };
  auto rechecksum = [](StoredSpan& s) { s.meta.payload_checksum = Checksum64(s.payload); };
  expect(absl::StatusCode::kNotFound, [](StoredSpan& s) { s.meta.model_id = "unknown"; });
  expect(absl::StatusCode::kNotFound, [](StoredSpan& s) { s.meta.model_id = ""; });
  expect(absl::StatusCode::kInvalidArgument, [](StoredSpan& s) {
    s.meta.num_tokens = 0;
    s.meta.token_ids.clear();
  });
  expect(absl::StatusCode::kInvalidArgument, [](StoredSpan& s) {
    s.meta.num_tokens = 17;  // block_tokens is 16
    s.meta.token_ids.push_back(1);
  });
  expect(absl::StatusCode::kInvalidArgument, [&](StoredSpan& s) {
    s.payload.pop_back();
    rechecksum(s);
  });
  expect(absl::StatusCode::kInvalidArgument, [](StoredSpan& s) { s.meta.payload_bytes = 5; });
  expect(absl::StatusCode::kInvalidArgument, [](StoredSpan& s) { s.meta.token_ids.pop_back(); });
  expect(absl::StatusCode::kInvalidArgument, [](StoredSpan& s) { s.key.hash.low ^= 1; });
  expect(absl::StatusCode::kInvalidArgument,
         [](StoredSpan& s) { s.key.tenant = std::string(300, 't'); });
  expect(absl::StatusCode::kDataLoss, [](StoredSpan& s) { s.payload[7] ^= 1; });
  // Parent neither stored nor the root: re-hash so that only the parent is wrong.
  expect(absl::StatusCode::kFailedPrecondition, [](StoredSpan& s) {
    s.meta.parent = Hash128{7, 7};
    s.key.hash = SpanHash(s.meta.parent, s.meta.token_ids);
  });
  // The root of another salt is not this chain's root.
  PutOptions salted;
  salted.salt = "user-42";
  expect(
      absl::StatusCode::kFailedPrecondition, [](StoredSpan&) {}, salted);

  StoreStats stats = store->Stats();
  for (const TierStats& t : stats.tiers) EXPECT_EQ(t.spans, 0);

  // Without token ids a span is accepted on its hash.
  StoredSpan no_ids = good;
  no_ids.meta.token_ids.clear();
  KVR_ASSERT_OK(store->Put(no_ids, PutOptions{}).status());
  // The same key with another payload.
  StoredSpan other = good;
  other.payload[0] ^= 1;
  rechecksum(other);
  EXPECT_THAT(store->Put(other, PutOptions{}), StatusIs(absl::StatusCode::kAlreadyExists));
  GetResult r = store->Get(good.key, "");
  ASSERT_NE(r.span, nullptr);
  EXPECT_EQ(r.span->payload, good.payload);
}

TEST_F(TieredStoreTest, DuplicatePutIsIdempotentAndCanBecomeDurable) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  StoredSpan span = Chain(1)[0];
  {
    auto store = Open();
    KVR_ASSERT_OK(store->Put(span, PutOptions{}).status());
    KVR_ASSERT_OK_AND_ASSIGN(PutOutcome again, store->Put(span, PutOptions{}));
    EXPECT_TRUE(again.already_present);
    EXPECT_EQ(TierOf(store->Stats(), TierId::kMemory).spans, 1);
    EXPECT_EQ(TierOf(store->Stats(), TierId::kRocksDb).spans, 0);
    StoredSpan durable = span;
    durable.meta.durable = true;
    KVR_ASSERT_OK_AND_ASSIGN(PutOutcome upgraded, store->Put(durable, PutOptions{}));
    EXPECT_TRUE(upgraded.already_present);
    EXPECT_EQ(upgraded.durable_tier, TierId::kRocksDb);
    EXPECT_EQ(TierOf(store->Stats(), TierId::kRocksDb).spans, 1);
  }
  auto store = Open();
  EXPECT_EQ(ExpectHit(store.get(), span), TierId::kRocksDb);
}

TEST_F(TieredStoreTest, EvictionDemotesToDiskAndAHitPromotesBack) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto store = Open();
  std::vector<StoredSpan> chain = Chain(10);
  PutAll(store.get(), chain);
  StoreStats stats = store->Stats();
  EXPECT_EQ(TierOf(stats, TierId::kMemory).spans, 4);
  EXPECT_EQ(TierOf(stats, TierId::kMemory).evictions, 6);
  EXPECT_EQ(TierOf(stats, TierId::kDisk).demotions, 6);
  EXPECT_EQ(TierOf(stats, TierId::kDisk).spans, 6);
  EXPECT_EQ(ExpectHit(store.get(), chain[0]), TierId::kDisk);
  EXPECT_EQ(ExpectHit(store.get(), chain[0]), TierId::kMemory);  // promoted
  stats = store->Stats();
  EXPECT_EQ(TierOf(stats, TierId::kMemory).promotions, 1);
  EXPECT_EQ(TierOf(stats, TierId::kDisk).hits, 1);
  // Inclusive tiers: the promoted span kept its disk copy, so evicting it
  // again writes nothing.
  EXPECT_EQ(TierOf(stats, TierId::kDisk).spans, 6 + 1 - 1 + 1);
  for (const StoredSpan& s : chain) ExpectHit(store.get(), s);
  EXPECT_LE(TierOf(store->Stats(), TierId::kMemory).bytes, 4 * kSpanBytes);
}

TEST_F(TieredStoreTest, DiskEvictionDemotesToRocksDb) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  TieredStoreOptions o = Options();
  o.disk_capacity_bytes = 5 * 4400;  // about 5 records
  auto store = Open(o);
  std::vector<StoredSpan> chain = Chain(20);
  PutAll(store.get(), chain);
  StoreStats stats = store->Stats();
  EXPECT_LE(TierOf(stats, TierId::kDisk).bytes, o.disk_capacity_bytes);
  EXPECT_GT(TierOf(stats, TierId::kDisk).evictions, 0);
  EXPECT_GT(TierOf(stats, TierId::kRocksDb).demotions, 0);
  EXPECT_EQ(ExpectHit(store.get(), chain[0]), TierId::kRocksDb);
  for (const StoredSpan& s : chain) ExpectHit(store.get(), s);
  EXPECT_EQ(store->Stats().misses_by_reason.size(), 0u);
}

TEST_F(TieredStoreTest, EvictionFromTheLastTierIsReportedAsEvicted) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  TieredStoreOptions o = Options();
  o.disk_capacity_bytes = 5 * 4400;
  o.rocksdb_capacity_bytes = 0;  // catalog only: disk is the last tier
  auto store = Open(o);
  std::vector<StoredSpan> chain = Chain(20);
  PutAll(store.get(), chain);
  EXPECT_EQ(Miss(store.get(), chain[0].key), MissReason::kEvicted);
  ExpectHit(store.get(), chain.back());
  std::vector<Hash128> hashes;
  for (const StoredSpan& s : chain) hashes.push_back(s.key.hash);
  LookupResult lookup = store->Lookup("", "tiny", hashes);
  EXPECT_EQ(lookup.prefix_spans, 0);
  EXPECT_EQ(lookup.missing.front(), MissReason::kEvicted);
  EXPECT_EQ(lookup.missing.back(), MissReason::kParentMissing);  // stored, but after a gap
  EXPECT_GE(store->Stats().misses_by_reason.at(MissReason::kEvicted), 2);
}

TEST_F(TieredStoreTest, DurableWritesAndDemotedSpansSurviveReopen) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  std::vector<StoredSpan> chain = Chain(10);
  StoredSpan durable = testing::MakeSpan(model_, chain.back().key.hash, rng_, "", 0, true);
  {
    auto store = Open();
    PutAll(store.get(), chain);  // 6 demoted to disk, 4 only in memory
    // Written through to rocksdb and put in memory, which demotes chain[6].
    KVR_ASSERT_OK_AND_ASSIGN(PutOutcome out, store->Put(durable, PutOptions{}));
    EXPECT_EQ(out.durable_tier, TierId::kRocksDb);
  }
  auto store = Open();
  EXPECT_EQ(ExpectHit(store.get(), durable), TierId::kRocksDb);
  int from_disk = 0, evicted = 0;
  for (const StoredSpan& s : chain) {
    GetResult r = store->Get(s.key, "tiny");
    if (r.span != nullptr) {
      EXPECT_EQ(r.span->payload, s.payload);
      ++from_disk;
    } else {
      // Memory-only spans are gone after a restart, and say so.
      EXPECT_EQ(r.miss, MissReason::kEvicted);
      ++evicted;
    }
  }
  EXPECT_EQ(from_disk, 7);
  EXPECT_EQ(evicted, 3);
}

TEST_F(TieredStoreTest, DurableSpansGoToDiskWhenRocksDbHoldsOnlyTheCatalog) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  TieredStoreOptions o = Options();
  o.rocksdb_capacity_bytes = 0;
  StoredSpan span = Chain(1, "", /*durable=*/true)[0];
  {
    auto store = Open(o);
    KVR_ASSERT_OK_AND_ASSIGN(PutOutcome out, store->Put(span, PutOptions{}));
    EXPECT_EQ(out.durable_tier, TierId::kDisk);
  }
  auto store = Open(o);
  EXPECT_EQ(ExpectHit(store.get(), span), TierId::kDisk);
  KVR_ASSERT_OK_AND_ASSIGN(PutOutcome again, store->Put(span, PutOptions{}));
  EXPECT_TRUE(again.already_present);

  // Without any persistent tier a durable span cannot be acknowledged.
  TieredStoreOptions memory_only = Options();
  memory_only.data_dir = kvrecall::testing::MakeTempDir("memory-only");
  memory_only.disk_capacity_bytes = 0;
  memory_only.rocksdb_capacity_bytes = 0;
  auto volatile_store = Open(memory_only);
  StoredSpan d = Chain(1, "", true)[0];
  EXPECT_THAT(volatile_store->Put(d, PutOptions{}), StatusIs(absl::StatusCode::kResourceExhausted));
  d.meta.durable = false;
  KVR_EXPECT_OK(volatile_store->Put(d, PutOptions{}).status());
}

TEST_F(TieredStoreTest, DeleteRemovesFromEveryTierAndStaysDeleted) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  std::vector<StoredSpan> chain = Chain(8);
  chain[1].meta.durable = true;
  {
    auto store = Open();
    PutAll(store.get(), chain);  // chain[0..3] demoted to disk, chain[1] also in rocksdb
    for (int i : {0, 1, 7}) KVR_ASSERT_OK(store->Delete(chain[i].key));
    for (int i : {0, 1, 7}) EXPECT_EQ(Miss(store.get(), chain[i].key), MissReason::kDeleted);
    EXPECT_THAT(store->Delete(chain[0].key),
                StatusIs(absl::StatusCode::kNotFound, HasSubstr("deleted")));
    EXPECT_THAT(store->Delete(Chain(1)[0].key),
                StatusIs(absl::StatusCode::kNotFound, HasSubstr("never_stored")));
  }
  auto store = Open();
  for (int i : {0, 1, 7}) EXPECT_EQ(Miss(store.get(), chain[i].key), MissReason::kDeleted);
  for (int i : {2, 3}) ExpectHit(store.get(), chain[i]);
  // Storing it again brings it back.
  PutAll(store.get(), {chain[0]});
  ExpectHit(store.get(), chain[0]);
}

// A cluster node hands spans to their new owners with Drop (no deletion is
// recorded) and stores replicas whose parent lives elsewhere (parent_checked);
// ListSpans lists what it holds.
TEST_F(TieredStoreTest, DropListSpansAndReplicasWithoutTheirParent) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  std::vector<StoredSpan> chain = Chain(6, "tenant-a");
  chain[3].meta.durable = true;
  chain[4].meta.durable = true;
  auto store = Open();
  // chain[3] without chain[2]: refused unless the caller checked the parent.
  EXPECT_THAT(store->Put(chain[3], PutOptions{}).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  PutOptions checked;
  checked.parent_checked = true;
  for (int i : {3, 4, 5}) KVR_ASSERT_OK(store->Put(chain[i], checked).status());
  std::vector<std::pair<std::string, std::string>> listed;
  for (const SpanListing& l : store->ListSpans()) {
    listed.emplace_back(l.key.tenant, l.key.hash.ToHex());
    EXPECT_EQ(l.model_id, model_.model_id);
    EXPECT_EQ(l.payload_bytes, kSpanBytes);
    EXPECT_EQ(l.durable, l.key.hash != chain[5].key.hash);
  }
  EXPECT_THAT(listed, UnorderedElementsAre(Pair("tenant-a", chain[3].key.hash.ToHex()),
                                           Pair("tenant-a", chain[4].key.hash.ToHex()),
                                           Pair("tenant-a", chain[5].key.hash.ToHex())));
  KVR_ASSERT_OK(store->Drop(chain[4].key));
  KVR_ASSERT_OK(store->Delete(chain[5].key));
  EXPECT_EQ(Miss(store.get(), chain[4].key), MissReason::kNeverStored);  // moved, not deleted
  EXPECT_EQ(Miss(store.get(), chain[5].key), MissReason::kDeleted);
  EXPECT_THAT(store->Drop(chain[4].key), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(store->ListSpans().size(), 1u);
  store.reset();
  store = Open();  // the dropped durable span stays gone
  EXPECT_EQ(Miss(store.get(), chain[4].key), MissReason::kNeverStored);
  ExpectHit(store.get(), chain[3]);
}

// Tenants a and b share a trust group: a miss of one on the other's span says
// so. Tenant c shares with nobody.
bool SharesWithAB(absl::string_view x, absl::string_view y) {
  auto ab = [](absl::string_view t) { return t == "tenant-a" || t == "tenant-b"; };
  return x == y || (ab(x) && ab(y));
}

TEST_F(TieredStoreTest, EveryMissReason) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  TieredStoreOptions o = Options();
  o.shares_namespace = SharesWithAB;
  auto store = Open(o);
  std::vector<StoredSpan> a = Chain(6, "tenant-a");
  PutAll(store.get(), a);  // a[0], a[1] are on disk only
  EXPECT_EQ(Miss(store.get(), Chain(1, "tenant-a")[0].key), MissReason::kNeverStored);
  EXPECT_EQ(Miss(store.get(), SpanKey{"tenant-b", a[5].key.hash}), MissReason::kOtherNamespace);
  EXPECT_EQ(Miss(store.get(), a[5].key, "another-model"), MissReason::kModelMismatch);
  KVR_ASSERT_OK(store->Delete(a[4].key));
  EXPECT_EQ(Miss(store.get(), a[4].key), MissReason::kDeleted);

  // Damage a[0]'s record on disk: the read fails its checksum, it is never
  // served, and the reason sticks.
  bool corrupted = false;
  for (const auto& e : std::filesystem::directory_iterator(dir_ + "/segments")) {
    auto data = ReadFileToString(e.path().string());
    ASSERT_TRUE(data.ok());
    const size_t at = data->find(a[0].payload.substr(0, 64));
    if (at == std::string::npos) continue;
    std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(at + 100));
    const char flipped = static_cast<char>((*data)[at + 100] ^ 1);
    f.write(&flipped, 1);
    corrupted = true;
  }
  ASSERT_TRUE(corrupted);
  EXPECT_EQ(Miss(store.get(), a[0].key), MissReason::kChecksumFailure);
  EXPECT_EQ(Miss(store.get(), a[0].key), MissReason::kChecksumFailure);
  EXPECT_EQ(TierOf(store->Stats(), TierId::kDisk).checksum_failures, 1);

  std::vector<Hash128> hashes;
  for (const StoredSpan& s : a) hashes.push_back(s.key.hash);
  LookupResult lookup = store->Lookup("tenant-a", "tiny", hashes);
  EXPECT_EQ(lookup.prefix_spans, 0);
  EXPECT_THAT(lookup.missing, ElementsAre(MissReason::kChecksumFailure, MissReason::kParentMissing,
                                          MissReason::kParentMissing, MissReason::kParentMissing,
                                          MissReason::kDeleted, MissReason::kParentMissing));

  StoreStats stats = store->Stats();
  EXPECT_EQ(stats.misses_by_reason[MissReason::kNeverStored], 1);
  EXPECT_EQ(stats.misses_by_reason[MissReason::kOtherNamespace], 1);
  EXPECT_EQ(stats.misses_by_reason[MissReason::kModelMismatch], 1);
  EXPECT_EQ(stats.misses_by_reason[MissReason::kDeleted], 1);
  EXPECT_EQ(stats.misses_by_reason[MissReason::kChecksumFailure], 3);  // 2 gets + 1 lookup
}

TEST_F(TieredStoreTest, LookupFindsTheLongestStoredPrefix) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto store = Open();
  std::vector<StoredSpan> chain = Chain(5);
  StoredSpan tail = testing::MakeSpan(model_, chain.back().key.hash, rng_, "", 3);
  chain.push_back(tail);
  PutAll(store.get(), chain);
  std::vector<Hash128> hashes;
  for (const StoredSpan& s : chain) hashes.push_back(s.key.hash);
  LookupResult all = store->Lookup("", "tiny", hashes);
  EXPECT_EQ(all.prefix_spans, 6);
  EXPECT_EQ(all.prefix_tokens, 5 * 16 + 3);
  EXPECT_TRUE(all.missing.empty());
  KVR_ASSERT_OK(store->Delete(chain[2].key));
  LookupResult cut = store->Lookup("", "tiny", hashes);
  EXPECT_EQ(cut.prefix_spans, 2);
  EXPECT_EQ(cut.prefix_tokens, 32);
  EXPECT_THAT(cut.missing, ElementsAre(MissReason::kDeleted, MissReason::kParentMissing,
                                       MissReason::kParentMissing, MissReason::kParentMissing));
  LookupResult other_model = store->Lookup("", "other", hashes);
  EXPECT_EQ(other_model.prefix_spans, 0);
  EXPECT_EQ(other_model.missing.front(), MissReason::kModelMismatch);
  EXPECT_EQ(store->Lookup("", "tiny", {}).prefix_spans, 0);
}

TEST_F(TieredStoreTest, TenantsAreIsolated) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  TieredStoreOptions o = Options();
  o.shares_namespace = SharesWithAB;
  auto store = Open(o);
  // The same prefix under two tenants: same hash, different bytes.
  StoredSpan a = Chain(1, "tenant-a")[0];
  StoredSpan b = a;
  b.key.tenant = "tenant-b";
  b.payload[0] ^= 0x7f;
  b.meta.payload_checksum = Checksum64(b.payload);
  PutAll(store.get(), {a, b});
  ExpectHit(store.get(), a);
  ExpectHit(store.get(), b);
  KVR_ASSERT_OK(store->Delete(a.key));
  EXPECT_EQ(Miss(store.get(), a.key), MissReason::kDeleted);
  ExpectHit(store.get(), b);
  // b's span exists: a (same group) may learn it, c (no group) may not.
  EXPECT_EQ(Miss(store.get(), SpanKey{"tenant-a", a.key.hash}), MissReason::kDeleted);
  EXPECT_EQ(Miss(store.get(), SpanKey{"tenant-c", a.key.hash}), MissReason::kNeverStored);
  StoredSpan only_b = Chain(1, "tenant-b")[0];
  PutAll(store.get(), {only_b});
  EXPECT_EQ(Miss(store.get(), SpanKey{"tenant-a", only_b.key.hash}), MissReason::kOtherNamespace);
  EXPECT_EQ(Miss(store.get(), SpanKey{"tenant-c", only_b.key.hash}), MissReason::kNeverStored);
  // A tenant cannot chain onto another tenant's span.
  StoredSpan child = testing::MakeSpan(model_, b.key.hash, rng_, "tenant-c");
  EXPECT_THAT(store->Put(child, PutOptions{}), StatusIs(absl::StatusCode::kFailedPrecondition));
  LookupResult lookup = store->Lookup("tenant-c", "tiny", {b.key.hash});
  EXPECT_THAT(lookup.missing, ElementsAre(MissReason::kNeverStored));
  EXPECT_THAT(store->Lookup("tenant-a", "tiny", {only_b.key.hash}).missing,
              ElementsAre(MissReason::kOtherNamespace));
}

// A tenant's bytes in every tier together (disk and RocksDB included) are
// bounded by tenant_stored_bytes: past it a put is RESOURCE_EXHAUSTED naming
// the quota, other tenants are unaffected, a delete makes room, and the
// count survives a restart (recovered with the directory).
TEST_F(TieredStoreTest, TenantStoredBytesBoundEveryTierTogether) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  TieredStoreOptions o = Options();
  o.tenant_stored_bytes = 6 * kSpanBytes;  // more than memory (4 spans): disk counts too
  {
    auto store = Open(o);
    const std::vector<StoredSpan> a = Chain(7, "tenant-a", /*durable=*/true);
    PutAll(store.get(), std::vector<StoredSpan>(a.begin(), a.begin() + 6));
    EXPECT_THAT(store->Put(a[6], PutOptions{}),
                StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("--tenant_stored_bytes")));
    PutAll(store.get(), Chain(3, "tenant-b"));  // another tenant's quota is its own
    ExpectHit(store.get(), a[5]);                // the refused put changed nothing
    KVR_ASSERT_OK(store->Delete(a[5].key));
    KVR_ASSERT_OK(store->Put(a[5], PutOptions{}).status());  // its room again
    EXPECT_THAT(store->Put(a[6], PutOptions{}),
                StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("--tenant_stored_bytes")));
  }
  auto reopened = Open(o);
  EXPECT_THAT(reopened->Put(Chain(1, "tenant-a")[0], PutOptions{}),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("--tenant_stored_bytes")));
  KVR_EXPECT_OK(reopened->Put(Chain(1, "tenant-c")[0], PutOptions{}).status());
}

TEST_F(TieredStoreTest, WithoutATrustPredicateNoMissRevealsAnotherTenant) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto store = Open();
  StoredSpan a = Chain(1, "tenant-a")[0];
  PutAll(store.get(), {a});
  EXPECT_EQ(Miss(store.get(), SpanKey{"tenant-b", a.key.hash}), MissReason::kNeverStored);
  EXPECT_THAT(store->Lookup("tenant-b", "tiny", {a.key.hash}).missing,
              ElementsAre(MissReason::kNeverStored));
}

TEST_F(TieredStoreTest, PinsKeepSpansInMemoryUntilUnpinnedOrExpired) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto store = Open();
  std::vector<StoredSpan> chain = Chain(12);
  PutAll(store.get(), {chain[0]});
  KVR_ASSERT_OK(store->Pin(chain[0].key, absl::Seconds(60)));
  std::vector<StoredSpan> rest(chain.begin() + 1, chain.end());
  PutAll(store.get(), rest);
  EXPECT_EQ(ExpectHit(store.get(), chain[0]), TierId::kMemory);  // survived 11 puts
  // Pinning a span that was demoted brings it back to memory.
  KVR_ASSERT_OK(store->Pin(chain[1].key, absl::InfiniteDuration()));
  KVR_ASSERT_OK(store->Pin(chain[1].key, absl::InfiniteDuration()));
  EXPECT_EQ(ExpectHit(store.get(), chain[1]), TierId::kMemory);
  EXPECT_EQ(store->Stats().pinned_spans, 2);
  clock_.Advance(absl::Seconds(61));
  EXPECT_EQ(store->Stats().pinned_spans, 1);  // chain[0]'s ttl passed
  KVR_ASSERT_OK(store->Unpin(chain[1].key));
  EXPECT_EQ(store->Stats().pinned_spans, 1);  // pins nest
  KVR_ASSERT_OK(store->Unpin(chain[1].key));
  EXPECT_EQ(store->Stats().pinned_spans, 0);
  EXPECT_THAT(store->Unpin(chain[1].key), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(store->Unpin(Chain(1)[0].key), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(store->Pin(Chain(1)[0].key, absl::Seconds(1)), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(store->Pin(chain[2].key, absl::ZeroDuration()),
              StatusIs(absl::StatusCode::kInvalidArgument));

  // Fill memory with pins: one more pin cannot fit.
  for (int i = 4; i < 8; ++i) KVR_ASSERT_OK(store->Pin(chain[i].key, absl::InfiniteDuration()));
  EXPECT_THAT(store->Pin(chain[9].key, absl::InfiniteDuration()),
              StatusIs(absl::StatusCode::kResourceExhausted));
  // A pinned span can be deleted; the pin goes with it.
  KVR_ASSERT_OK(store->Delete(chain[4].key));
  EXPECT_EQ(store->Stats().pinned_spans, 3);
}

TEST_F(TieredStoreTest, PutIsResourceExhaustedWhenNoTierCanHoldIt) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  TieredStoreOptions o = Options();
  o.memory_capacity_bytes = 2 * kSpanBytes;
  o.disk_capacity_bytes = 0;
  o.rocksdb_capacity_bytes = 0;
  auto store = Open(o);
  std::vector<StoredSpan> chain = Chain(3);
  PutAll(store.get(), {chain[0], chain[1]});
  KVR_ASSERT_OK(store->Pin(chain[0].key, absl::InfiniteDuration()));
  KVR_ASSERT_OK(store->Pin(chain[1].key, absl::InfiniteDuration()));
  EXPECT_THAT(store->Put(chain[2], PutOptions{}), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(Miss(store.get(), chain[2].key), MissReason::kNeverStored);
  KVR_ASSERT_OK(store->Unpin(chain[0].key));
  KVR_ASSERT_OK(store->Put(chain[2], PutOptions{}).status());
  EXPECT_EQ(Miss(store.get(), chain[0].key), MissReason::kEvicted);  // no lower tier
}

TEST_F(TieredStoreTest, CatalogSpacesAreDurableAndValidated) {
  {
    auto store = Open();
    KVR_ASSERT_OK(store->CatalogPut("context", "c/1", "first"));
    KVR_ASSERT_OK(store->CatalogPut("context", "c/2", "second"));
    KVR_ASSERT_OK(store->CatalogPut("policy", "c/1", "other space"));
    EXPECT_THAT(store->CatalogPut("", "k", "v"), StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(store->CatalogPut(std::string("a\0b", 3), "k", "v"),
                StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(store->CatalogGet(std::string(65, 's'), "k"),
                StatusIs(absl::StatusCode::kInvalidArgument));
  }
  auto store = Open();
  KVR_ASSERT_OK_AND_ASSIGN(std::string v, store->CatalogGet("context", "c/1"));
  EXPECT_EQ(v, "first");
  KVR_ASSERT_OK(store->CatalogDelete("context", "c/1"));
  EXPECT_THAT(store->CatalogGet("context", "c/1"), StatusIs(absl::StatusCode::kNotFound));
  KVR_ASSERT_OK_AND_ASSIGN(auto scan, store->CatalogScan("context", "c/"));
  EXPECT_THAT(scan, ElementsAre(Pair("c/2", "second")));
  KVR_ASSERT_OK_AND_ASSIGN(auto policy, store->CatalogScan("policy", ""));
  EXPECT_THAT(policy, ElementsAre(Pair("c/1", "other space")));
}

TEST_F(TieredStoreTest, MetricsAreExported) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  MetricsRegistry registry;
  TieredStoreOptions o = Options();
  o.metrics = &registry;
  auto store = Open(o);
  PutAll(store.get(), Chain(6));
  Miss(store.get(), Chain(1)[0].key);
  KVR_ASSERT_OK(store->Sync());
  const std::string text = registry.PrometheusText();
  EXPECT_THAT(text, HasSubstr("kvrecall_store_tier_bytes{tier=\"memory\"} 16384"));
  EXPECT_THAT(text, HasSubstr("kvrecall_store_tier_spans{tier=\"disk\"} 2"));
  EXPECT_THAT(text, HasSubstr("kvrecall_store_tier_evictions_total{tier=\"memory\"} 2"));
  EXPECT_THAT(text, HasSubstr("kvrecall_store_misses_total{reason=\"never_stored\"} 1"));
  EXPECT_THAT(text, HasSubstr("kvrecall_store_put_latency"));
  EXPECT_THAT(text, HasSubstr("kvrecall_store_models 1"));
}

TEST_F(TieredStoreTest, ConcurrentClientsNeverSeeWrongBytesOrFalseMisses) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  TieredStoreOptions o = Options();
  o.memory_capacity_bytes = 8 * kSpanBytes;
  o.memory_shards = 2;
  o.disk_capacity_bytes = 10 * 4400;
  o.disk_background_compaction = true;
  auto store = Open(o);
  constexpr int kThreads = 4;
  constexpr int kSpans = 40;
  std::vector<std::vector<StoredSpan>> chains;
  for (int t = 0; t < kThreads; ++t) chains.push_back(Chain(kSpans, absl::StrCat("t", t)));
  std::vector<std::atomic<int>> stored(kThreads);
  for (auto& s : stored) s.store(0);
  std::atomic<int> wrong{0}, false_misses{0}, put_errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed_ * 100 + t);
      for (int i = 0; i < kSpans; ++i) {
        if (!store->Put(chains[t][i], PutOptions{}).ok()) put_errors.fetch_add(1);
        stored[t].store(i + 1);
        for (int k = 0; k < 3; ++k) {
          const int u = static_cast<int>(rng() % kThreads);
          const int done = stored[u].load();
          if (done == 0) continue;
          const StoredSpan& s = chains[u][rng() % done];
          GetResult r = store->Get(s.key, "tiny");
          if (r.span == nullptr) {
            false_misses.fetch_add(1);
          } else if (r.span->payload != s.payload) {
            wrong.fetch_add(1);
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(put_errors.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(false_misses.load(), 0);
  for (const auto& chain : chains) {
    for (const StoredSpan& s : chain) ExpectHit(store.get(), s);
  }
  StoreStats stats = store->Stats();
  EXPECT_GT(TierOf(stats, TierId::kRocksDb).spans, 0);
  EXPECT_LE(TierOf(stats, TierId::kDisk).bytes, o.disk_capacity_bytes);
}

TEST_F(TieredStoreTest, ConcurrentDeletesPinsAndReputsKeepEveryKeyConsistent) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  TieredStoreOptions o = Options();
  o.memory_capacity_bytes = 6 * kSpanBytes;
  o.memory_shards = 1;
  o.disk_capacity_bytes = 8 * 4400;
  o.rocksdb_capacity_bytes = 12 * kSpanBytes;
  o.rocksdb_compression = "none";
  o.disk_background_compaction = true;
  auto store = Open(o);
  constexpr int kThreads = 3;
  constexpr int kKeys = 6;
  constexpr int kRounds = 30;
  // Each key has two payload versions; a key is owned by one writer thread.
  std::vector<std::vector<std::array<StoredSpan, 2>>> keys(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    for (const StoredSpan& s : Chain(kKeys, absl::StrCat("w", t))) {
      StoredSpan other = s;
      other.payload[1] ^= 0x55;
      other.meta.payload_checksum = Checksum64(other.payload);
      keys[t].push_back({s, other});
    }
  }
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed_ * 7 + t);
      for (int round = 0; round < kRounds; ++round) {
        for (int k = 0; k < kKeys; ++k) {
          const StoredSpan& s = keys[t][k][round % 2];
          // Chains need their parent: re-put in order, after deleting the old version.
          if (!store->Put(s, PutOptions{}).ok()) errors.fetch_add(1);
          if (rng() % 4 == 0 && store->Pin(s.key, absl::Seconds(5)).ok()) {
            if (!store->Unpin(s.key).ok()) errors.fetch_add(1);
          }
          GetResult own = store->Get(s.key, "tiny");
          if (own.span == nullptr || own.span->payload != s.payload) errors.fetch_add(1);
          // Readers of other threads' keys see one of the two versions or a miss.
          const int u = static_cast<int>(rng() % kThreads);
          const auto& versions = keys[u][rng() % kKeys];
          GetResult r = store->Get(versions[0].key, "tiny");
          if (r.span != nullptr && r.span->payload != versions[0].payload &&
              r.span->payload != versions[1].payload) {
            errors.fetch_add(1);
          }
        }
        for (int k = kKeys - 1; k >= 0; --k) {
          const SpanKey& key = keys[t][k][0].key;
          if (!store->Delete(key).ok()) errors.fetch_add(1);
          if (store->Get(key, "tiny").miss != MissReason::kDeleted) errors.fetch_add(1);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  StoreStats stats = store->Stats();
  for (const TierStats& t : stats.tiers) EXPECT_EQ(t.spans, 0) << TierName(t.tier);
  EXPECT_EQ(stats.pinned_spans, 0);
  store.reset();
  store = Open(o);
  for (const TierStats& t : store->Stats().tiers) EXPECT_EQ(t.spans, 0) << TierName(t.tier);
}

// ---------------------------------------------------------------------------
// kill -9: a child process writes spans and reports each acknowledgement on
// stdout; the parent kills it with SIGKILL mid-stream, reopens the store and
// checks that every acknowledged durable span is readable and intact.

constexpr char kCrashDirEnv[] = "KVRECALL_STORE_CRASH_DIR";
constexpr int kCrashSpans = 400;
constexpr int kAcksBeforeKill = 120;

std::vector<StoredSpan> CrashWorkload() {
  std::mt19937_64 rng(4242);
  std::vector<StoredSpan> chain = testing::MakeChain(testing::TinyModel(), kCrashSpans, rng);
  for (int i = 0; i < kCrashSpans; i += 2) chain[i].meta.durable = true;
  return chain;
}

TieredStoreOptions CrashOptions(const std::string& dir) {
  TieredStoreOptions o;
  o.data_dir = dir;
  o.memory_capacity_bytes = 8 * kSpanBytes;
  o.memory_shards = 1;
  o.disk_capacity_bytes = 100 * 4400;
  o.disk_segment_bytes = 64 << 10;
  o.rocksdb_capacity_bytes = 64 << 20;
  return o;
}

// Runs only as the child of KillNineKeepsEveryAcknowledgedDurableSpan.
TEST(TieredStoreCrashChild, Workload) {
  const char* dir = std::getenv(kCrashDirEnv);
  if (dir == nullptr) GTEST_SKIP() << "runs only as the child of the kill -9 test";
  auto store = TieredStore::Open(CrashOptions(dir));
  KVR_ASSERT_OK(store.status());
  KVR_ASSERT_OK((*store)->RegisterModel(testing::TinyModel()));
  const std::vector<StoredSpan> chain = CrashWorkload();
  for (int i = 0; i < kCrashSpans; ++i) {
    KVR_ASSERT_OK((*store)->Put(chain[i], PutOptions{}).status());
    std::printf("ack %d\n", i);
    std::fflush(stdout);
  }
  // Wait to be killed (the parent closes the pipe or sends SIGKILL).
  char c;
  while (::read(STDIN_FILENO, &c, 1) > 0) {
  }
}

TEST(TieredStoreCrashTest, KillNineKeepsEveryAcknowledgedDurableSpan) {
  const std::string dir = kvrecall::testing::MakeTempDir("crash-store");
  int out[2], in[2];
  ASSERT_EQ(::pipe(out), 0);
  ASSERT_EQ(::pipe(in), 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, in[0], STDIN_FILENO);
  posix_spawn_file_actions_addclose(&actions, out[0]);
  posix_spawn_file_actions_addclose(&actions, in[1]);
  std::string exe = std::filesystem::read_symlink("/proc/self/exe").string();
  std::string filter = "--gtest_filter=TieredStoreCrashChild.Workload";
  char* argv[] = {exe.data(), filter.data(), nullptr};
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
  env_strings.push_back(absl::StrCat(kCrashDirEnv, "=", dir));
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  pid_t pid = 0;
  ASSERT_EQ(posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv, envp.data()), 0);
  posix_spawn_file_actions_destroy(&actions);
  ::close(out[1]);
  ::close(in[0]);

  int acked = -1;
  std::string pending;
  char buf[4096];
  while (acked + 1 < kAcksBeforeKill) {
    const ssize_t n = ::read(out[0], buf, sizeof(buf));
    if (n <= 0) break;
    pending.append(buf, static_cast<size_t>(n));
    size_t nl;
    while ((nl = pending.find('\n')) != std::string::npos) {
      const std::string line = pending.substr(0, nl);
      pending.erase(0, nl + 1);
      int i = 0;
      if (absl::StartsWith(line, "ack ") && absl::SimpleAtoi(line.substr(4), &i)) acked = i;
    }
  }
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  ::close(out[0]);
  ::close(in[1]);
  ASSERT_GE(acked + 1, kAcksBeforeKill) << "the child stopped early";

  auto store = TieredStore::Open(CrashOptions(dir));
  KVR_ASSERT_OK(store.status());
  const std::vector<StoredSpan> chain = CrashWorkload();
  int durable_checked = 0, other_readable = 0;
  for (int i = 0; i < kCrashSpans; ++i) {
    GetResult r = (*store)->Get(chain[i].key, "tiny");
    if (r.span != nullptr) {
      EXPECT_EQ(r.span->payload, chain[i].payload) << i;  // never wrong bytes
      if (!chain[i].meta.durable) ++other_readable;
    }
    if (i <= acked && chain[i].meta.durable) {
      EXPECT_NE(r.span, nullptr) << "acknowledged durable span " << i
                                 << " lost: " << MissReasonName(r.miss);
      ++durable_checked;
    }
  }
  EXPECT_EQ(durable_checked, (acked + 2) / 2);
  // Non-durable spans that had been demoted to disk survive as well.
  EXPECT_GT(other_readable, 0);
}

}  // namespace
}  // namespace kvrecall::store
