#include "index/faiss/faiss_index.h"

#include <random>
#include <set>
#include <vector>

#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "index/flat/flat_index.h"
#include "index/testing/index_testing.h"
#include "index/testing/synthetic_attention.h"
#include "common/npy.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::index {
namespace {

using ::kvrecall::testing::StatusIs;

struct Data {
  SyntheticAttention s;
  std::vector<uint16_t> keys;  // [n, d] bf16
  VectorView key_view(int64_t rows) const {
    return VectorView{keys.data(), rows, s.dim, DType::kBf16, 0};
  }
  VectorView queries() const {
    return VectorView::F32(s.decode_queries.data(), s.num_query_heads * s.num_decode_queries,
                           s.dim);
  }
};

Data MakeData(int64_t n, uint64_t seed) {
  SyntheticAttentionOptions o;
  o.num_keys = n;
  o.dim = 32;
  o.latent_rank = 8;
  o.nuisance_rank = 8;
  o.num_decode_queries = 24;
  o.seed = seed;
  Data d{GenerateSyntheticAttention(o).value(), {}};
  d.keys.resize(d.s.keys.size());
  for (size_t i = 0; i < d.keys.size(); ++i) d.keys[i] = FloatToBf16(d.s.keys[i]);
  return d;
}

class FaissIndexTest : public ::testing::TestWithParam<FaissKind> {
 protected:
  FaissOptions Options() const {
    FaissOptions o;
    o.kind = GetParam();
    o.hnsw_m = 16;
    o.ef_construction = 80;
    return o;
  }
};

TEST_P(FaissIndexTest, MaxEffortIsExactlyFlatAndLowEffortScansLess) {
  const uint64_t seed = 21;
  const Data data = MakeData(2500, seed);
  KVR_ASSERT_OK_AND_ASSIGN(auto index, FaissIndex::Build(data.key_view(2500), Options()));
  KVR_ASSERT_OK_AND_ASSIGN(auto flat, FlatIndex::Build(data.key_view(2500), FlatOptions()));
  const std::string knob(index->SearchEffortKnob());
  EXPECT_EQ(knob, GetParam() == FaissKind::kHnsw ? "ef" : "nprobe");
  for (const std::vector<PositionRange>& exclude :
       {std::vector<PositionRange>{}, std::vector<PositionRange>{{0, 8}, {2000, 2500}}}) {
    SearchParams params;
    params.exclude = exclude;
    KVR_ASSERT_OK_AND_ASSIGN(SearchResult exact, flat->Search(data.queries(), 20, params));
    params.knobs.SetInt(knob, index->MaxSearchEffort());
    KVR_ASSERT_OK_AND_ASSIGN(SearchResult full, index->Search(data.queries(), 20, params));
    EXPECT_EQ(full.ids, exact.ids) << "seed " << seed;
    EXPECT_EQ(full.scores, exact.scores) << "seed " << seed;
    params.knobs = ParamMap();
    params.knobs.SetInt(knob, GetParam() == FaissKind::kHnsw ? 100 : 16);
    KVR_ASSERT_OK_AND_ASSIGN(SearchResult approx, index->Search(data.queries(), 20, params));
    // A working ANN search (these OOD-unaware baselines need a lot of
    // effort for high recall; bench/index measures how much).
    EXPECT_GE(RecallOf(approx, exact), 0.5) << "seed " << seed;
    EXPECT_GT(approx.stats.keys_scanned, 0);
    EXPECT_LT(approx.stats.keys_scanned, full.stats.keys_scanned);
    for (int64_t id : approx.ids) {
      for (const PositionRange& r : exclude) EXPECT_FALSE(id >= r.begin && id < r.end) << id;
    }
  }
}

TEST_P(FaissIndexTest, AddSerializeLoadKeepExactness) {
  const Data data = MakeData(1200, 22);
  KVR_ASSERT_OK_AND_ASSIGN(auto index, FaissIndex::Build(data.key_view(1000), Options()));
  VectorView rest = data.key_view(200);
  rest.data = data.keys.data() + 1000 * data.s.dim;
  KVR_ASSERT_OK(index->Add(rest));
  EXPECT_EQ(index->size(), 1200);
  std::vector<float> wrong(data.s.dim);
  EXPECT_THAT(index->Add(VectorView::F32(wrong.data(), 1, data.s.dim)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  KVR_ASSERT_OK_AND_ASSIGN(std::string bytes, index->Serialize());
  KVR_ASSERT_OK_AND_ASSIGN(auto decoded, DecodeIndex(bytes));
  KVR_ASSERT_OK_AND_ASSIGN(auto loaded, FaissIndex::Load(decoded.first, decoded.second));
  EXPECT_EQ(loaded->kind(), index->kind());
  EXPECT_EQ(loaded->MaxSearchEffort(), index->MaxSearchEffort());
  KVR_ASSERT_OK_AND_ASSIGN(auto flat, FlatIndex::Build(data.key_view(1200), FlatOptions()));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult exact, flat->Search(data.queries(), 10, {}));
  SearchParams max;
  max.knobs.SetInt(std::string(loaded->SearchEffortKnob()), loaded->MaxSearchEffort());
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult a, loaded->Search(data.queries(), 10, max));
  EXPECT_EQ(a.ids, exact.ids);
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult b, index->Search(data.queries(), 10, {}));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult c, loaded->Search(data.queries(), 10, {}));
  EXPECT_EQ(b.ids, c.ids);
  // A damaged FAISS blob is DATA_LOSS, not a crash.
  std::string payload(decoded.second);
  payload.replace(12, 8, "garbage!");  // inside FAISS's own bytes
  EXPECT_THAT(FaissIndex::Load(decoded.first, payload).status(),
              StatusIs(absl::StatusCode::kDataLoss));
}

