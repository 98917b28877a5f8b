#include "index/flat/flat_index.h"

#include <algorithm>
#include <random>
#include <vector>

#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "index/distance.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::index {
namespace {

using ::kvrecall::testing::StatusIs;

std::vector<uint16_t> RandomHalves(std::mt19937& rng, int64_t count) {
  std::normal_distribution<float> dist;
  std::vector<uint16_t> out(count);
  for (auto& h : out) h = FloatToHalf(dist(rng));
  return out;
}

std::vector<float> RandomFloats(std::mt19937& rng, int64_t count) {
  std::normal_distribution<float> dist;
  std::vector<float> out(count);
  for (auto& x : out) x = dist(rng);
  return out;
}

// Brute force with DotRow and the TopK tie rule: the definition of "exact".
SearchResult BruteForce(const VectorView& keys, const std::vector<float>& q, int64_t nq,
                        int32_t k, const std::vector<PositionRange>& exclude = {}) {
  SearchResult r;
  r.num_queries = nq;
  r.k = k;
  r.ids.resize(nq * k);
  r.scores.resize(nq * k);
  for (int64_t i = 0; i < nq; ++i) {
    TopK top(k);
    for (int64_t p = 0; p < keys.rows; ++p) {
      bool skip = false;
      for (const auto& e : exclude) skip |= p >= e.begin && p < e.end;
      if (!skip) top.Push(DotRow(q.data() + i * keys.dim, keys.row(p), keys.dtype, keys.dim), p);
    }
    top.Drain(r.ids.data() + i * k, r.scores.data() + i * k);
  }
  return r;
}

TEST(FlatIndexTest, MatchesBruteForceForEveryDtypeAndStorage) {
  const uint32_t seed = 4242;
  std::mt19937 rng(seed);
  const int32_t d = 64;
  const int64_t n = 3000, nq = 9;
  const std::vector<float> f32 = RandomFloats(rng, n * d);
  std::vector<uint16_t> f16(n * d), bf16(n * d);
  for (int64_t i = 0; i < n * d; ++i) {
    f16[i] = FloatToHalf(f32[i]);
    bf16[i] = FloatToBf16(f32[i]);
  }
  const std::vector<float> q = RandomFloats(rng, nq * d);
  const VectorView views[] = {VectorView::F32(f32.data(), n, d),
                              VectorView{f16.data(), n, d, DType::kF16, 0},
                              VectorView{bf16.data(), n, d, DType::kBf16, 0}};
  for (const VectorView& keys : views) {
    const SearchResult expected = BruteForce(keys, q, nq, 50);
    for (bool store_f32 : {false, true}) {
      FlatOptions options;
      options.store_f32 = store_f32;
      KVR_ASSERT_OK_AND_ASSIGN(auto index, FlatIndex::Build(keys, options));
      for (int threads : {1, 0}) {
        SearchParams params;
        params.num_threads = threads;
        KVR_ASSERT_OK_AND_ASSIGN(SearchResult got,
                                 index->Search(VectorView::F32(q.data(), nq, d), 50, params));
        EXPECT_EQ(got.ids, expected.ids) << "seed " << seed << " dtype "
                                         << DTypeName(keys.dtype) << " f32 " << store_f32;
        EXPECT_EQ(got.scores, expected.scores) << "seed " << seed;
        EXPECT_EQ(got.stats.keys_scanned, n * nq);
      }
    }
  }
}

TEST(FlatIndexTest, LargeIndexSplitsWorkAndStillMatches) {
  const uint32_t seed = 99;
  std::mt19937 rng(seed);
  const int32_t d = 128;
  const int64_t n = 40000, nq = 13;  // several key ranges and query blocks
  const std::vector<uint16_t> keys = RandomHalves(rng, n * d);
  const std::vector<float> q = RandomFloats(rng, nq * d);
  const VectorView view{keys.data(), n, d, DType::kF16, 0};
  KVR_ASSERT_OK_AND_ASSIGN(auto index, FlatIndex::Build(view, FlatOptions()));
  SearchParams params;
  params.num_threads = 4;
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got,
                           index->Search(VectorView::F32(q.data(), nq, d), 100, params));
  const SearchResult expected = BruteForce(view, q, nq, 100);
  EXPECT_EQ(got.ids, expected.ids) << "seed " << seed;
  EXPECT_EQ(got.scores, expected.scores) << "seed " << seed;
}

