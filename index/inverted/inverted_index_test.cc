#include "index/inverted/inverted_index.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "index/testing/index_testing.h"
#include "index/distance.h"
#include "index/index_format.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::index::inverted {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint32_t kSeed = 4409;

// Keys that are sparse positive mixtures of a hidden dictionary (what a
// sparse encoder can capture) and queries aligned with single atoms.
struct SparseData {
  KeyMatrix keys, queries;
};

SparseData MakeSparseData(int64_t n, int64_t m, int32_t d, DType dtype, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g;
  const int32_t atoms = 32;
  std::vector<float> dict(static_cast<size_t>(atoms) * d);
  for (int32_t a = 0; a < atoms; ++a) {
    double norm = 0;
    for (int32_t j = 0; j < d; ++j) norm += std::pow(dict[a * d + j] = g(rng), 2);
    for (int32_t j = 0; j < d; ++j) dict[a * d + j] /= static_cast<float>(std::sqrt(norm));
  }
  std::uniform_int_distribution<int32_t> pick(0, atoms - 1);
  std::uniform_real_distribution<float> coef(0.5f, 3.0f);
  std::vector<float> k(static_cast<size_t>(n) * d), q(static_cast<size_t>(m) * d);
  for (int64_t i = 0; i < n; ++i) {
    for (int32_t j = 0; j < d; ++j) k[i * d + j] = 0.05f * g(rng);
    for (int t = 0; t < 2; ++t) {
      const int32_t a = pick(rng);
      const float c = coef(rng);
      for (int32_t j = 0; j < d; ++j) k[i * d + j] += c * dict[a * d + j];
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    const int32_t a = pick(rng);
    for (int32_t j = 0; j < d; ++j) q[i * d + j] = 4.0f * dict[a * d + j] + 0.3f * g(rng);
  }
  SparseData data;
  data.keys = KeyMatrix{std::vector<char>(k.size() * DTypeSize(dtype)), n, d, dtype};
  ConvertFromFloat(k.data(), k.size(), dtype, data.keys.bytes.data());
  data.queries = KeyMatrix{std::vector<char>(q.size() * DTypeSize(dtype)), m, d, dtype};
  ConvertFromFloat(q.data(), q.size(), dtype, data.queries.bytes.data());
  return data;
}

InvertedOptions SmallOptions() {
  InvertedOptions o;
  o.train.num_features = 64;
  o.train.k = 4;
  o.train.epochs = 6;
  o.train.batch_size = 64;
  o.train.learning_rate = 3e-3;
  o.train.seed = kSeed;
  return o;
}

TEST(InvertedIndexTest, MaxEffortEqualsBruteForceForEveryDtype) {
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBf16}) {
    SCOPED_TRACE(::testing::Message() << "seed " << kSeed << " dtype " << DTypeName(dtype));
    const SparseData data = MakeSparseData(600, 6, 16, dtype, kSeed);
    KVR_ASSERT_OK_AND_ASSIGN(auto index,
                             InvertedIndex::Create(data.keys.view(), VectorView::Empty(16), SmallOptions()));
    EXPECT_EQ(index->size(), 600);
    EXPECT_EQ(index->MaxSearchEffort(), 600);
    EXPECT_EQ(index->SearchEffortKnob(), "candidates");
    EXPECT_GT(index->posting_entries(), 600);
    EXPECT_LE(index->posting_entries(), 600 * 4);
    for (const std::vector<PositionRange>& exclude :
         {std::vector<PositionRange>{}, std::vector<PositionRange>{{0, 50}, {200, 201}, {590, 700}}}) {
      SearchParams params = SearchKnobs("candidates=600");
      params.exclude = exclude;
      KVR_ASSERT_OK_AND_ASSIGN(SearchResult got, index->Search(data.queries.view(), 20, params));
      const SearchResult want = BruteForceTopK(data.keys, data.queries, 20, exclude);
      EXPECT_EQ(got.ids, want.ids);
      EXPECT_EQ(got.scores, want.scores);
      EXPECT_EQ(got.stats.visited, 0);  // no posting list read
    }
  }
}

