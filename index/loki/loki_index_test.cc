#include "index/loki/loki_index.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/half.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "index/testing/index_testing.h"
#include "index/distance.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::index::loki {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint32_t kSeed = 7301;

KeyMatrix FromFloats(const std::vector<float>& x, int64_t rows, int32_t dim, DType dtype) {
  KeyMatrix m{std::vector<char>(x.size() * DTypeSize(dtype)), rows, dim, dtype};
  ConvertFromFloat(x.data(), x.size(), dtype, m.bytes.data());
  return m;
}

// Gaussian vectors whose variance decays over a random-free basis: dimension
// j has standard deviation 4 * 0.8^j, so a few dims dominate.
KeyMatrix LowRankGaussian(int64_t rows, int32_t dim, DType dtype, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g;
  std::vector<float> x(static_cast<size_t>(rows) * dim);
  for (int64_t i = 0; i < rows; ++i) {
    for (int32_t j = 0; j < dim; ++j) x[i * dim + j] = 4.0f * std::pow(0.8f, j) * g(rng);
  }
  return FromFloats(x, rows, dim, dtype);
}

TEST(LokiIndexTest, MaxEffortEqualsBruteForceForEveryDtype) {
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBf16}) {
    SCOPED_TRACE(::testing::Message() << "seed " << kSeed << " dtype " << DTypeName(dtype));
    const KeyMatrix keys = LowRankGaussian(700, 32, dtype, kSeed);
    const KeyMatrix queries = LowRankGaussian(9, 32, dtype, kSeed + 1);
    LokiOptions options;
    options.rank = 8;
    KVR_ASSERT_OK_AND_ASSIGN(auto index, LokiIndex::Create(keys.view(), options));
    EXPECT_EQ(index->size(), 700);
    EXPECT_EQ(index->MaxSearchEffort(), 700);
    EXPECT_EQ(index->SearchEffortKnob(), "candidates");
    for (const std::vector<PositionRange>& exclude :
         {std::vector<PositionRange>{}, std::vector<PositionRange>{{0, 10}, {300, 450}, {690, 900}}}) {
      SearchParams params = SearchKnobs("candidates=700");
      params.exclude = exclude;
      KVR_ASSERT_OK_AND_ASSIGN(SearchResult got, index->Search(queries.view(), 25, params));
      const SearchResult want = BruteForceTopK(keys, queries, 25, exclude);
      EXPECT_EQ(got.ids, want.ids);
      EXPECT_EQ(got.scores, want.scores);
      int64_t eligible = 700;
      for (const auto& e : exclude) eligible -= std::min<int64_t>(e.end, 700) - e.begin;
      EXPECT_EQ(got.stats.keys_scanned, 9 * eligible);
      EXPECT_EQ(got.stats.exact_scores, 9 * eligible);
    }
  }
}

TEST(LokiIndexTest, LowRankScoringFindsTopKeysAndCountsWork) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = LowRankGaussian(4000, 64, DType::kF16, kSeed);
  const KeyMatrix queries = LowRankGaussian(32, 64, DType::kF32, kSeed + 2);
  LokiOptions options;
  options.rank = 16;
  KVR_ASSERT_OK_AND_ASSIGN(auto index, LokiIndex::Create(keys.view(), options));
  const SearchResult want = BruteForceTopK(keys, queries, 20, {});
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got, index->Search(queries.view(), 20, SearchKnobs("candidates=160")));
  // The variance is concentrated in the leading dims, so 16 of 64 rotated dims
  // rank nearly as well as all of them.
  EXPECT_GT(RecallOf(got, want), 0.95) << "seed " << kSeed;
  EXPECT_EQ(got.stats.keys_scanned, 32 * 4000);
  EXPECT_EQ(got.stats.exact_scores, 32 * 160);
  for (int64_t qi = 0; qi < 32; ++qi) {
    for (int j = 0; j < 20; ++j) {  // exact scores of the returned ids, descending
      const int64_t id = got.ids[qi * 20 + j];
      std::vector<float> q(64);
      ConvertToFloat(queries.view().row(qi), DType::kF32, 64, q.data());
      EXPECT_EQ(got.scores[qi * 20 + j], DotRow(q.data(), keys.view().row(id), DType::kF16, 64));
      if (j > 0) {
        EXPECT_GE(got.scores[qi * 20 + j - 1], got.scores[qi * 20 + j]);
      }
    }
  }
  // Fewer rank dims rank worse; the default candidates (8k) still do well.
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult r2, index->Search(queries.view(), 20, SearchKnobs("rank=2,candidates=40")));
  EXPECT_LT(RecallOf(r2, want), RecallOf(got, want));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult def, index->Search(queries.view(), 20, {}));
  EXPECT_EQ(def.stats.exact_scores, 32 * 160);
  // One thread gives the same result as the pool.
  SearchParams one = SearchKnobs("candidates=160");
  one.num_threads = 1;
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult serial, index->Search(queries.view(), 20, one));
  EXPECT_EQ(serial.ids, got.ids);
}