TEST(FlatIndexTest, HonoursExcludeRangesAndCountsScannedKeys) {
  const uint32_t seed = 7;
  std::mt19937 rng(seed);
  const int32_t d = 32;
  const int64_t n = 5000, nq = 3;
  const std::vector<float> keys = RandomFloats(rng, n * d);
  const std::vector<float> q = RandomFloats(rng, nq * d);
  const VectorView view = VectorView::F32(keys.data(), n, d);
  KVR_ASSERT_OK_AND_ASSIGN(auto index, FlatIndex::Build(view, FlatOptions()));
  SearchParams params;
  params.num_threads = 1;  // one key range: chunks start at multiples of 1024
  // A partial chunk, a whole 1024-key chunk and the tail.
  params.exclude = {{3, 100}, {1024, 2048}, {4500, 6000}};
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got,
                           index->Search(VectorView::F32(q.data(), nq, d), 40, params));
  const SearchResult expected = BruteForce(view, q, nq, 40, params.exclude);
  EXPECT_EQ(got.ids, expected.ids) << "seed " << seed;
  for (int64_t id : got.ids) {
    EXPECT_FALSE((id >= 3 && id < 100) || (id >= 1024 && id < 2048) || id >= 4500);
  }
  // The fully excluded chunk [1024, 2048) is skipped; the others are scored.
  EXPECT_EQ(got.stats.keys_scanned, (n - 1024) * nq);
}

TEST(FlatIndexTest, PadsWhenFewerThanKQualifyAndBreaksTiesBySmallerId) {
  const int32_t d = 16;
  std::vector<float> keys(5 * d, 1.0f);  // five identical keys
  KVR_ASSERT_OK_AND_ASSIGN(auto index,
                           FlatIndex::Build(VectorView::F32(keys.data(), 5, d), FlatOptions()));
  std::vector<float> q(d, 0.5f);
  SearchParams params;
  params.exclude = {{1, 2}};
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got,
                           index->Search(VectorView::F32(q.data(), 1, d), 6, params));
  EXPECT_THAT(got.ids, ::testing::ElementsAre(0, 2, 3, 4, -1, -1));
  EXPECT_EQ(got.scores[0], 8.0f);
  EXPECT_TRUE(std::isinf(got.scores[5]) && got.scores[5] < 0);
}

