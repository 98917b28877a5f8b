#include "service/store/disk_tier.h"

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/store/segment_format.h"
#include "service/store/store_test_util.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::store {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::IsEmpty;

std::vector<std::string> SegmentFiles(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().extension() == ".kvs") files.push_back(e.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

// The file and offset where `needle` occurs in some segment of `dir`.
std::pair<std::string, size_t> Find(const std::string& dir, const std::string& needle) {
  for (const std::string& f : SegmentFiles(dir)) {
    auto data = ReadFileToString(f);
    if (!data.ok()) continue;
    size_t at = data->find(needle);
    if (at != std::string::npos) return {f, at};
  }
  return {"", 0};
}

void XorByte(const std::string& path, size_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x40);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

class DiskTierTest : public ::testing::Test {
 protected:
  DiskTierOptions Options() {
    DiskTierOptions o;
    o.dir = dir_;
    o.capacity_bytes = 64 << 20;
    o.segment_bytes = 64 << 10;  // 64 KiB: about 15 records of 4 KiB
    o.compaction_live_fraction = 0.5;
    o.background_compaction = false;
    return o;
  }
  std::unique_ptr<DiskTier> Open(const DiskTierOptions& o) {
    auto tier = DiskTier::Create(o);
    EXPECT_TRUE(tier.ok()) << tier.status();
    return tier.ok() ? std::move(tier).value() : nullptr;
  }
  std::unique_ptr<DiskTier> Open() { return Open(Options()); }
  StoredSpanPtr Span() { return testing::MakeLooseSpan(model_, rng_); }
  void Put(DiskTier* tier, const StoredSpanPtr& span, bool sync = false) {
    std::vector<SpanKey> victims;
    TierPutOptions o;
    o.sync = sync;
    ASSERT_TRUE(tier->Put(span, o, &victims).ok());
    for (const SpanKey& v : victims) tier->FinishEviction(v);
  }
  void ExpectReadable(DiskTier* tier, const StoredSpanPtr& span) {
    auto got = tier->Get(span->key);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ((*got)->payload, span->payload);
    EXPECT_EQ((*got)->meta.token_ids, span->meta.token_ids);
    EXPECT_EQ((*got)->meta.payload_checksum, span->meta.payload_checksum);
    EXPECT_EQ((*got)->meta.parent, span->meta.parent);
    EXPECT_EQ((*got)->key, span->key);
  }

  std::string dir_ = kvrecall::testing::MakeTempDir("disk-tier");
  ModelGeometry model_ = testing::TinyModel();
  uint64_t seed_ = testing::TestSeed(23);
  std::mt19937_64 rng_{seed_};
};

TEST(SegmentFormatTest, RecordRoundTripAndChecksums) {
  std::mt19937_64 rng(1);
  ModelGeometry m = testing::TinyModel();
  StoredSpanPtr span = testing::MakeLooseSpan(m, rng, "tenant-a");
  EncodedRecord rec = EncodeSpanRecord(*span, 42);
  const std::string bytes = rec.prefix + span->payload + rec.suffix;
  ASSERT_EQ(bytes.size(), rec.record_bytes);
  EXPECT_EQ(bytes.size() % 8, 0u);
  KVR_ASSERT_OK_AND_ASSIGN(RecordHeader h, ParseRecordHeader(bytes.substr(0, 40)));
  EXPECT_EQ(h.seq, 42u);
  EXPECT_EQ(h.record_bytes(), rec.record_bytes);
  const std::string meta = bytes.substr(40, h.meta_len);
  EXPECT_TRUE(VerifyHeaderChecksum(h, bytes.substr(0, 40), meta));
  SpanKey key;
  SpanMeta decoded;
  ASSERT_TRUE(DecodeRecordMeta(h, meta, true, &key, &decoded));
  EXPECT_EQ(key, span->key);
  EXPECT_EQ(decoded.token_ids, span->meta.token_ids);
  std::string flipped = meta;
  flipped[5] ^= 1;
  EXPECT_FALSE(VerifyHeaderChecksum(h, bytes.substr(0, 40), flipped));
  EXPECT_THAT(ParseRecordHeader(std::string(40, '\0')), StatusIs(absl::StatusCode::kDataLoss));
}

TEST_F(DiskTierTest, RejectsBadOptions) {
  DiskTierOptions o = Options();
  o.capacity_bytes = 0;
  EXPECT_THAT(DiskTier::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = Options();
  o.segment_bytes = 1000;
  EXPECT_THAT(DiskTier::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = Options();
  o.compaction_live_fraction = -0.1;
  EXPECT_THAT(DiskTier::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o.dir = "";
  EXPECT_THAT(DiskTier::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(DiskTierTest, RoundTripAndRestartRebuildsTheIndex) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  std::vector<StoredSpanPtr> spans;
  {
    auto tier = Open();
    for (int i = 0; i < 40; ++i) {
      spans.push_back(Span());
      Put(tier.get(), spans.back(), /*sync=*/i % 10 == 0);
    }
    for (const auto& s : spans) ExpectReadable(tier.get(), s);
    EXPECT_EQ(tier->Stats().spans, 40);
    EXPECT_GT(tier->num_segments(), 2);  // rotated
  }
  auto tier = Open();
  EXPECT_EQ(tier->recovery_stats().live_spans, 40);
  EXPECT_EQ(tier->recovery_stats().corrupt_records, 0);
  EXPECT_EQ(tier->recovery_stats().truncated_bytes, 0);
  for (const auto& s : spans) ExpectReadable(tier.get(), s);
  int n = 0;
  tier->ForEachSpan([&](const SpanKey&, const SpanMeta& m) {
    EXPECT_EQ(m.model_id, "tiny");
    ++n;
  });
  EXPECT_EQ(n, 40);
}

TEST_F(DiskTierTest, DeletionSurvivesRestart) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  StoredSpanPtr kept = Span(), deleted = Span();
  {
    auto tier = Open();
    Put(tier.get(), kept);
    Put(tier.get(), deleted);
    KVR_ASSERT_OK(tier->Delete(deleted->key));
    EXPECT_THAT(tier->Get(deleted->key), StatusIs(absl::StatusCode::kNotFound));
    EXPECT_THAT(tier->Delete(deleted->key), StatusIs(absl::StatusCode::kNotFound));
  }
  auto tier = Open();
  EXPECT_THAT(tier->Get(deleted->key), StatusIs(absl::StatusCode::kNotFound));
  ExpectReadable(tier.get(), kept);
  EXPECT_EQ(tier->recovery_stats().tombstones, 2);
}

TEST_F(DiskTierTest, CorruptPayloadIsDataLossCountedAndNeverServed) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  auto tier = Open();
  StoredSpanPtr a = Span(), b = Span();
  Put(tier.get(), a);
  Put(tier.get(), b);
  auto [path, at] = Find(dir_, a->payload.substr(0, 64));
  ASSERT_FALSE(path.empty());
  XorByte(path, at + 1000);
  EXPECT_THAT(tier->Get(a->key), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_EQ(tier->Stats().checksum_failures, 1);
  EXPECT_FALSE(tier->Contains(a->key));  // dropped from the index
  EXPECT_THAT(tier->Get(a->key), StatusIs(absl::StatusCode::kNotFound));
  ExpectReadable(tier.get(), b);
  EXPECT_EQ(tier->Stats().spans, 1);
}

TEST_F(DiskTierTest, TornTailIsTruncatedOnRestart) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  std::vector<StoredSpanPtr> spans;
  {
    auto tier = Open();
    for (int i = 0; i < 5; ++i) {
      spans.push_back(Span());
      Put(tier.get(), spans.back());
    }
  }
  // A crash in the middle of the last write: cut its record in half.
  auto [path, at] = Find(dir_, spans.back()->payload.substr(0, 64));
  ASSERT_FALSE(path.empty());
  std::filesystem::resize_file(path, at + 100);
  StoredSpanPtr after = Span();
  {
    auto tier = Open();
    EXPECT_GT(tier->recovery_stats().truncated_bytes, 0);
    EXPECT_EQ(tier->recovery_stats().corrupt_records, 0);
    EXPECT_EQ(tier->recovery_stats().live_spans, 4);
    for (int i = 0; i < 4; ++i) ExpectReadable(tier.get(), spans[i]);
    EXPECT_THAT(tier->Get(spans.back()->key), StatusIs(absl::StatusCode::kNotFound));
    Put(tier.get(), after);
  }
  auto tier = Open();
  EXPECT_EQ(tier->recovery_stats().truncated_bytes, 0);
  ExpectReadable(tier.get(), after);
  for (int i = 0; i < 4; ++i) ExpectReadable(tier.get(), spans[i]);
}

TEST_F(DiskTierTest, CorruptMiddleRecordIsSkippedAndCounted) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  std::vector<StoredSpanPtr> spans;
  {
    auto tier = Open();
    for (int i = 0; i < 6; ++i) {
      spans.push_back(Span());
      Put(tier.get(), spans.back());
    }
  }
  // Damage the header of the third record (its magic): recovery finds the
  // next record by scanning and keeps everything after it.
  auto [path, at] = Find(dir_, spans[2]->payload.substr(0, 64));
  ASSERT_FALSE(path.empty());
  auto data = ReadFileToString(path);
  ASSERT_TRUE(data.ok());
  const size_t record_start = data->rfind("KVRS", at);
  ASSERT_NE(record_start, std::string::npos);
  XorByte(path, record_start);
  auto tier = Open();
  EXPECT_EQ(tier->recovery_stats().corrupt_records, 1);
  EXPECT_EQ(tier->recovery_stats().live_spans, 5);
  EXPECT_THAT(tier->Get(spans[2]->key), StatusIs(absl::StatusCode::kNotFound));
  for (int i : {0, 1, 3, 4, 5}) ExpectReadable(tier.get(), spans[i]);
}

TEST_F(DiskTierTest, PayloadCorruptedAtRestIsReportedAsDataLossAfterRecovery) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  std::vector<StoredSpanPtr> spans;
  {
    auto tier = Open();
    for (int i = 0; i < 4; ++i) {
      spans.push_back(Span());
      Put(tier.get(), spans.back());
    }
  }
  // Flip a payload byte of the second record (its header stays valid).
  auto [path, at] = Find(dir_, spans[1]->payload.substr(0, 64));
  ASSERT_FALSE(path.empty());
  XorByte(path, at + 10);
  auto tier = Open();
  EXPECT_EQ(tier->recovery_stats().corrupt_records, 1);
  EXPECT_EQ(tier->recovery_stats().live_spans, 3);
  // The first read says why the span is gone, and it is never served.
  EXPECT_THAT(tier->Get(spans[1]->key), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(tier->Get(spans[1]->key), StatusIs(absl::StatusCode::kNotFound));
  for (int i : {0, 2, 3}) ExpectReadable(tier.get(), spans[i]);
}

TEST_F(DiskTierTest, CompactionKeepsEveryLiveRecordAndFreesSpace) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  std::vector<StoredSpanPtr> spans;
  std::vector<StoredSpanPtr> live;
  int64_t before_bytes = 0;
  {
    auto tier = Open();
    for (int i = 0; i < 60; ++i) {
      spans.push_back(Span());
      Put(tier.get(), spans.back());
    }
    for (int i = 0; i < 60; ++i) {
      if (i % 4 == 0) {
        live.push_back(spans[i]);
      } else {
        KVR_ASSERT_OK(tier->Delete(spans[i]->key));
      }
    }
    before_bytes = tier->file_bytes();
    const int64_t before_segments = tier->num_segments();
    KVR_ASSERT_OK_AND_ASSIGN(int removed, tier->CompactNow());
    EXPECT_GT(removed, 0);
    EXPECT_LT(tier->num_segments(), before_segments);
    EXPECT_LT(tier->file_bytes(), before_bytes / 2);
    EXPECT_GT(tier->compaction_stats().records_copied, 0);
    for (const auto& s : live) ExpectReadable(tier.get(), s);
    EXPECT_EQ(tier->Stats().spans, static_cast<int64_t>(live.size()));
  }
  // Deleted spans stay deleted and live ones stay readable after a restart.
  auto tier = Open();
  EXPECT_EQ(tier->recovery_stats().live_spans, static_cast<int64_t>(live.size()));
  for (const auto& s : live) ExpectReadable(tier.get(), s);
  for (int i = 0; i < 60; ++i) {
    if (i % 4 != 0) {
      EXPECT_FALSE(tier->Contains(spans[i]->key)) << i;
    }
  }
}

TEST_F(DiskTierTest, CapacityEvictsOldestRecordsFirst) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  DiskTierOptions o = Options();
  const uint64_t record = EncodeSpanRecord(*Span(), 1).record_bytes;
  o.capacity_bytes = static_cast<int64_t>(10 * record);
  auto tier = Open(o);
  std::vector<StoredSpanPtr> spans;
  for (int i = 0; i < 10; ++i) {
    spans.push_back(Span());
    Put(tier.get(), spans.back());
  }
  StoredSpanPtr eleventh = Span();
  std::vector<SpanKey> victims;
  KVR_ASSERT_OK(tier->Put(eleventh, TierPutOptions{}, &victims));
  ASSERT_THAT(victims, ElementsAre(spans[0]->key));
  // The victim is still readable until its eviction is finished.
  KVR_ASSERT_OK_AND_ASSIGN(StoredSpanPtr leaving, tier->GetVictim(spans[0]->key));
  EXPECT_EQ(leaving->payload, spans[0]->payload);
  EXPECT_TRUE(tier->FinishEviction(spans[0]->key));
  EXPECT_FALSE(tier->Contains(spans[0]->key));
  StoredSpanPtr twelfth = Span();
  KVR_ASSERT_OK(tier->Put(twelfth, TierPutOptions{}, &victims));
  EXPECT_THAT(victims, ElementsAre(spans[1]->key));
  EXPECT_TRUE(tier->FinishEviction(spans[1]->key));
  EXPECT_EQ(tier->Stats().evictions, 2);
  EXPECT_LE(tier->Stats().bytes, o.capacity_bytes);
  // A record larger than the whole capacity is refused.
  DiskTierOptions tiny = Options();
  tiny.dir = dir_ + "-tiny";
  tiny.capacity_bytes = 1000;
  auto small = Open(tiny);
  EXPECT_THAT(small->Put(Span(), TierPutOptions{}, &victims),
              StatusIs(absl::StatusCode::kResourceExhausted));
}

