#include "index/roar/roar_index.h"

#include <algorithm>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "common/half.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "index/flat/flat_index.h"
#include "index/testing/index_testing.h"
#include "index/testing/synthetic_attention.h"
#include "tests/testing/largest_allocation.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::index {
namespace {

using ::kvrecall::testing::StatusIs;

struct Data {
  SyntheticAttention s;
  std::vector<uint16_t> keys_f16;  // [n, d]
};

Data MakeData(int64_t n, uint64_t seed) {
  SyntheticAttentionOptions o;
  o.num_keys = n;
  o.dim = 64;
  o.latent_rank = 16;
  o.nuisance_rank = 16;
  o.num_query_heads = 2;
  o.num_decode_queries = 32;
  o.seed = seed;
  Data data{GenerateSyntheticAttention(o).value(), {}};
  data.keys_f16.resize(data.s.keys.size());
  for (size_t i = 0; i < data.keys_f16.size(); ++i) data.keys_f16[i] = FloatToHalf(data.s.keys[i]);
  return data;
}

VectorView Keys(const Data& d) {
  return VectorView{d.keys_f16.data(), d.s.num_keys, d.s.dim, DType::kF16, 0};
}
VectorView Training(const Data& d) {
  return VectorView::F32(d.s.prefill_queries.data(), d.s.num_query_heads * d.s.num_keys, d.s.dim);
}
VectorView Decode(const Data& d) {
  return VectorView::F32(d.s.decode_queries.data(), d.s.num_query_heads * d.s.num_decode_queries,
                         d.s.dim);
}

RoarOptions SmallOptions() {
  RoarOptions o;
  o.nq = 32;
  o.m = 16;
  o.l = 64;
  return o;
}

TEST(RoarIndexTest, MaxEffortIsExactlyFlatAndDefaultEffortHasHighRecall) {
  const uint64_t seed = 5;
  const Data data = MakeData(3000, seed);
  KVR_ASSERT_OK_AND_ASSIGN(auto roar, RoarIndex::Build(Keys(data), Training(data), SmallOptions()));
  KVR_ASSERT_OK_AND_ASSIGN(auto flat, FlatIndex::Build(Keys(data), FlatOptions()));
  EXPECT_EQ(roar->SearchEffortKnob(), "ef");
  EXPECT_EQ(roar->MaxSearchEffort(), 3000);
  EXPECT_LE(roar->AverageDegree(), 3 * 16);
  for (const std::vector<PositionRange>& exclude :
       {std::vector<PositionRange>{}, std::vector<PositionRange>{{0, 16}, {2500, 3000}}}) {
    SearchParams params;
    params.exclude = exclude;
    KVR_ASSERT_OK_AND_ASSIGN(SearchResult exact, flat->Search(Decode(data), 20, params));
    params.knobs.SetInt("ef", roar->MaxSearchEffort());
    KVR_ASSERT_OK_AND_ASSIGN(SearchResult full, roar->Search(Decode(data), 20, params));
    EXPECT_EQ(full.ids, exact.ids) << "seed " << seed;
    EXPECT_EQ(full.scores, exact.scores) << "seed " << seed;
    // At max effort every key is reached and scored once.
    EXPECT_EQ(full.stats.keys_scanned, 3000 * full.num_queries);
    params.knobs = ParamMap();
    params.knobs.SetInt("ef", 40);
    KVR_ASSERT_OK_AND_ASSIGN(SearchResult approx, roar->Search(Decode(data), 20, params));
    EXPECT_GE(RecallOf(approx, exact), 0.9) << "seed " << seed;
    EXPECT_LT(approx.stats.keys_scanned, full.stats.keys_scanned / 3);
    for (int64_t id : approx.ids) {
      for (const PositionRange& r : exclude) EXPECT_FALSE(id >= r.begin && id < r.end);
    }
  }
}

TEST(RoarIndexTest, AddedKeysAreFoundAndMaxEffortStaysExact) {
  const uint64_t seed = 6;
  const Data data = MakeData(2000, seed);
  const VectorView all = Keys(data);
  VectorView first = all;
  first.rows = 1500;
  // The prefill queries of positions 0..1499 of both heads, in position order.
  std::vector<float> train;
  for (int64_t h = 0; h < 2; ++h) {
    const float* qh = data.s.prefill_queries.data() + h * 2000 * all.dim;
    train.insert(train.end(), qh, qh + 1500 * all.dim);
  }
  KVR_ASSERT_OK_AND_ASSIGN(
      auto roar,
      RoarIndex::Build(first, VectorView::F32(train.data(), 3000, all.dim), SmallOptions()));
  VectorView rest{data.keys_f16.data() + 1500 * all.dim, 500, all.dim, DType::kF16, 0};
  KVR_ASSERT_OK(roar->Add(rest));
  EXPECT_EQ(roar->size(), 2000);
  KVR_ASSERT_OK_AND_ASSIGN(auto flat, FlatIndex::Build(all, FlatOptions()));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult exact, flat->Search(Decode(data), 10, {}));
  SearchParams params;
  params.knobs.SetInt("ef", roar->MaxSearchEffort());
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult full, roar->Search(Decode(data), 10, params));
  EXPECT_EQ(full.ids, exact.ids) << "seed " << seed;
  // An added key searched for itself comes back first.
  std::vector<float> self(all.dim);
  ConvertToFloat(data.keys_f16.data() + 1900 * all.dim, DType::kF16, all.dim, self.data());
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult one, flat->Search(VectorView::F32(self.data(), 1, all.dim), 1, {}));
  params.knobs = ParamMap();
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult found,
                           roar->Search(VectorView::F32(self.data(), 1, all.dim), 1, params));
  EXPECT_EQ(found.ids[0], one.ids[0]);
  // Wrong dtype: rejected, nothing changes.
  std::vector<float> f32(all.dim);
  EXPECT_THAT(roar->Add(VectorView::F32(f32.data(), 1, all.dim)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(roar->size(), 2000);
}

TEST(RoarIndexTest, BuildIsDeterministicAcrossThreadCountsAndRoundTrips) {
  const Data data = MakeData(1200, 7);
  RoarOptions one = SmallOptions();
  one.num_threads = 1;
  RoarOptions many = SmallOptions();
  many.num_threads = 3;
  KVR_ASSERT_OK_AND_ASSIGN(auto a, RoarIndex::Build(Keys(data), Training(data), one));
  KVR_ASSERT_OK_AND_ASSIGN(auto b, RoarIndex::Build(Keys(data), Training(data), many));
  KVR_ASSERT_OK_AND_ASSIGN(std::string bytes_a, a->Serialize());
  KVR_ASSERT_OK_AND_ASSIGN(std::string bytes_b, b->Serialize());
  EXPECT_EQ(bytes_a, bytes_b);
  KVR_ASSERT_OK_AND_ASSIGN(auto decoded, DecodeIndex(bytes_a));
  KVR_ASSERT_OK_AND_ASSIGN(auto loaded, RoarIndex::Load(decoded.first, decoded.second));
  EXPECT_EQ(loaded->build_params(), a->build_params());
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult ra, a->Search(Decode(data), 10, {}));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult rb, loaded->Search(Decode(data), 10, {}));
  EXPECT_EQ(ra.ids, rb.ids);
  EXPECT_EQ(ra.scores, rb.scores);
  // A corrupted neighbour id is caught by Load, not by a search.
  std::string payload(decoded.second);
  const uint32_t bad = 999999;
  // version, entry count, entries, capacity, node 0's count, its first neighbour
  const size_t at = 16 + 4 * a->entry_points().size();
  ASSERT_FALSE(a->graph().Neighbors(0).empty());
  std::memcpy(payload.data() + at, &bad, 4);
  EXPECT_THAT(RoarIndex::Load(decoded.first, payload).status(),
              StatusIs(absl::StatusCode::kDataLoss));
}