TEST(LokiIndexTest, LowEffortHonoursExcludeRanges) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = LowRankGaussian(1000, 32, DType::kF32, kSeed);
  const KeyMatrix queries = LowRankGaussian(16, 32, DType::kF32, kSeed + 3);
  KVR_ASSERT_OK_AND_ASSIGN(auto index, LokiIndex::Create(keys.view(), {}));
  SearchParams params = SearchKnobs("candidates=30");
  params.exclude = {{0, 400}, {500, 990}};
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got, index->Search(queries.view(), 10, params));
  for (int64_t id : got.ids) {
    EXPECT_TRUE((id >= 400 && id < 500) || id >= 990) << id;
  }
  // Whole 16-key tiles are scored: 400..512 and 976..1000.
  EXPECT_EQ(got.stats.keys_scanned, 16 * (112 + 24));
  // Fewer eligible keys than k: padded with -1 / -inf.
  params.exclude = {{0, 995}};
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult few, index->Search(queries.view(), 10, params));
  for (int64_t qi = 0; qi < 16; ++qi) {
    std::set<int64_t> first(few.ids.begin() + qi * 10, few.ids.begin() + qi * 10 + 5);
    EXPECT_EQ(first, (std::set<int64_t>{995, 996, 997, 998, 999}));
    EXPECT_EQ(few.ids[qi * 10 + 5], -1);
  }
  EXPECT_TRUE(std::isinf(few.scores[9]));
}