// A faiss_ivf payload whose inverted lists name ids past ntotal, found by
// fuzz/index_load_fuzz.cc (a search then read keys past their end): loading
// it is DATA_LOSS. The file is the fuzzer's structured input: kind byte, dim
// (i32), size (i64), payload.
TEST(FaissIndexLoadTest, IdsPastTheStoredKeysAreDataLoss) {
  KVR_ASSERT_OK_AND_ASSIGN(
      std::string input,
      ReadFileToString(testing::SourceDir() +
                       "/fuzz/corpus/index_load/regression-faiss-id-past-ntotal"));
  ASSERT_GT(input.size(), 13u);
  IndexHeader header;
  header.kind = "faiss_ivf";
  std::memcpy(&header.dim, input.data() + 1, 4);
  std::memcpy(&header.size, input.data() + 5, 8);
  EXPECT_THAT(FaissIndex::Load(header, absl::string_view(input).substr(13)).status(),
              StatusIs(absl::StatusCode::kDataLoss, ::testing::HasSubstr("inconsistent")));
}

INSTANTIATE_TEST_SUITE_P(Kinds, FaissIndexTest,
                         ::testing::Values(FaissKind::kHnsw, FaissKind::kIvf),
                         [](const ::testing::TestParamInfo<FaissKind>& info) {
                           return info.param == FaissKind::kHnsw ? "Hnsw" : "Ivf";
                         });

TEST(FaissOptionsTest, RejectsUnknownAndOutOfRange) {
  ParamMap p;
  p.SetInt("nprobe", 3);
  EXPECT_THAT(FaissOptions::FromParams("faiss_ivf", p).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ParamMap m;
  m.SetInt("m", 1000);
  EXPECT_THAT(FaissOptions::FromParams("faiss_hnsw", m).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(FaissOptions::FromParams("faiss_pq", ParamMap()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const Data data = MakeData(50, 1);
  FaissOptions ivf;
  ivf.kind = FaissKind::kIvf;
  ivf.nlist = 100;  // more lists than keys
  EXPECT_THAT(FaissIndex::Build(data.key_view(50), ivf).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ivf.nlist = 0;
  EXPECT_THAT(FaissIndex::Build(data.key_view(0), ivf).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  KVR_ASSERT_OK_AND_ASSIGN(auto index, FaissIndex::Build(data.key_view(50), ivf));
  SearchParams knob;
  knob.knobs.SetInt("ef", 5);
  EXPECT_THAT(index->Search(data.queries(), 3, knob).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::index
