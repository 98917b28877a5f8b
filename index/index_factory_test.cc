#include "index/index_factory.h"

#include <set>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "index/testing/synthetic_attention.h"
#include "index/index_format.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::index {
namespace {

using ::kvrecall::testing::StatusIs;

struct Data {
  SyntheticAttention s;
  std::vector<uint16_t> keys;  // [n, d] f16
  VectorView key_view() const { return VectorView{keys.data(), s.num_keys, s.dim, DType::kF16, 0}; }
  VectorView training() const {
    return VectorView::F32(s.prefill_queries.data(), s.num_query_heads * s.num_keys, s.dim);
  }
  VectorView queries() const {
    return VectorView::F32(s.decode_queries.data(), s.num_query_heads * s.num_decode_queries,
                           s.dim);
  }
};

const Data& TestData() {
  static const Data* data = [] {
    SyntheticAttentionOptions o;
    o.num_keys = 1500;
    o.dim = 64;
    o.latent_rank = 16;
    o.nuisance_rank = 16;
    o.num_decode_queries = 16;
    o.seed = 77;
    auto* d = new Data{GenerateSyntheticAttention(o).value(), {}};
    d->keys.resize(d->s.keys.size());
    for (size_t i = 0; i < d->keys.size(); ++i) d->keys[i] = FloatToHalf(d->s.keys[i]);
    return d;
  }();
  return *data;
}

TEST(IndexFactoryTest, KindsAreUniqueAndIncludeTheBaselines) {
  const std::vector<std::string> kinds = IndexKinds();
  EXPECT_EQ(std::set<std::string>(kinds.begin(), kinds.end()).size(), kinds.size());
  for (const char* kind : {"flat", "roar", "faiss_hnsw", "faiss_ivf"}) {
    EXPECT_THAT(kinds, ::testing::Contains(kind));
  }
}

// The contract every kind shares: at its maximum effort knob, exactly the
// flat result (ids and scores), with and without exclusions; the same after
// Serialize + LoadIndex.
TEST(IndexFactoryTest, EveryKindAtMaxEffortReturnsTheFlatResult) {
  const Data& data = TestData();
  KVR_ASSERT_OK_AND_ASSIGN(auto flat,
                           BuildIndex("flat", data.key_view(), data.training(), BuildOptions()));
  for (const std::string& kind : IndexKinds()) {
    SCOPED_TRACE(kind);
    KVR_ASSERT_OK_AND_ASSIGN(auto index,
                             BuildIndex(kind, data.key_view(), data.training(), BuildOptions()));
    EXPECT_EQ(index->kind(), kind);
    EXPECT_EQ(index->size(), data.s.num_keys);
    EXPECT_EQ(index->dim(), data.s.dim);
    EXPECT_GT(index->KeyBytes(), 0);
    KVR_ASSERT_OK_AND_ASSIGN(std::string bytes, index->Serialize());
    KVR_ASSERT_OK_AND_ASSIGN(auto loaded, LoadIndex(bytes));
    EXPECT_EQ(loaded->kind(), kind);
    EXPECT_EQ(loaded->build_params(), index->build_params());
    for (const std::vector<PositionRange>& exclude :
         {std::vector<PositionRange>{}, std::vector<PositionRange>{{0, 4}, {1200, 1500}}}) {
      SearchParams params;
      params.exclude = exclude;
      KVR_ASSERT_OK_AND_ASSIGN(SearchResult exact, flat->Search(data.queries(), 25, params));
      if (!index->SearchEffortKnob().empty()) {
        params.knobs.SetInt(std::string(index->SearchEffortKnob()), index->MaxSearchEffort());
      }
      for (const KeyIndex* candidate : {index.get(), loaded.get()}) {
        KVR_ASSERT_OK_AND_ASSIGN(SearchResult got, candidate->Search(data.queries(), 25, params));
        EXPECT_EQ(got.ids, exact.ids);
        EXPECT_EQ(got.scores, exact.scores);
        EXPECT_GT(got.stats.keys_scanned, 0);
      }
    }
  }
}

TEST(IndexFactoryTest, BuildsReportProgressAndHonourCancellation) {
  const Data& data = TestData();
  for (const std::string& kind : IndexKinds()) {
    SCOPED_TRACE(kind);
    BuildOptions options;
    absl::Mutex mu;
    double last = 0;
    bool monotone = true;
    options.progress = [&](const Progress& p) {
      absl::MutexLock lock(&mu);
      monotone &= p.fraction >= last && p.fraction <= 1.0;
      last = p.fraction;
      return true;
    };
    KVR_ASSERT_OK(BuildIndex(kind, data.key_view(), data.training(), options).status());
    EXPECT_TRUE(monotone);
    options.progress = [](const Progress&) { return false; };
    const absl::Status cancelled =
        BuildIndex(kind, data.key_view(), data.training(), options).status();
    // Kinds that report progress stop; a kind that builds in one step may
    // finish before it asks.
    EXPECT_TRUE(cancelled.ok() || absl::IsCancelled(cancelled)) << cancelled;
  }
}

TEST(IndexFactoryTest, RejectsUnknownKindsBadParamsAndBadBytes) {
  const Data& data = TestData();
  const absl::Status unknown =
      BuildIndex("lsh", data.key_view(), data.training(), BuildOptions()).status();
  EXPECT_THAT(unknown, StatusIs(absl::StatusCode::kInvalidArgument,
                                ::testing::HasSubstr("known kinds: flat, roar")));
  for (const std::string& kind : IndexKinds()) {
    BuildOptions options;
    options.params.Set("no_such_param", "1");
    EXPECT_THAT(BuildIndex(kind, data.key_view(), data.training(), options).status(),
                StatusIs(absl::StatusCode::kInvalidArgument))
        << kind;
  }
  EXPECT_THAT(LoadIndex("not an index").status(), StatusIs(absl::StatusCode::kDataLoss));
  KVR_ASSERT_OK_AND_ASSIGN(auto flat,
                           BuildIndex("flat", data.key_view(), data.training(), BuildOptions()));
  KVR_ASSERT_OK_AND_ASSIGN(std::string bytes, flat->Serialize());
  bytes[bytes.size() - 3] ^= 0x40;  // payload checksum no longer matches
  EXPECT_THAT(LoadIndex(bytes).status(), StatusIs(absl::StatusCode::kDataLoss));
  IndexHeader header;
  header.kind = "from_the_future";
  header.dim = 4;
  EXPECT_THAT(LoadIndex(EncodeIndex(header, "")).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

}  // namespace
}  // namespace kvrecall::index