TEST(LokiIndexTest, RejectsBadSearchInput) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = LowRankGaussian(100, 16, DType::kF32, kSeed);
  const KeyMatrix queries = LowRankGaussian(2, 16, DType::kF32, kSeed);
  const KeyMatrix wrong = LowRankGaussian(2, 8, DType::kF32, kSeed);
  KVR_ASSERT_OK_AND_ASSIGN(auto index, LokiIndex::Create(keys.view(), {}));
  EXPECT_EQ(index->rank(), 4);
  EXPECT_THAT(index->Search(wrong.view(), 5, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(index->Search(queries.view(), 0, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(index->Search(queries.view(), 5, SearchKnobs("ef=3")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'ef'")));
  EXPECT_THAT(index->Search(queries.view(), 5, SearchKnobs("rank=5")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(index->Search(queries.view(), 5, SearchKnobs("candidates=0")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  SearchParams bad;
  bad.exclude = {{10, 20}, {15, 30}};
  EXPECT_THAT(index->Search(queries.view(), 5, bad), StatusIs(absl::StatusCode::kInvalidArgument));
  bad.exclude = {{20, 10}};
  EXPECT_THAT(index->Search(queries.view(), 5, bad), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(LokiIndexTest, AddEqualsBuildingAtOnce) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = LowRankGaussian(900, 32, DType::kBf16, kSeed);
  const KeyMatrix queries = LowRankGaussian(8, 32, DType::kBf16, kSeed + 4);
  KVR_ASSERT_OK_AND_ASSIGN(auto whole, LokiIndex::Create(keys.view(), {}));
  LokiOptions with_basis;
  with_basis.basis = whole->basis();
  KVR_ASSERT_OK_AND_ASSIGN(auto grown, LokiIndex::Create(keys.slice(0, 500), with_basis));
  KVR_ASSERT_OK(grown->Add(keys.slice(500, 899)));
  KVR_ASSERT_OK(grown->Add(keys.slice(899, 900)));
  EXPECT_EQ(grown->size(), 900);
  for (const char* knobs : {"candidates=50", "candidates=900"}) {
    KVR_ASSERT_OK_AND_ASSIGN(SearchResult a, whole->Search(queries.view(), 12, SearchKnobs(knobs)));
    KVR_ASSERT_OK_AND_ASSIGN(SearchResult b, grown->Search(queries.view(), 12, SearchKnobs(knobs)));
    EXPECT_EQ(a.ids, b.ids) << knobs;
    EXPECT_EQ(a.scores, b.scores) << knobs;
  }
  // Bad adds change nothing.
  const KeyMatrix other_dim = LowRankGaussian(3, 16, DType::kBf16, kSeed);
  const KeyMatrix other_dtype = LowRankGaussian(3, 32, DType::kF32, kSeed);
  EXPECT_THAT(grown->Add(other_dim.view()), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(grown->Add(other_dtype.view()), StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<float> nan(32, std::nanf(""));
  const KeyMatrix nan_keys = FromFloats(nan, 1, 32, DType::kBf16);
  EXPECT_THAT(grown->Add(nan_keys.view()), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(grown->size(), 900);
}

TEST(LokiIndexTest, CreateValidatesOptions) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = LowRankGaussian(50, 16, DType::kF32, kSeed);
  LokiOptions options;
  options.rank = 17;
  EXPECT_THAT(LokiIndex::Create(keys.view(), options), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(LokiIndex::Create(keys.slice(0, 0), {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no keys")));
  const KeyMatrix other = LowRankGaussian(50, 8, DType::kF32, kSeed);
  KVR_ASSERT_OK_AND_ASSIGN(PcaBasis b8, FitPcaBasis(other.view(), {}));
  options = {};
  options.basis = b8;
  EXPECT_THAT(LokiIndex::Create(keys.view(), options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dimension")));
  // An empty index with a basis is fine and grows by Add.
  options.basis = FitPcaBasis(keys.view(), {}).value();
  KVR_ASSERT_OK_AND_ASSIGN(auto empty, LokiIndex::Create(keys.slice(0, 0), options));
  EXPECT_EQ(empty->size(), 0);
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult none, empty->Search(keys.slice(0, 2), 3, {}));
  EXPECT_EQ(none.ids, std::vector<int64_t>(6, -1));
  KVR_ASSERT_OK(empty->Add(keys.view()));
  EXPECT_EQ(empty->size(), 50);
  LokiOptions cancel;
  cancel.progress = [](const Progress&) { return false; };
  EXPECT_THAT(LokiIndex::Create(keys.view(), cancel), StatusIs(absl::StatusCode::kCancelled));
}

TEST(LokiIndexTest, OptionsFromBuildParamsAndArtifacts) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = LowRankGaussian(300, 16, DType::kF32, kSeed);
  KVR_ASSERT_OK_AND_ASSIGN(PcaBasis b, FitPcaBasis(keys.view(), {}));
  b.layer = 3;
  b.kv_head = 1;
  PcaBasis other = b;
  other.kv_head = 0;
  const std::string artifact = SerializePcaBases({other, b});
  KVR_ASSERT_OK_AND_ASSIGN(
      LokiOptions options,
      LokiOptions::FromBuild(*ParamMap::Parse("rank=6,layer=3,kv_head=1"), {{"loki_basis", artifact}}));
  EXPECT_EQ(options.rank, 6);
  ASSERT_TRUE(options.basis.has_value());
  EXPECT_EQ(options.basis->kv_head, 1);
  KVR_ASSERT_OK_AND_ASSIGN(auto index, LokiIndex::Create(keys.view(), options));
  EXPECT_EQ(index->build_params().GetString("basis", ""), "artifact");
  EXPECT_EQ(*index->build_params().GetInt("rank", 0), 6);
  EXPECT_THAT(LokiOptions::FromBuild(*ParamMap::Parse("rnak=6"), {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("rnak")));
  EXPECT_THAT(LokiOptions::FromBuild({}, {{"loki_basis", artifact}}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(LokiOptions::FromBuild({}, {{"loki_basis", "garbage"}}),
              StatusIs(absl::StatusCode::kDataLoss));
  KVR_ASSERT_OK_AND_ASSIGN(LokiOptions fitted, LokiOptions::FromBuild({}, {{"other", "x"}}));
  EXPECT_FALSE(fitted.basis.has_value());
}

TEST(LokiIndexTest, SerializeLoadRoundTrip) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = LowRankGaussian(600, 32, DType::kF16, kSeed);
  const KeyMatrix queries = LowRankGaussian(5, 32, DType::kF16, kSeed + 5);
  KVR_ASSERT_OK_AND_ASSIGN(auto index, LokiIndex::Create(keys.view(), {}));
  KVR_ASSERT_OK_AND_ASSIGN(std::string bytes, index->Serialize());
  KVR_ASSERT_OK_AND_ASSIGN(auto loaded, LokiIndex::Load(bytes));
  EXPECT_EQ(loaded->size(), 600);
  EXPECT_EQ(loaded->rank(), 8);
  EXPECT_EQ(loaded->build_params(), index->build_params());
  EXPECT_EQ(loaded->IndexBytes(), index->IndexBytes());
  EXPECT_EQ(loaded->KeyBytes(), 600 * 32 * 2);
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult a, index->Search(queries.view(), 10, SearchKnobs("candidates=40")));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult b, loaded->Search(queries.view(), 10, SearchKnobs("candidates=40")));
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(a.scores, b.scores);
  std::string corrupt = bytes;
  corrupt[corrupt.size() - 100] ^= 1;
  EXPECT_THAT(LokiIndex::Load(corrupt), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(LokiIndex::Load(bytes.substr(0, bytes.size() / 2)),
              StatusIs(absl::StatusCode::kDataLoss));
}

// Real attention data: a slice of layer 3's keys (KV head 0) and later
// queries of the two query heads of its group.
TEST(LokiIndexTest, MaxEffortEqualsBruteForceOnRealCaptures) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const std::string dir = kvrecall::testing::SharedDir() + "/data/attn-dev/";
  auto k = ReadNpy(dir + "layer03_k.npy");
  auto q = ReadNpy(dir + "layer03_q.npy");
  if (!k.ok() || !q.ok()) KVR_SKIP_WITHOUT_SHARED_DATA("attention captures not found under " << dir);
  ASSERT_EQ(k->descr, "<f2");
  ASSERT_EQ(k->shape, (std::vector<int64_t>{2, 8192, 128}));
  const int64_t n = 2048;
  KeyMatrix keys{std::vector<char>(k->data.data(), k->data.data() + n * 128 * 2), n, 128, DType::kF16};
  // Queries at positions 2048..2063 of query heads 0 and 1.
  KeyMatrix queries{{}, 32, 128, DType::kF16};
  for (int h = 0; h < 2; ++h) {
    const char* base = q->data.data() + (h * 8192 + 2048) * 128 * 2;
    queries.bytes.insert(queries.bytes.end(), base, base + 16 * 128 * 2);
  }
  KVR_ASSERT_OK_AND_ASSIGN(auto index, LokiIndex::Create(keys.view(), {}));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got,
                           index->Search(queries.view(), 41, SearchKnobs("candidates=2048")));
  const SearchResult want = BruteForceTopK(keys, queries, 41, {});
  EXPECT_EQ(got.ids, want.ids);
  EXPECT_EQ(got.scores, want.scores);
  // At the default effort (8k candidates, r = 32) most of the exact top keys are found.
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult approx, index->Search(queries.view(), 41, {}));
  EXPECT_GT(RecallOf(approx, want), 0.8);
}

}  // namespace
}  // namespace kvrecall::index::loki