TEST_F(DiskTierTest, EvictedThenDeletedSpanDoesNotComeBackAfterRestart) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  StoredSpanPtr x = Span();
  {
    DiskTierOptions o = Options();
    o.capacity_bytes = static_cast<int64_t>(2 * EncodeSpanRecord(*x, 1).record_bytes);
    auto tier = Open(o);
    Put(tier.get(), x);
    Put(tier.get(), Span());
    Put(tier.get(), Span());  // evicts x (no tombstone for an eviction)
    EXPECT_FALSE(tier->Contains(x->key));
    // The record is still in the file, so a delete must leave a tombstone.
    EXPECT_THAT(tier->Delete(x->key), StatusIs(absl::StatusCode::kNotFound));
  }
  auto tier = Open();
  EXPECT_FALSE(tier->Contains(x->key));
}

TEST_F(DiskTierTest, ReplacingASpanKeepsTheNewestRecordAcrossRestart) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  StoredSpanPtr first = Span();
  auto second = std::make_shared<StoredSpan>(*first);
  second->meta.durable = true;
  {
    auto tier = Open();
    Put(tier.get(), first);
    Put(tier.get(), second);
    EXPECT_EQ(tier->Stats().spans, 1);
  }
  auto tier = Open();
  KVR_ASSERT_OK_AND_ASSIGN(StoredSpanPtr got, tier->Get(first->key));
  EXPECT_TRUE(got->meta.durable);
}

TEST_F(DiskTierTest, BackgroundCompactionRunsWhileServing) {
  SCOPED_TRACE(absl::StrCat("seed=", seed_));
  DiskTierOptions o = Options();
  o.background_compaction = true;
  std::vector<StoredSpanPtr> spans;
  auto tier = Open(o);
  for (int i = 0; i < 60; ++i) {
    spans.push_back(Span());
    Put(tier.get(), spans.back());
  }
  for (int i = 0; i < 60; ++i) {
    if (i % 3 != 0) {
      KVR_ASSERT_OK(tier->Delete(spans[i]->key));
    }
    // Reads interleave with whatever the background thread is doing.
    if (i % 3 == 0) ExpectReadable(tier.get(), spans[i]);
  }
  // CompactNow waits for a running background pass and finishes the work.
  KVR_ASSERT_OK(tier->CompactNow().status());
  for (int i = 0; i < 60; i += 3) ExpectReadable(tier.get(), spans[i]);
  EXPECT_GT(tier->compaction_stats().segments_removed, 0);
}

}  // namespace
}  // namespace kvrecall::store