TEST(InvertedIndexTest, CoActivationFindsTopKeys) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const SparseData data = MakeSparseData(3000, 24, 16, DType::kF16, kSeed);
  InvertedOptions options = SmallOptions();
  options.train.epochs = 10;
  KVR_ASSERT_OK_AND_ASSIGN(auto index,
                           InvertedIndex::Create(data.keys.view(), VectorView::Empty(16), options));
  const SearchResult want = BruteForceTopK(data.keys, data.queries, 10, {});
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got,
                           index->Search(data.queries.view(), 10, SearchKnobs("candidates=80,query_features=8")));
  // Each query is aligned with one atom; the features that reconstruct that
  // atom lead straight to the keys containing it.
  EXPECT_GT(RecallOf(got, want), 0.8) << "seed " << kSeed;
  EXPECT_GT(got.stats.visited, 0);
  EXPECT_LT(got.stats.visited, 24 * index->posting_entries());
  EXPECT_EQ(got.stats.keys_scanned, 24 * 80);
  EXPECT_EQ(got.stats.exact_scores, 24 * 80);
  // More candidates are never worse here, and idf/encode modes run.
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult more,
                           index->Search(data.queries.view(), 10, SearchKnobs("candidates=400,query_features=8")));
  EXPECT_GE(RecallOf(more, want), RecallOf(got, want));
  KVR_EXPECT_OK(index->Search(data.queries.view(), 10, SearchKnobs("idf=1")).status());
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult enc, index->Search(data.queries.view(), 10, SearchKnobs("query_mode=encode")));
  EXPECT_EQ(enc.stats.keys_scanned, 24 * 80);
  SearchParams one = SearchKnobs("candidates=80,query_features=8");
  one.num_threads = 1;
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult serial, index->Search(data.queries.view(), 10, one));
  EXPECT_EQ(serial.ids, got.ids);
  EXPECT_EQ(serial.stats.visited, got.stats.visited);
}

TEST(InvertedIndexTest, FillsWithRecentPositionsAndHonoursExcludes) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const SparseData data = MakeSparseData(500, 4, 16, DType::kF32, kSeed);
  KVR_ASSERT_OK_AND_ASSIGN(auto index,
                           InvertedIndex::Create(data.keys.view(), VectorView::Empty(16), SmallOptions()));
  // One query feature touches few positions; 450 candidates need the fill.
  SearchParams params = SearchKnobs("candidates=450,query_features=1");
  params.exclude = {{100, 200}};
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got, index->Search(data.queries.view(), 30, params));
  const SearchResult want = BruteForceTopK(data.keys, data.queries, 30, params.exclude);
  EXPECT_EQ(got.stats.exact_scores, 4 * 400);
  for (int64_t id : got.ids) EXPECT_TRUE(id < 100 || id >= 200) << id;
  EXPECT_GT(RecallOf(got, want), 0.7);
  params = SearchKnobs("candidates=5");
  params.exclude = {{0, 490}};
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult few, index->Search(data.queries.view(), 5, params));
  for (int64_t id : few.ids) EXPECT_GE(id, 490);
}