// Found by index_load_fuzz: a header size far beyond what the payload holds
// made Load allocate the graph for it (gigabytes) before reading a byte.
TEST(RoarIndexTest, ASizeThePayloadCannotHoldIsDataLossBeforeAllocating) {
  const Data data = MakeData(300, 9);
  KVR_ASSERT_OK_AND_ASSIGN(auto a, RoarIndex::Build(Keys(data), Training(data), SmallOptions()));
  KVR_ASSERT_OK_AND_ASSIGN(std::string bytes, a->Serialize());
  KVR_ASSERT_OK_AND_ASSIGN(auto decoded, DecodeIndex(bytes));
  IndexHeader header = decoded.first;
  header.size = int64_t{1} << 31;
  kvrecall::testing::LargestAllocation largest;
  EXPECT_THAT(RoarIndex::Load(header, decoded.second).status(),
              StatusIs(absl::StatusCode::kDataLoss, ::testing::HasSubstr("cannot hold")));
  // Nothing sized by the claim: no allocation beyond the payload's own size.
  EXPECT_LT(largest.bytes(), decoded.second.size() + 4096);
}

TEST(RoarIndexTest, ReportsStagesInOrderAndCancels) {
  const Data data = MakeData(800, 8);
  RoarOptions o = SmallOptions();
  absl::Mutex mu;
  std::vector<std::string> stages;
  double last = 0;
  bool monotone = true;
  o.progress = [&](const Progress& p) {
    absl::MutexLock lock(&mu);
    if (stages.empty() || stages.back() != p.stage) stages.push_back(p.stage);
    monotone &= p.fraction >= last;
    last = p.fraction;
    return true;
  };
  KVR_ASSERT_OK(RoarIndex::Build(Keys(data), Training(data), o).status());
  EXPECT_THAT(stages, ::testing::ElementsAre("knn", "projection", "connectivity", "repair"));
  EXPECT_TRUE(monotone);
  EXPECT_DOUBLE_EQ(last, 1.0);

  o.progress = [](const Progress& p) { return p.stage != "projection"; };
  EXPECT_THAT(RoarIndex::Build(Keys(data), Training(data), o).status(),
              StatusIs(absl::StatusCode::kCancelled));
}

