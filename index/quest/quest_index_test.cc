#include "index/quest/quest_index.h"

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
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::index::quest {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint32_t kSeed = 5521;

// Keys that drift slowly with position (a random walk plus noise), so that
// pages are tight in some directions, as keys of real text are.
KeyMatrix DriftingKeys(int64_t rows, int32_t dim, DType dtype, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g;
  std::vector<float> x(static_cast<size_t>(rows) * dim);
  std::vector<float> walk(static_cast<size_t>(dim), 0.0f);
  for (int64_t i = 0; i < rows; ++i) {
    for (int32_t j = 0; j < dim; ++j) {
      walk[j] = 0.98f * walk[j] + 0.6f * g(rng);
      x[i * dim + j] = walk[j] + 0.3f * g(rng);
    }
  }
  KeyMatrix m{std::vector<char>(x.size() * DTypeSize(dtype)), rows, dim, dtype};
  ConvertFromFloat(x.data(), x.size(), dtype, m.bytes.data());
  return m;
}

// Keys the tile kernels score for the eligible runs of [0, n) when every
// eligible key is scored: the 16-key tiles covering each run, clipped to n.
int64_t TileLanes(const std::vector<PositionRange>& exclude, int64_t n) {
  int64_t lanes = 0, pos = 0;
  std::vector<PositionRange> runs;
  for (const auto& e : exclude) {
    if (std::min(e.begin, n) > pos) runs.push_back({pos, std::min(e.begin, n)});
    pos = std::max(pos, std::min(e.end, n));
  }
  if (pos < n) runs.push_back({pos, n});
  for (const auto& r : runs) lanes += std::min(n, ((r.end - 1) / 16 + 1) * 16) - r.begin / 16 * 16;
  return lanes;
}

TEST(QuestIndexTest, MaxEffortEqualsBruteForceForEveryDtype) {
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBf16}) {
    SCOPED_TRACE(::testing::Message() << "seed " << kSeed << " dtype " << DTypeName(dtype));
    const KeyMatrix keys = DriftingKeys(701, 32, dtype, kSeed);
    const KeyMatrix queries = DriftingKeys(7, 32, dtype, kSeed + 1);
    KVR_ASSERT_OK_AND_ASSIGN(auto index, QuestIndex::Create(keys.view(), {}));
    EXPECT_EQ(index->num_pages(), 44);
    EXPECT_EQ(index->MaxSearchEffort(), 44);
    EXPECT_EQ(index->SearchEffortKnob(), "pages");
    for (const std::vector<PositionRange>& exclude :
         {std::vector<PositionRange>{}, std::vector<PositionRange>{{0, 20}, {100, 333}, {690, 800}}}) {
      SearchParams params = SearchKnobs("pages=44");
      params.exclude = exclude;
      KVR_ASSERT_OK_AND_ASSIGN(SearchResult got, index->Search(queries.view(), 30, params));
      const SearchResult want = BruteForceTopK(keys, queries, 30, exclude);
      EXPECT_EQ(got.ids, want.ids);
      EXPECT_EQ(got.scores, want.scores);
      // Every eligible page: no bounds, whole tiles of keys scored exactly.
      EXPECT_EQ(got.stats.exact_scores, 7 * TileLanes(exclude, 701));
      EXPECT_EQ(got.stats.keys_scanned, 7 * TileLanes(exclude, 701));
    }
  }
}