TEST(InvertedIndexTest, AddEqualsBuildingAtOnce) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const SparseData data = MakeSparseData(400, 3, 16, DType::kBf16, kSeed);
  KVR_ASSERT_OK_AND_ASSIGN(auto first,
                           InvertedIndex::Create(data.keys.view(), VectorView::Empty(16), SmallOptions()));
  InvertedOptions shared;
  shared.encoder = first->shared_encoder();
  KVR_ASSERT_OK_AND_ASSIGN(auto whole,
                           InvertedIndex::Create(data.keys.view(), VectorView::Empty(16), shared));
  KVR_ASSERT_OK_AND_ASSIGN(auto grown,
                           InvertedIndex::Create(data.keys.slice(0, 150), VectorView::Empty(16), shared));
  KVR_ASSERT_OK(grown->Add(data.keys.slice(150, 399)));
  KVR_ASSERT_OK(grown->Add(data.keys.slice(399, 400)));
  EXPECT_EQ(*grown->Serialize(), *whole->Serialize());
  const KeyMatrix wrong = MakeSparseData(2, 1, 16, DType::kF32, kSeed).keys;
  EXPECT_THAT(grown->Add(wrong.view()), StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<uint16_t> nan(16, FloatToBf16(std::nanf("")));
  EXPECT_THAT(grown->Add(VectorView{nan.data(), 1, 16, DType::kBf16, 0}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(*grown->Serialize(), *whole->Serialize());
}

TEST(InvertedIndexTest, SpansRespectBudgetWindowsAndExcludes) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const SparseData data = MakeSparseData(800, 2, 16, DType::kF32, kSeed);
  KVR_ASSERT_OK_AND_ASSIGN(auto index,
                           InvertedIndex::Create(data.keys.view(), VectorView::Empty(16), SmallOptions()));
  for (int64_t window : {0, 3, 20}) {
    for (int64_t budget : {1, 17, 100}) {
      SearchParams params = SearchKnobs(absl::StrCat("window=", window));
      params.exclude = {{300, 400}};
      KVR_ASSERT_OK_AND_ASSIGN(SpanResult r, index->SearchSpans(data.queries.view(), budget, params));
      int64_t tokens = 0;
      for (size_t i = 0; i < r.spans.size(); ++i) {
        const Span& s = r.spans[i];
        EXPECT_LT(s.begin, s.end);
        EXPECT_TRUE(s.end <= 300 || s.begin >= 400) << s.begin << ".." << s.end;
        if (i > 0) {
          EXPECT_LT(r.spans[i - 1].end, s.begin);  // disjoint, merged, ordered
        }
        tokens += s.end - s.begin;
      }
      EXPECT_EQ(tokens, r.tokens);
      EXPECT_EQ(r.tokens, budget) << "window " << window;  // plenty of scored positions
      EXPECT_GT(r.stats.visited, 0);
    }
  }
  // Window 0: the spans are the best-scoring single positions, so the top
  // token-level candidate of Search (by co-activation) is covered.
  KVR_ASSERT_OK_AND_ASSIGN(SpanResult zero, index->SearchSpans(data.queries.slice(0, 1), 1, SearchKnobs("window=0")));
  ASSERT_EQ(zero.spans.size(), 1u);
  EXPECT_EQ(zero.spans[0].end - zero.spans[0].begin, 1);
  EXPECT_GT(zero.spans[0].score, 0);
  KVR_ASSERT_OK_AND_ASSIGN(SpanResult none, index->SearchSpans(data.queries.view(), 0, {}));
  EXPECT_TRUE(none.spans.empty());
  EXPECT_THAT(index->SearchSpans(data.queries.view(), -1, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(index->SearchSpans(data.queries.view(), 5, SearchKnobs("candidates=3")),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(InvertedIndexTest, RejectsBadInput) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const SparseData data = MakeSparseData(200, 2, 16, DType::kF32, kSeed);
  KVR_ASSERT_OK_AND_ASSIGN(auto index,
                           InvertedIndex::Create(data.keys.view(), VectorView::Empty(16), SmallOptions()));
  const KeyMatrix wrong = MakeSparseData(2, 2, 8, DType::kF32, kSeed).queries;
  EXPECT_THAT(index->Search(wrong.view(), 3, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(index->Search(data.queries.view(), 0, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(index->Search(data.queries.view(), 3, SearchKnobs("query_mode=magic")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("magic")));
  EXPECT_THAT(index->Search(data.queries.view(), 3, SearchKnobs("query_features=65")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(index->Search(data.queries.view(), 3, SearchKnobs("window=3")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  SearchParams overlapping;
  overlapping.exclude = {{0, 10}, {5, 12}};
  EXPECT_THAT(index->Search(data.queries.view(), 3, overlapping),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // An encoder of another dimension.
  const SparseData other = MakeSparseData(100, 1, 8, DType::kF32, kSeed);
  KVR_ASSERT_OK_AND_ASSIGN(auto small,
                           InvertedIndex::Create(other.keys.view(), VectorView::Empty(8), SmallOptions()));
  InvertedOptions mismatched;
  mismatched.encoder = small->shared_encoder();
  EXPECT_THAT(InvertedIndex::Create(data.keys.view(), VectorView::Empty(16), mismatched),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dimension")));
  EXPECT_THAT(InvertedIndex::Create(data.keys.slice(0, 1), VectorView::Empty(16), SmallOptions()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  InvertedOptions cancel = SmallOptions();
  cancel.progress = [](const Progress&) { return false; };
  EXPECT_THAT(InvertedIndex::Create(data.keys.view(), VectorView::Empty(16), cancel),
              StatusIs(absl::StatusCode::kCancelled));
}

TEST(InvertedIndexTest, OptionsFromBuildParamsAndArtifacts) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const SparseData data = MakeSparseData(300, 2, 16, DType::kF32, kSeed);
  KVR_ASSERT_OK_AND_ASSIGN(
      InvertedOptions options,
      InvertedOptions::FromBuild(*ParamMap::Parse("features=32,k=3,epochs=2,seed=9,train_queries=1"), {}));
  EXPECT_EQ(options.encoder, nullptr);
  EXPECT_EQ(options.train.num_features, 32);
  EXPECT_EQ(options.train.k, 3);
  EXPECT_TRUE(options.train_on_queries);
  // Training queries are stacked under the keys.
  KVR_ASSERT_OK_AND_ASSIGN(auto index, InvertedIndex::Create(data.keys.view(), data.queries.view(), options));
  EXPECT_EQ(index->encoder().weights().num_samples, 302);
  EXPECT_EQ(index->build_params().GetString("encoder", ""), "trained");
  EXPECT_EQ(*index->build_params().GetInt("features", 0), 32);
  const std::string artifact = SerializeSparseEncoders({&index->encoder()});
  KVR_ASSERT_OK_AND_ASSIGN(InvertedOptions from_artifact,
                           InvertedOptions::FromBuild({}, {{"sparse_encoder", artifact}}));
  ASSERT_NE(from_artifact.encoder, nullptr);
  KVR_ASSERT_OK_AND_ASSIGN(auto again,
                           InvertedIndex::Create(data.keys.view(), VectorView::Empty(16), from_artifact));
  EXPECT_EQ(again->build_params().GetString("encoder", ""), "artifact");
  EXPECT_EQ(again->posting_entries(), index->posting_entries());
  EXPECT_THAT(InvertedOptions::FromBuild(*ParamMap::Parse("kappa=3"), {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("kappa")));
  EXPECT_THAT(InvertedOptions::FromBuild({}, {{"sparse_encoder", "junk"}}),
              StatusIs(absl::StatusCode::kDataLoss));
}

TEST(InvertedIndexTest, SerializeLoadRoundTripAndCorruption) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const SparseData data = MakeSparseData(500, 4, 16, DType::kF16, kSeed);
  KVR_ASSERT_OK_AND_ASSIGN(auto index,
                           InvertedIndex::Create(data.keys.view(), VectorView::Empty(16), SmallOptions()));
  KVR_ASSERT_OK_AND_ASSIGN(std::string bytes, index->Serialize());
  KVR_ASSERT_OK_AND_ASSIGN(auto loaded, InvertedIndex::Load(bytes));
  EXPECT_EQ(loaded->size(), 500);
  EXPECT_EQ(loaded->posting_entries(), index->posting_entries());
  EXPECT_EQ(loaded->IndexBytes(), index->IndexBytes());
  EXPECT_EQ(*loaded->Serialize(), bytes);
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult a, index->Search(data.queries.view(), 8, SearchKnobs("candidates=30")));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult b, loaded->Search(data.queries.view(), 8, SearchKnobs("candidates=30")));
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(a.stats.visited, b.stats.visited);
  std::string flipped = bytes;
  flipped[flipped.size() - 10] ^= 1;
  EXPECT_THAT(InvertedIndex::Load(flipped), StatusIs(absl::StatusCode::kDataLoss));
  // A payload with a valid checksum but a posting position beyond n.
  KVR_ASSERT_OK_AND_ASSIGN(auto decoded, DecodeIndex(bytes));
  IndexHeader header = decoded.first;
  header.size = 10;  // positions up to 499 are now out of range
  std::string payload(decoded.second);
  EXPECT_THAT(InvertedIndex::Load(EncodeIndex(header, payload)),
              StatusIs(absl::StatusCode::kDataLoss));
}

TEST(InvertedIndexTest, MaxEffortEqualsBruteForceOnRealCaptures) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const std::string dir = kvrecall::testing::SharedDir() + "/data/attn-dev/";
  auto k = ReadNpy(dir + "layer07_k.npy");
  auto q = ReadNpy(dir + "layer07_q.npy");
  if (!k.ok() || !q.ok()) KVR_SKIP_WITHOUT_SHARED_DATA("attention captures not found under " << dir);
  const int64_t n = 1024;
  KeyMatrix keys{std::vector<char>(k->data.data(), k->data.data() + n * 128 * 2), n, 128, DType::kF16};
  KeyMatrix queries{{}, 16, 128, DType::kF16};
  for (int h = 0; h < 2; ++h) {
    const char* base = q->data.data() + (h * 8192 + 1024) * 128 * 2;
    queries.bytes.insert(queries.bytes.end(), base, base + 8 * 128 * 2);
  }
  InvertedOptions options;
  options.train.num_features = 256;
  options.train.k = 8;
  options.train.epochs = 2;
  KVR_ASSERT_OK_AND_ASSIGN(auto index, InvertedIndex::Create(keys.view(), VectorView::Empty(128), options));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got, index->Search(queries.view(), 20, SearchKnobs("candidates=1024")));
  const SearchResult want = BruteForceTopK(keys, queries, 20, {});
  EXPECT_EQ(got.ids, want.ids);
  EXPECT_EQ(got.scores, want.scores);
  // Co-activation candidates at a moderate effort already find part of the top.
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult approx, index->Search(queries.view(), 20, SearchKnobs("candidates=160")));
  EXPECT_GT(RecallOf(approx, want), 0.4);
}

}  // namespace
}  // namespace kvrecall::index::inverted