TEST(FlatIndexTest, AddEqualsBuildingWithAllKeys) {
  const uint32_t seed = 31;
  std::mt19937 rng(seed);
  const int32_t d = 48;
  const int64_t n = 1000;
  const std::vector<uint16_t> keys = RandomHalves(rng, n * d);
  const std::vector<float> q = RandomFloats(rng, 4 * d);
  KVR_ASSERT_OK_AND_ASSIGN(
      auto all, FlatIndex::Build(VectorView{keys.data(), n, d, DType::kF16, 0}, FlatOptions()));
  KVR_ASSERT_OK_AND_ASSIGN(
      auto grown, FlatIndex::Build(VectorView{keys.data(), 333, d, DType::kF16, 0}, FlatOptions()));
  KVR_ASSERT_OK(grown->Add(VectorView{keys.data() + 333 * d, 1, d, DType::kF16, 0}));
  KVR_ASSERT_OK(grown->Add(VectorView{keys.data() + 334 * d, n - 334, d, DType::kF16, 0}));
  EXPECT_EQ(grown->size(), n);
  KVR_ASSERT_OK_AND_ASSIGN(auto a, all->Search(VectorView::F32(q.data(), 4, d), 20, {}));
  KVR_ASSERT_OK_AND_ASSIGN(auto b, grown->Search(VectorView::F32(q.data(), 4, d), 20, {}));
  EXPECT_EQ(a.ids, b.ids) << "seed " << seed;
  EXPECT_EQ(a.scores, b.scores);
  // Another dtype or dim is rejected and changes nothing.
  std::vector<float> f32(d);
  EXPECT_THAT(grown->Add(VectorView::F32(f32.data(), 1, d)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(grown->Add(VectorView{keys.data(), 1, d - 1, DType::kF16, 0}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(grown->size(), n);
}

TEST(FlatIndexTest, SerializeLoadRoundTripsAndDetectsCorruption) {
  std::mt19937 rng(3);
  const int32_t d = 32;
  const int64_t n = 300;
  const std::vector<uint16_t> keys = RandomHalves(rng, n * d);
  const std::vector<float> q = RandomFloats(rng, 2 * d);
  FlatOptions options;
  options.store_f32 = true;
  KVR_ASSERT_OK_AND_ASSIGN(
      auto index, FlatIndex::Build(VectorView{keys.data(), n, d, DType::kF16, 0}, options));
  KVR_ASSERT_OK_AND_ASSIGN(std::string bytes, index->Serialize());
  KVR_ASSERT_OK_AND_ASSIGN(auto decoded, DecodeIndex(bytes));
  EXPECT_EQ(decoded.first.key_dtype, DType::kF16);
  EXPECT_EQ(decoded.first.build_params.GetString("storage", ""), "f32");
  // Version + the keys in their own dtype.
  EXPECT_EQ(decoded.second.size(), 4 + static_cast<size_t>(n * d * 2));
  KVR_ASSERT_OK_AND_ASSIGN(auto loaded, FlatIndex::Load(decoded.first, decoded.second));
  EXPECT_EQ(loaded->size(), n);
  KVR_ASSERT_OK_AND_ASSIGN(auto a, index->Search(VectorView::F32(q.data(), 2, d), 10, {}));
  KVR_ASSERT_OK_AND_ASSIGN(auto b, loaded->Search(VectorView::F32(q.data(), 2, d), 10, {}));
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(a.scores, b.scores);
  EXPECT_THAT(FlatIndex::Load(decoded.first, decoded.second.substr(0, decoded.second.size() - 1))
                  .status(),
              StatusIs(absl::StatusCode::kDataLoss));
  std::string future(decoded.second);
  future[0] = 9;  // payload version 9
  EXPECT_THAT(FlatIndex::Load(decoded.first, future).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

// Found by index_load_fuzz: a header whose size x dim x element size wraps
// to the payload's key bytes (0 here: 2^55 x 157892224 x 4 = 0 mod 2^64)
// passed the length check, then AppendRows sized the tiles by the wrapped
// product and wrote through a null pointer.
TEST(FlatIndexTest, ASizeWhoseKeyBytesWrapIsDataLoss) {
  IndexHeader header;
  header.kind = "flat";
  header.dim = 157892224;
  header.size = int64_t{1} << 55;
  header.key_dtype = DType::kF32;
  const std::string version_only("\x01\x00\x00\x00", 4);
  EXPECT_THAT(FlatIndex::Load(header, version_only).status(),
              StatusIs(absl::StatusCode::kDataLoss));
}

TEST(FlatIndexTest, RejectsBadSearchInput) {
  std::vector<float> keys(10 * 8, 1.0f), q(8, 1.0f);
  KVR_ASSERT_OK_AND_ASSIGN(auto index,
                           FlatIndex::Build(VectorView::F32(keys.data(), 10, 8), FlatOptions()));
  EXPECT_THAT(index->Search(VectorView::F32(q.data(), 1, 7), 3, {}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(index->Search(VectorView::F32(q.data(), 1, 8), 0, {}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  SearchParams knob;
  knob.knobs.SetInt("ef", 10);
  EXPECT_THAT(index->Search(VectorView::F32(q.data(), 1, 8), 3, knob).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  SearchParams unsorted;
  unsorted.exclude = {{5, 6}, {1, 2}};
  EXPECT_THAT(index->Search(VectorView::F32(q.data(), 1, 8), 3, unsorted).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ParamMap bad;
  bad.Set("storage", "f64");
  EXPECT_THAT(FlatOptions::FromParams(bad).status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::index