TEST(QuestIndexTest, PageBoundsAreUpperBounds) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBf16}) {
    const KeyMatrix keys = DriftingKeys(500, 24, dtype, kSeed + 7);
    QuestOptions options;
    options.page_size = 8;
    KVR_ASSERT_OK_AND_ASSIGN(auto index, QuestIndex::Create(keys.view(), options));
    std::mt19937 rng(kSeed);
    std::normal_distribution<float> g;
    std::vector<float> q(24), bounds(static_cast<size_t>(index->num_pages()));
    for (int trial = 0; trial < 20; ++trial) {
      for (float& x : q) x = g(rng);
      index->PageUpperBounds(q.data(), bounds.data());
      for (int64_t t = 0; t < 500; ++t) {
        const float s = DotRow(q.data(), keys.view().row(t), dtype, 24);
        EXPECT_LE(s, bounds[t / 8] + 1e-4f * (1 + std::fabs(s)))
            << "seed " << kSeed << " trial " << trial << " position " << t;
      }
    }
  }
}

TEST(QuestIndexTest, TopPagesFindTopKeysAndCountWork) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = DriftingKeys(4096, 64, DType::kF16, kSeed);
  const KeyMatrix queries = DriftingKeys(16, 64, DType::kF32, kSeed + 2);
  KVR_ASSERT_OK_AND_ASSIGN(auto index, QuestIndex::Create(keys.view(), {}));
  const SearchResult want = BruteForceTopK(keys, queries, 16, {});
  double previous = 0;
  for (int pages : {1, 4, 16, 64, 255}) {
    KVR_ASSERT_OK_AND_ASSIGN(SearchResult got,
                             index->Search(queries.view(), 16, SearchKnobs(absl::StrCat("pages=", pages))));
    const double recall = RecallOf(got, want);
    EXPECT_GE(recall, previous) << "pages " << pages;  // nested page sets: no worse
    previous = recall;
    EXPECT_EQ(got.stats.visited, 16 * pages);
    EXPECT_EQ(got.stats.exact_scores, 16 * pages * 16);
    EXPECT_EQ(got.stats.keys_scanned, 16 * (pages * 16 + 2 * 256));
  }
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult all, index->Search(queries.view(), 16, SearchKnobs("pages=256")));
  EXPECT_EQ(all.ids, want.ids);
  EXPECT_EQ(all.stats.keys_scanned, 16 * 4096);
  // Slowly drifting keys make tight pages: 16 of 256 pages already hold most of
  // the exact top 16.
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult r16, index->Search(queries.view(), 16, SearchKnobs("pages=16")));
  EXPECT_GT(RecallOf(r16, want), 0.7) << "seed " << kSeed;
  // The default is 8 * ceil(k / page_size) pages; fewer than ceil(k / 16) are raised.
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult def, index->Search(queries.view(), 40, {}));
  EXPECT_EQ(def.stats.visited, 16 * 24);
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult raised, index->Search(queries.view(), 40, SearchKnobs("pages=1")));
  EXPECT_EQ(raised.stats.visited, 16 * 3);
  for (int64_t id : raised.ids) EXPECT_GE(id, 0);
  SearchParams one = SearchKnobs("pages=16");
  one.num_threads = 1;
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult serial, index->Search(queries.view(), 16, one));
  EXPECT_EQ(serial.ids, r16.ids);
}

TEST(QuestIndexTest, LowEffortHonoursExcludeRanges) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = DriftingKeys(1000, 16, DType::kF32, kSeed);
  const KeyMatrix queries = DriftingKeys(8, 16, DType::kF32, kSeed + 3);
  KVR_ASSERT_OK_AND_ASSIGN(auto index, QuestIndex::Create(keys.view(), {}));
  SearchParams params = SearchKnobs("pages=2");
  params.exclude = {{0, 405}, {410, 995}};  // pages 25 (partly), 62 (partly) remain
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got, index->Search(queries.view(), 4, params));
  for (int64_t qi = 0; qi < 8; ++qi) {
    for (int j = 0; j < 4; ++j) {
      const int64_t id = got.ids[qi * 4 + j];
      EXPECT_TRUE((id >= 405 && id < 410) || id >= 995) << id;
    }
  }
  // Both eligible pages are selected: no bounds; the tiles of the 10
  // eligible keys (400..416 and 992..1000) are scored exactly.
  EXPECT_EQ(got.stats.exact_scores, 8 * 24);
  EXPECT_EQ(got.stats.keys_scanned, 8 * 24);
  params = SearchKnobs("pages=1");
  params.exclude = {{0, 405}, {410, 995}};
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult one, index->Search(queries.view(), 4, params));
  EXPECT_EQ(one.stats.visited, 8);
  // Bounds are computed 16 pages at a time: the bound tiles of pages 16..31
  // and 48..62 (63 pages in all), two key-equivalents each.
  EXPECT_EQ(one.stats.keys_scanned, one.stats.exact_scores + 8 * 2 * (16 + 15));
}

