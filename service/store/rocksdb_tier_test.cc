#include "service/store/rocksdb_tier.h"

#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/store/codec.h"
#include "service/store/compression.h"
#include "service/store/store_test_util.h"
#include "tests/testing/largest_allocation.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::store {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::testing::Pair;

TEST(CompressionTest, RoundTripsAndRejectsGarbage) {
  std::mt19937_64 rng(5);
  std::string compressible(1 << 16, '\0');
  for (size_t i = 0; i < compressible.size(); ++i) compressible[i] = static_cast<char>(i % 7);
  std::string random(1 << 16, '\0');
  for (char& c : random) c = static_cast<char>(rng());
  for (Compression c : {Compression::kNone, Compression::kLz4, Compression::kZstd}) {
    SCOPED_TRACE(CompressionName(c));
    for (const std::string* raw : {&compressible, &random}) {
      std::string stored;
      const Compression used = Compress(c, *raw, &stored);
      const absl::string_view bytes =
          used == Compression::kNone ? absl::string_view(*raw) : absl::string_view(stored);
      std::string back;
      KVR_ASSERT_OK(Decompress(used, bytes, static_cast<int64_t>(raw->size()), &back));
      EXPECT_EQ(back, *raw);
      if (raw == &random) {
        EXPECT_EQ(used, Compression::kNone);  // does not shrink: kept raw
      } else if (c != Compression::kNone) {
        EXPECT_LT(stored.size(), raw->size() / 4);
      }
    }
    std::string out;
    if (c != Compression::kNone) {
      EXPECT_THAT(Decompress(c, "definitely not a frame", 1000, &out),
                  StatusIs(absl::StatusCode::kDataLoss));
    }
    EXPECT_THAT(Decompress(c, "abc", -1, &out), StatusIs(absl::StatusCode::kDataLoss));
  }
  EXPECT_THAT(ParseCompression("snappy"), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Found by store_records_fuzz: a record claiming a large payload made
// Decompress allocate (and zero) that size before decompressing a byte of it
// (up to 64 GiB from a few stored bytes). Now LZ4 refuses a size beyond its
// 255:1 ratio first, and zstd output grows only as it decompresses.
TEST(CompressionTest, ADamagedSizeAllocatesOnlyWhatDecompresses) {
  std::string raw(1 << 16, '\0');
  for (size_t i = 0; i < raw.size(); ++i) raw[i] = static_cast<char>(i % 7);
  for (Compression c : {Compression::kLz4, Compression::kZstd}) {
    SCOPED_TRACE(CompressionName(c));
    std::string stored;
    ASSERT_EQ(Compress(c, raw, &stored), c);
    for (int64_t claim : {int64_t{1} << 35, int64_t{1} << 30, static_cast<int64_t>(raw.size()) + 1,
                          static_cast<int64_t>(raw.size()) - 1}) {
      std::string out;
      kvrecall::testing::LargestAllocation largest;
      EXPECT_THAT(Decompress(c, stored, claim, &out), StatusIs(absl::StatusCode::kDataLoss));
      EXPECT_LT(largest.bytes(), size_t{4} << 20) << "claimed " << claim;
    }
    std::string back;
    KVR_ASSERT_OK(Decompress(c, stored, static_cast<int64_t>(raw.size()), &back));
    EXPECT_EQ(back, raw);
  }
}

TEST(CodecTest, ModelRoundTripAndValidation) {
  ModelGeometry m = testing::TinyModel("llama-3-8b");
  m.dtype = DType::kF16;
  m.keys_post_rope = false;
  KVR_ASSERT_OK_AND_ASSIGN(ModelGeometry back, DecodeModel(EncodeModel(m)));
  EXPECT_TRUE(SameGeometry(back, m));
  EXPECT_THAT(DecodeModel("x"), StatusIs(absl::StatusCode::kDataLoss));
  ModelGeometry bad = m;
  bad.num_q_heads = 3;  // not a multiple of 2 kv heads
  EXPECT_THAT(ValidateModel(bad), StatusIs(absl::StatusCode::kInvalidArgument));
  bad = m;
  bad.head_dim = 0;
  EXPECT_THAT(ValidateModel(bad), StatusIs(absl::StatusCode::kInvalidArgument));
  bad = m;
  bad.num_layers = 1 << 30;
  bad.head_dim = 1 << 30;
  EXPECT_THAT(ValidateModel(bad), StatusIs(absl::StatusCode::kInvalidArgument));
  bad = m;
  bad.model_id.clear();
  EXPECT_THAT(ValidateModel(bad), StatusIs(absl::StatusCode::kInvalidArgument));
}

class RocksDbTierTest : public ::testing::Test {
 protected:
  RocksDbTierOptions Options(const std::string& compression = "lz4") {
    RocksDbTierOptions o;
    o.dir = dir_;
    o.capacity_bytes = 64 << 20;
    o.compression = compression;
    return o;
  }
  std::unique_ptr<RocksDbTier> Open(const RocksDbTierOptions& o) {
    auto tier = RocksDbTier::Create(o);
    EXPECT_TRUE(tier.ok()) << tier.status();
    return tier.ok() ? std::move(tier).value() : nullptr;
  }
  // A span whose payload compresses (repeating bf16 values), as real KV
  // payloads partly do.
  StoredSpanPtr CompressibleSpan() {
    auto s = std::make_shared<StoredSpan>(*testing::MakeLooseSpan(model_, rng_));
    for (size_t i = 0; i < s->payload.size(); ++i) {
      s->payload[i] = static_cast<char>((i / 2) % 5 + (rng_() % 2));
    }
    s->meta.payload_checksum = Checksum64(s->payload);
    return s;
  }
  void Put(RocksDbTier* tier, const StoredSpanPtr& span, bool sync = false) {
    std::vector<SpanKey> victims;
    TierPutOptions o;
    o.sync = sync;
    ASSERT_TRUE(tier->Put(span, o, &victims).ok());
    for (const SpanKey& v : victims) tier->FinishEviction(v);
  }

  std::string dir_ = kvrecall::testing::MakeTempDir("rocksdb-tier");
  ModelGeometry model_ = testing::TinyModel();
  uint64_t seed_ = testing::TestSeed(31);
  std::mt19937_64 rng_{seed_};
};

TEST_F(RocksDbTierTest, RoundTripWithEveryCompressionAndRestart) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  for (const char* compression : {"none", "lz4", "zstd"}) {
    SCOPED_TRACE(compression);
    dir_ = kvrecall::testing::MakeTempDir("rocksdb-tier");
    std::vector<StoredSpanPtr> spans = {testing::MakeLooseSpan(model_, rng_, "t1"),
                                        CompressibleSpan(), CompressibleSpan()};
    {
      auto tier = Open(Options(compression));
      for (const auto& s : spans) Put(tier.get(), s, /*sync=*/true);
      for (const auto& s : spans) {
        KVR_ASSERT_OK_AND_ASSIGN(StoredSpanPtr got, tier->Get(s->key));
        EXPECT_EQ(got->payload, s->payload);
        EXPECT_EQ(got->meta.token_ids, s->meta.token_ids);
        EXPECT_EQ(got->key, s->key);
      }
      const int64_t raw = 3 * 4096;
      if (std::string(compression) == "none") {
        EXPECT_EQ(tier->Stats().bytes, raw);
      } else {
        EXPECT_LT(tier->Stats().bytes, raw);  // capacity counts compressed bytes
      }
    }
    auto tier = Open(Options(compression));
    EXPECT_EQ(tier->Stats().spans, 3);
    for (const auto& s : spans) {
      KVR_ASSERT_OK_AND_ASSIGN(StoredSpanPtr got, tier->Get(s->key));
      EXPECT_EQ(got->payload, s->payload);
    }
  }
}

TEST_F(RocksDbTierTest, RejectsBadOptions) {
  RocksDbTierOptions o = Options("brotli");
  EXPECT_THAT(RocksDbTier::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = Options();
  o.capacity_bytes = -1;
  EXPECT_THAT(RocksDbTier::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(RocksDbTierTest, CapacityEvictsOldestFirst) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  RocksDbTierOptions o = Options("none");
  o.capacity_bytes = 3 * 4096;
  auto tier = Open(o);
  std::vector<StoredSpanPtr> spans;
  for (int i = 0; i < 3; ++i) {
    spans.push_back(testing::MakeLooseSpan(model_, rng_));
    Put(tier.get(), spans.back());
  }
  std::vector<SpanKey> victims;
  KVR_ASSERT_OK(tier->Put(testing::MakeLooseSpan(model_, rng_), TierPutOptions{}, &victims));
  ASSERT_THAT(victims, ElementsAre(spans[0]->key));
  KVR_ASSERT_OK_AND_ASSIGN(StoredSpanPtr leaving, tier->GetVictim(spans[0]->key));
  EXPECT_EQ(leaving->payload, spans[0]->payload);
  EXPECT_TRUE(tier->FinishEviction(spans[0]->key));
  EXPECT_THAT(tier->Get(spans[0]->key), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(tier->Stats().evictions, 1);
  EXPECT_EQ(tier->Stats().bytes, 3 * 4096);
  // Evicted spans are gone from the database, not only from the index.
  tier.reset();
  tier = Open(o);
  EXPECT_EQ(tier->Stats().spans, 3);
  EXPECT_FALSE(tier->Contains(spans[0]->key));
}

TEST_F(RocksDbTierTest, CorruptPayloadIsDataLossCountedAndDropped) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  for (const char* compression : {"none", "zstd"}) {
    SCOPED_TRACE(compression);
    dir_ = kvrecall::testing::MakeTempDir("rocksdb-tier");
    auto tier = Open(Options(compression));
    StoredSpanPtr span = CompressibleSpan();
    Put(tier.get(), span);
    KVR_ASSERT_OK(tier->TEST_CorruptStoredPayload(span->key));
    EXPECT_THAT(tier->Get(span->key), StatusIs(absl::StatusCode::kDataLoss));
    EXPECT_EQ(tier->Stats().checksum_failures, 1);
    EXPECT_THAT(tier->Get(span->key), StatusIs(absl::StatusCode::kNotFound));
    tier.reset();
    tier = Open(Options(compression));
    EXPECT_FALSE(tier->Contains(span->key));  // dropped from the database too
  }
}

TEST_F(RocksDbTierTest, CatalogOnlyTierRefusesSpans) {
  RocksDbTierOptions o = Options();
  o.capacity_bytes = 0;
  auto tier = Open(o);
  std::vector<SpanKey> victims;
  EXPECT_THAT(tier->Put(testing::MakeLooseSpan(model_, rng_), TierPutOptions{}, &victims),
              StatusIs(absl::StatusCode::kResourceExhausted));
  KVR_EXPECT_OK(tier->CatalogPut("context", "k", "v"));
  KVR_EXPECT_OK(tier->PutModel(model_));
}

TEST_F(RocksDbTierTest, ModelsTombstonesAndCatalogSpacesPersist) {
  SpanKey a{"tenant-a", Hash128{1, 2}};
  SpanKey b{"tenant-b", Hash128{1, 2}};
  {
    auto tier = Open(Options());
    KVR_ASSERT_OK(tier->PutModel(model_));
    KVR_ASSERT_OK(tier->PutModel(testing::TinyModel("other")));
    KVR_ASSERT_OK(tier->PutTombstones({a}, MissReason::kDeleted, true));
    KVR_ASSERT_OK(tier->CatalogPut("context", "ctx/1", "one"));
    KVR_ASSERT_OK(tier->CatalogPut("context", "ctx/2", "two"));
    KVR_ASSERT_OK(tier->CatalogPut("context", "other/1", "x"));
    KVR_ASSERT_OK(tier->CatalogPut("index", "ctx/1", "manifest"));
    KVR_ASSERT_OK(tier->CatalogPut("context", std::string("bin\0key", 7), std::string("\0\1", 2)));
  }
  auto tier = Open(Options());
  KVR_ASSERT_OK_AND_ASSIGN(std::vector<ModelGeometry> models, tier->LoadModels());
  ASSERT_EQ(models.size(), 2u);
  EXPECT_EQ(tier->GetTombstone(a), MissReason::kDeleted);
  EXPECT_EQ(tier->GetTombstone(b), MissReason::kNone);  // tenants are separate
  KVR_ASSERT_OK(tier->ClearTombstone(a));
  EXPECT_EQ(tier->GetTombstone(a), MissReason::kNone);
  KVR_ASSERT_OK_AND_ASSIGN(auto scan, tier->CatalogScan("context", "ctx/"));
  EXPECT_THAT(scan, ElementsAre(Pair("ctx/1", "one"), Pair("ctx/2", "two")));
  KVR_ASSERT_OK_AND_ASSIGN(auto index, tier->CatalogScan("index", ""));
  EXPECT_THAT(index, ElementsAre(Pair("ctx/1", "manifest")));
  KVR_ASSERT_OK_AND_ASSIGN(std::string bin,
                           tier->CatalogGet("context", std::string("bin\0key", 7)));
  EXPECT_EQ(bin, std::string("\0\1", 2));
  KVR_ASSERT_OK(tier->CatalogDelete("context", "ctx/1"));
  EXPECT_THAT(tier->CatalogGet("context", "ctx/1"), StatusIs(absl::StatusCode::kNotFound));
  KVR_ASSERT_OK_AND_ASSIGN(auto all, tier->CatalogScan("context", ""));
  EXPECT_EQ(all.size(), 3u);
}

TEST_F(RocksDbTierTest, TombstonesAreCollectedByAgeAndNotScannedAtStart) {
  const absl::Time now = absl::Now();
  std::vector<SpanKey> old_keys, new_keys;
  for (uint64_t i = 0; i < 500; ++i) old_keys.push_back(SpanKey{"t", Hash128{i, 1}});
  for (uint64_t i = 0; i < 3; ++i) new_keys.push_back(SpanKey{"t", Hash128{i, 2}});
  {
    auto tier = Open(Options());
    KVR_ASSERT_OK(tier->PutTombstones(old_keys, MissReason::kEvicted, true, now - absl::Hours(48)));
    KVR_ASSERT_OK(tier->PutTombstones(new_keys, MissReason::kDeleted, true, now));
    // A key tombstoned long ago and again now keeps its newer tombstone.
    KVR_ASSERT_OK(tier->PutTombstones({old_keys[0]}, MissReason::kDeleted, true, now));
  }
  auto tier = Open(Options());  // no tombstone scan: lookups ask RocksDB
  EXPECT_EQ(tier->GetTombstone(old_keys[1]), MissReason::kEvicted);
  EXPECT_EQ(tier->GetTombstone(new_keys[0]), MissReason::kDeleted);
  KVR_ASSERT_OK_AND_ASSIGN(int64_t nothing, tier->CollectTombstones(now - absl::Hours(72)));
  EXPECT_EQ(nothing, 0);
  KVR_ASSERT_OK_AND_ASSIGN(int64_t collected, tier->CollectTombstones(now - absl::Hours(24)));
  EXPECT_EQ(collected, 499);
  EXPECT_EQ(tier->GetTombstone(old_keys[1]), MissReason::kNone);
  EXPECT_EQ(tier->GetTombstone(old_keys[499]), MissReason::kNone);
  EXPECT_EQ(tier->GetTombstone(old_keys[0]), MissReason::kDeleted);
  EXPECT_EQ(tier->GetTombstone(new_keys[2]), MissReason::kDeleted);
  // A second pass finds nothing left to do; a later cutoff takes the rest.
  KVR_ASSERT_OK_AND_ASSIGN(nothing, tier->CollectTombstones(now - absl::Hours(24)));
  EXPECT_EQ(nothing, 0);
  KVR_ASSERT_OK_AND_ASSIGN(collected, tier->CollectTombstones(now + absl::Seconds(1)));
  EXPECT_EQ(collected, 4);
  EXPECT_EQ(tier->GetTombstone(new_keys[2]), MissReason::kNone);
}

}  // namespace
}  // namespace kvrecall::store