TEST(RoarIndexTest, RejectsBadInputAndHandlesEdgeSizes) {
  const Data data = MakeData(300, 9);
  VectorView bad_train = Training(data);
  bad_train.dim = 32;
  EXPECT_THAT(RoarIndex::Build(Keys(data), bad_train, SmallOptions()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ParamMap p;
  p.SetInt("m", 2);
  EXPECT_THAT(RoarOptions::FromParams(p).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  ParamMap unknown;
  unknown.SetInt("M", 8);
  EXPECT_THAT(RoarOptions::FromParams(unknown).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // Causal training needs the training rows in position order (a multiple
  // of the keys); unordered training queries need causal=0.
  VectorView some_train = Training(data);
  some_train.rows = 301;
  EXPECT_THAT(RoarIndex::Build(Keys(data), some_train, SmallOptions()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  RoarOptions unordered = SmallOptions();
  unordered.causal = false;
  KVR_ASSERT_OK_AND_ASSIGN(auto any_order, RoarIndex::Build(Keys(data), some_train, unordered));
  EXPECT_EQ(any_order->build_params().GetString("causal", ""), "0");

  KVR_ASSERT_OK_AND_ASSIGN(auto index,
                           RoarIndex::Build(Keys(data), VectorView::Empty(64), SmallOptions()));
  SearchParams knob;
  knob.knobs.SetInt("ef", 0);
  EXPECT_THAT(index->Search(Decode(data), 5, knob).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  knob.knobs = ParamMap();
  knob.knobs.SetInt("nprobe", 3);
  EXPECT_THAT(index->Search(Decode(data), 5, knob).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));

  // Empty, then grown one key at a time.
  VectorView none = Keys(data);
  none.rows = 0;
  KVR_ASSERT_OK_AND_ASSIGN(auto grown, RoarIndex::Build(none, VectorView::Empty(64), SmallOptions()));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult empty, grown->Search(Decode(data), 3, {}));
  EXPECT_EQ(empty.ids[0], -1);
  for (int i = 0; i < 40; ++i) {
    KVR_ASSERT_OK(grown->Add(VectorView{data.keys_f16.data() + i * 64, 1, 64, DType::kF16, 0}));
  }
  KVR_ASSERT_OK_AND_ASSIGN(auto flat, FlatIndex::Build(
                                          VectorView{data.keys_f16.data(), 40, 64, DType::kF16, 0},
                                          FlatOptions()));
  SearchParams max;
  max.knobs.SetInt("ef", grown->MaxSearchEffort());
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult a, grown->Search(Decode(data), 5, max));
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult b, flat->Search(Decode(data), 5, {}));
  EXPECT_EQ(a.ids, b.ids);
}

// Real attention (attn-dev, a 2048-key slice of layer 3, KV head 0): the
// graph built from prefill queries finds the top-100 of decode queries.
TEST(RoarIndexTest, RealCaptureSliceReachesHighRecall) {
  const std::string dir = ::kvrecall::testing::SharedDir() + "/data/attn-dev/";
  auto q = ReadNpy(dir + "layer03_q.npy");
  auto k = ReadNpy(dir + "layer03_k.npy");
  if (!q.ok() || !k.ok()) KVR_SKIP_WITHOUT_SHARED_DATA("attn-dev capture not found under " << dir);
  const int64_t n = 2048, t = 8192, d = 128;
  const uint16_t* keys = k->as<uint16_t>();  // head 0, positions 0..n-1
  std::vector<uint16_t> train, decode;
  for (int h = 0; h < 2; ++h) {
    const uint16_t* qh = q->as<uint16_t>() + h * t * d;
    train.insert(train.end(), qh, qh + n * d);                              // prefill of the slice
    decode.insert(decode.end(), qh + (n + 64) * d, qh + (n + 128) * d);  // later queries
  }
  const VectorView key_view{keys, n, static_cast<int32_t>(d), DType::kF16, 0};
  KVR_ASSERT_OK_AND_ASSIGN(
      auto roar, RoarIndex::Build(key_view,
                                  VectorView{train.data(), 2 * n, static_cast<int32_t>(d), DType::kF16, 0},
                                  RoarOptions()));
  KVR_ASSERT_OK_AND_ASSIGN(auto flat, FlatIndex::Build(key_view, FlatOptions()));
  const VectorView dq{decode.data(), 128, static_cast<int32_t>(d), DType::kF16, 0};
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult exact, flat->Search(dq, 100, {}));
  SearchParams params;
  params.knobs.SetInt("ef", 400);
  KVR_ASSERT_OK_AND_ASSIGN(SearchResult got, roar->Search(dq, 100, params));
  EXPECT_GE(RecallOf(got, exact), 0.9);
  EXPECT_LT(got.stats.keys_scanned, 128 * n);
}

}  // namespace
}  // namespace kvrecall::index