TEST(QuestIndexTest, AddEqualsBuildingAtOnce) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = DriftingKeys(300, 16, DType::kBf16, kSeed);
  const KeyMatrix queries = DriftingKeys(6, 16, DType::kBf16, kSeed + 4);
  QuestOptions options;
  options.page_size = 16;
  KVR_ASSERT_OK_AND_ASSIGN(auto whole, QuestIndex::Create(keys.view(), options));
  KVR_ASSERT_OK_AND_ASSIGN(auto grown, QuestIndex::Create(keys.slice(0, 100), options));
  // 100 = 6 pages + 4; add within the partial page, across pages, then one by one.
  KVR_ASSERT_OK(grown->Add(keys.slice(100, 107)));
  KVR_ASSERT_OK(grown->Add(keys.slice(107, 250)));
  for (int64_t t = 250; t < 300; ++t) KVR_ASSERT_OK(grown->Add(keys.slice(t, t + 1)));
  EXPECT_EQ(grown->size(), 300);
  EXPECT_EQ(*grown->Serialize(), *whole->Serialize());
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult a, whole->Search(queries.view(), 5, SearchKnobs("pages=2")));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult b, grown->Search(queries.view(), 5, SearchKnobs("pages=2")));
  EXPECT_EQ(a.ids, b.ids);
  const KeyMatrix other_dtype = DriftingKeys(2, 16, DType::kF32, kSeed);
  EXPECT_THAT(grown->Add(other_dtype.view()), StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<uint16_t> inf(16, FloatToBf16(INFINITY));
  EXPECT_THAT(grown->Add(VectorView{inf.data(), 1, 16, DType::kBf16, 0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NaN or Inf")));
  EXPECT_EQ(*grown->Serialize(), *whole->Serialize());
}

TEST(QuestIndexTest, RejectsBadInput) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = DriftingKeys(64, 16, DType::kF32, kSeed);
  const KeyMatrix wrong = DriftingKeys(2, 8, DType::kF32, kSeed);
  QuestOptions bad_page;
  bad_page.page_size = 0;
  EXPECT_THAT(QuestIndex::Create(keys.view(), bad_page), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(QuestOptions::FromBuild(*ParamMap::Parse("page_size=0")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(QuestOptions::FromBuild(*ParamMap::Parse("pagesize=4")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("pagesize")));
  KVR_ASSERT_OK_AND_ASSIGN(QuestOptions o, QuestOptions::FromBuild(*ParamMap::Parse("page_size=8")));
  EXPECT_EQ(o.page_size, 8);
  KVR_ASSERT_OK_AND_ASSIGN(auto index, QuestIndex::Create(keys.view(), o));
  EXPECT_EQ(*index->build_params().GetInt("page_size", 0), 8);
  EXPECT_THAT(index->Search(wrong.view(), 3, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(index->Search(keys.slice(0, 2), 0, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(index->Search(keys.slice(0, 2), 3, SearchKnobs("pages=0")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(index->Search(keys.slice(0, 2), 3, SearchKnobs("candidates=3")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  SearchParams overlapping;
  overlapping.exclude = {{0, 10}, {5, 12}};
  EXPECT_THAT(index->Search(keys.slice(0, 2), 3, overlapping),
              StatusIs(absl::StatusCode::kInvalidArgument));
  QuestOptions cancel;
  cancel.progress = [](const Progress&) { return false; };
  EXPECT_THAT(QuestIndex::Create(keys.view(), cancel), StatusIs(absl::StatusCode::kCancelled));
  // An empty index answers with padding and grows.
  KVR_ASSERT_OK_AND_ASSIGN(auto empty, QuestIndex::Create(keys.slice(0, 0), {}));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult none, empty->Search(keys.slice(0, 1), 2, {}));
  EXPECT_EQ(none.ids, (std::vector<int64_t>{-1, -1}));
  KVR_ASSERT_OK(empty->Add(keys.view()));
  EXPECT_EQ(empty->num_pages(), 4);
}

TEST(QuestIndexTest, SerializeLoadRoundTrip) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const KeyMatrix keys = DriftingKeys(333, 32, DType::kF16, kSeed);
  const KeyMatrix queries = DriftingKeys(4, 32, DType::kF16, kSeed + 5);
  KVR_ASSERT_OK_AND_ASSIGN(auto index, QuestIndex::Create(keys.view(), {}));
  KVR_ASSERT_OK_AND_ASSIGN(std::string bytes, index->Serialize());
  KVR_ASSERT_OK_AND_ASSIGN(auto loaded, QuestIndex::Load(bytes));
  EXPECT_EQ(loaded->size(), 333);
  EXPECT_EQ(loaded->page_size(), 16);
  EXPECT_EQ(loaded->IndexBytes(), 2 * 2 * 16 * 32 * 2);  // max and min of 21 pages in 2 tiles
  EXPECT_EQ(*loaded->Serialize(), bytes);
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult a, index->Search(queries.view(), 7, SearchKnobs("pages=3")));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult b, loaded->Search(queries.view(), 7, SearchKnobs("pages=3")));
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(a.scores, b.scores);
  std::string corrupt = bytes;
  corrupt[corrupt.size() - 3] ^= 4;
  EXPECT_THAT(QuestIndex::Load(corrupt), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(QuestIndex::Load(bytes.substr(0, 200)), StatusIs(absl::StatusCode::kDataLoss));
}

TEST(QuestIndexTest, MaxEffortEqualsBruteForceOnRealCaptures) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const std::string dir = kvrecall::testing::SharedDir() + "/data/attn-dev/";
  auto k = ReadNpy(dir + "layer05_k.npy");
  auto q = ReadNpy(dir + "layer05_q.npy");
  if (!k.ok() || !q.ok()) KVR_SKIP_WITHOUT_SHARED_DATA("attention captures not found under " << dir);
  ASSERT_EQ(k->shape, (std::vector<int64_t>{2, 8192, 128}));
  const int64_t n = 2048;
  // KV head 1: keys [1, 0:2048), queries of heads 2 and 3 at 2048..2063.
  const char* kbase = k->data.data() + 8192 * 128 * 2;
  KeyMatrix keys{std::vector<char>(kbase, kbase + n * 128 * 2), n, 128, DType::kF16};
  KeyMatrix queries{{}, 32, 128, DType::kF16};
  for (int h = 2; h < 4; ++h) {
    const char* base = q->data.data() + (h * 8192 + 2048) * 128 * 2;
    queries.bytes.insert(queries.bytes.end(), base, base + 16 * 128 * 2);
  }
  KVR_ASSERT_OK_AND_ASSIGN(auto index, QuestIndex::Create(keys.view(), {}));
  SearchParams params = SearchKnobs("pages=128");
  params.exclude = {{0, 4}, {1900, 2048}};
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got, index->Search(queries.view(), 41, params));
  const SearchResult want = BruteForceTopK(keys, queries, 41, params.exclude);
  EXPECT_EQ(got.ids, want.ids);
  EXPECT_EQ(got.scores, want.scores);
}

}  // namespace
}  // namespace kvrecall::index::quest
