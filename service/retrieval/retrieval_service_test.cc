#include "service/retrieval/retrieval_service.h"

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/checksum.h"
#include "common/half.h"
#include "common/span_hash.h"
#include "gtest/gtest.h"
#include "index/index_factory.h"
#include "index/loki/pca_basis.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::retrieval {
namespace {

using ::kvrecall::testing::IsOk;
using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

constexpr int32_t kLayers = 2, kQHeads = 4, kKvHeads = 2, kDim = 32, kBlock = 16;

store::ModelGeometry Geometry() {
  store::ModelGeometry m;
  m.model_id = "tiny";
  m.num_layers = kLayers;
  m.num_q_heads = kQHeads;
  m.num_kv_heads = kKvHeads;
  m.head_dim = kDim;
  m.dtype = DType::kF32;
  m.block_tokens = kBlock;
  return m;
}

class RetrievalServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("retrieval");
    OpenAll();
    KVR_ASSERT_OK(store_->RegisterModel(Geometry()));
  }

  void OpenAll(const RetrievalOptions& options = RetrievalOptions()) {
    store::TieredStoreOptions so;
    so.data_dir = dir_;
    so.memory_capacity_bytes = 64 << 20;
    so.disk_capacity_bytes = 64 << 20;
    so.rocksdb_capacity_bytes = 64 << 20;
    auto st = store::TieredStore::Open(so);
    ASSERT_TRUE(st.ok()) << st.status();
    store_ = std::move(*st);
    auto rs = RetrievalService::Create(store_.get(), options);
    ASSERT_TRUE(rs.ok()) << rs.status();
    service_ = std::move(*rs);
  }

  void Reopen() {
    service_.reset();
    store_.reset();
    OpenAll();
  }

  // Stores `tokens` random tokens as spans; returns the chain.
  std::vector<Hash128> StoreContext(int64_t tokens, uint32_t seed, bool durable = true) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist;
    std::vector<uint32_t> ids(tokens);
    for (auto& t : ids) t = rng() % 256;
    Hash128 parent = SpanRootHash("tiny");
    std::vector<Hash128> chain;
    const auto m = Geometry();
    for (int64_t begin = 0; begin < tokens; begin += kBlock) {
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(kBlock, tokens - begin));
      store::StoredSpan span;
      span.key.hash = SpanHash(parent, absl::MakeConstSpan(ids).subspan(begin, n));
      span.meta.model_id = "tiny";
      span.meta.parent = parent;
      span.meta.num_tokens = n;
      span.meta.durable = durable;
      span.payload.resize(m.SpanPayloadBytes(n));
      float* f = reinterpret_cast<float*>(span.payload.data());
      for (size_t i = 0; i < span.payload.size() / 4; ++i) f[i] = dist(rng);
      span.meta.payload_bytes = static_cast<int64_t>(span.payload.size());
      span.meta.payload_checksum = Checksum64(span.payload);
      parent = span.key.hash;
      chain.push_back(parent);
      auto put = store_->Put(std::move(span), store::PutOptions());
      EXPECT_TRUE(put.ok()) << put.status();
    }
    return chain;
  }

  std::vector<float> RandomQueries(uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist;
    std::vector<float> q(kQHeads * kDim);
    for (float& x : q) x = 2.0f * dist(rng);
    return q;
  }

  // Full attention over positions [0, tokens) minus `exclude`, in float64.
  void Reference(const Context& ctx, int32_t layer, const std::vector<float>& q,
                 const std::vector<index::PositionRange>& exclude, std::vector<double>* out,
                 std::vector<double>* lse) {
    const LayerKvView view = ctx.KvView(layer);
    out->assign(kQHeads * kDim, 0.0);
    lse->assign(kQHeads, 0.0);
    for (int32_t h = 0; h < kQHeads; ++h) {
      std::vector<std::pair<double, int64_t>> s;
      for (int64_t p = 0; p < view.num_tokens; ++p) {
        bool ex = false;
        for (auto& e : exclude) ex = ex || (p >= e.begin && p < e.end);
        if (ex) continue;
        const float* k = static_cast<const float*>(view.KeyRow(h / 2, p));
        double acc = 0;
        for (int j = 0; j < kDim; ++j) acc += double(q[h * kDim + j]) * k[j];
        s.emplace_back(acc / std::sqrt(double(kDim)), p);
      }
      double m = -INFINITY;
      for (auto& [x, p] : s) m = std::max(m, x);
      double l = 0;
      for (auto& [x, p] : s) l += std::exp(x - m);
      for (auto& [x, p] : s) {
        const float* v = static_cast<const float*>(view.ValueRow(h / 2, p));
        for (int j = 0; j < kDim; ++j) (*out)[h * kDim + j] += std::exp(x - m) / l * v[j];
      }
      (*lse)[h] = m + std::log(l);
    }
  }

  std::shared_ptr<Context> OpenedContext(const std::vector<Hash128>& chain) {
    // Build an equivalent Context for references (same spans, read from the store).
    std::vector<store::StoredSpanPtr> spans;
    for (const auto& h : chain) spans.push_back(store_->Get(store::SpanKey{"", h}, "tiny").span);
    return std::make_shared<Context>("", Geometry(), spans);
  }

  OperationInfo BuildAndWait(const Hash128& ctx, const std::string& kind,
                             const std::string& params = "") {
    BuildIndexRequest req;
    req.context = ctx;
    req.kind = kind;
    req.params = params;
    auto id = service_->BuildIndex(req);
    EXPECT_TRUE(id.ok()) << id.status();
    auto info = service_->WaitOperation("", *id, absl::InfiniteFuture());
    EXPECT_TRUE(info.ok()) << info.status();
    return *info;
  }

  std::string dir_;
  std::unique_ptr<store::TieredStore> store_;
  std::unique_ptr<RetrievalService> service_;
};

TEST_F(RetrievalServiceTest, OpenContextNamesMissingSpans) {
  auto chain = StoreContext(40, 1);
  Hash128 bogus{1, 2};
  std::vector<Hash128> broken = chain;
  broken.push_back(bogus);
  EXPECT_THAT(service_->OpenContext("", "tiny", broken, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr(bogus.ToHex())));
  EXPECT_THAT(service_->OpenContext("", "nope", chain, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(service_->OpenContext("", "tiny", {}, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // Another tenant does not see the spans.
  EXPECT_THAT(service_->OpenContext("other", "tiny", chain, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kNotFound));
  KVR_ASSERT_OK_AND_ASSIGN(auto opened,
                           service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()));
  EXPECT_EQ(opened.context, chain.back());
  EXPECT_EQ(opened.num_tokens, 40);
  EXPECT_TRUE(opened.newly_opened);
}

TEST_F(RetrievalServiceTest, AttendAllEqualsFullAttentionAndMergesExactly) {
  auto chain = StoreContext(100, 2);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  auto ctx = OpenedContext(chain);
  const auto q = RandomQueries(3);
  RetrieveRequest req;
  req.context = chain.back();
  req.layer = 1;
  req.queries = q;
  req.index.kind = "all";
  req.exclude = {{0, 4}, {90, 100}};
  KVR_ASSERT_OK_AND_ASSIGN(AttendReply remote, service_->Attend(req));

  // The caller's local partial over the excluded positions, merged with the
  // remote one, must equal full attention over everything.
  std::vector<int64_t> local_ids;
  for (auto& e : req.exclude) for (int64_t p = e.begin; p < e.end; ++p) local_ids.push_back(p);
  PartialAttentionArgs args;
  args.queries = q.data();
  args.num_q_heads = kQHeads;
  args.group_size = 2;
  args.ids = {local_ids, local_ids};
  PartialAttentionResult local, merged;
  KVR_ASSERT_OK(ComputePartialAttention(ctx->KvView(1), args, &local));
  MergeAttentionStates({&remote.state, &local}, kQHeads, kDim, &merged);
  std::vector<double> ref, lse;
  Reference(*ctx, 1, q, {}, &ref, &lse);
  for (int h = 0; h < kQHeads; ++h) {
    double num = 0, den = 0;
    for (int j = 0; j < kDim; ++j) {
      num += std::pow(merged.out[h * kDim + j] - ref[h * kDim + j], 2);
      den += ref[h * kDim + j] * ref[h * kDim + j];
    }
    EXPECT_LT(std::sqrt(num / den), 1e-5) << "head " << h;
    EXPECT_NEAR(merged.lse[h], lse[h], 1e-5 * (1 + std::abs(lse[h])));
  }
}

TEST_F(RetrievalServiceTest, AttendByPositionsEqualsAttentionOverThosePositions) {
  auto chain = StoreContext(100, 21);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  auto ctx = OpenedContext(chain);
  const auto q = RandomQueries(22);
  // One list per query head (what a layer reusing another layer's selection sends).
  std::vector<std::vector<int64_t>> lists = {{5, 17, 3}, {99, 0}, {50}, {}};
  RetrieveRequest req;
  req.context = chain.back();
  req.layer = 0;
  req.queries = q;
  req.positions = lists;
  KVR_ASSERT_OK_AND_ASSIGN(AttendReply got, service_->Attend(req));
  PartialAttentionArgs args;
  args.queries = q.data();
  args.num_q_heads = kQHeads;
  args.group_size = 2;
  for (const auto& l : lists) args.ids.emplace_back(l);
  PartialAttentionResult want;
  KVR_ASSERT_OK(ComputePartialAttention(ctx->KvView(0), args, &want));
  EXPECT_EQ(got.state.out, want.out);
  EXPECT_EQ(got.state.lse, want.lse);
  EXPECT_TRUE(std::isinf(got.state.lse[3]) && got.state.lse[3] < 0);  // empty list
  EXPECT_EQ(got.stats.keys_scanned, 6);

  // One list per KV head, shared by its group.
  req.positions = {{1, 2, 3}, {4, 5}};
  KVR_ASSERT_OK_AND_ASSIGN(got, service_->Attend(req));
  EXPECT_EQ(got.stats.keys_scanned, 10);

  // Bad lists: wrong count, out of range, repeated, mixed with a search.
  req.positions = {{1}, {2}, {3}};
  EXPECT_THAT(service_->Attend(req), StatusIs(absl::StatusCode::kInvalidArgument,
                                              HasSubstr("3 position lists")));
  req.positions = {{1}, {100}};
  EXPECT_THAT(service_->Attend(req), StatusIs(absl::StatusCode::kInvalidArgument,
                                              HasSubstr("position 100 of list 1")));
  req.positions = {{7, 7}, {1}};
  EXPECT_THAT(service_->Attend(req), StatusIs(absl::StatusCode::kInvalidArgument,
                                              HasSubstr("appears twice")));
  req.positions = {{1}, {2}};
  req.k = 3;
  EXPECT_THAT(service_->Attend(req), StatusIs(absl::StatusCode::kInvalidArgument,
                                              HasSubstr("takes no k")));
}

TEST_F(RetrievalServiceTest, AttendAllWithSelectKReturnsTheExactTopK) {
  auto chain = StoreContext(100, 23);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  const auto q = RandomQueries(24);
  RetrieveRequest req;
  req.context = chain.back();
  req.layer = 1;
  req.queries = q;
  req.index.kind = "all";
  req.exclude = {{0, 4}, {90, 100}};
  KVR_ASSERT_OK_AND_ASSIGN(AttendReply plain, service_->Attend(req));
  req.select_k = 7;
  KVR_ASSERT_OK_AND_ASSIGN(AttendReply with_top, service_->Attend(req));
  EXPECT_EQ(with_top.state.out, plain.state.out);  // the attention itself is unchanged
  RetrieveRequest search = req;
  search.select_k = 0;
  search.k = 7;
  KVR_ASSERT_OK_AND_ASSIGN(SearchReply exact, service_->Search(search));
  ASSERT_EQ(with_top.ids.size(), static_cast<size_t>(kQHeads));
  for (int h = 0; h < kQHeads; ++h) EXPECT_EQ(with_top.ids[h], exact.ids[h]) << "head " << h;

  req.select_k = 87;  // 86 positions are attended
  EXPECT_THAT(service_->Attend(req), StatusIs(absl::StatusCode::kInvalidArgument,
                                              HasSubstr("select_k = 87")));
  req.select_k = 3;
  req.index.kind = "flat";
  req.k = 5;
  EXPECT_THAT(service_->Attend(req), StatusIs(absl::StatusCode::kInvalidArgument,
                                              HasSubstr("select_k needs")));
}

TEST_F(RetrievalServiceTest, GatherKvReturnsTheRowsOfEachKvHead) {
  auto chain = StoreContext(100, 25);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  auto ctx = OpenedContext(chain);
  std::vector<std::vector<int64_t>> lists = {{3, 64, 17}, {99}};
  KVR_ASSERT_OK_AND_ASSIGN(GatherKvReply got,
                           service_->GatherKv("", chain.back(), 1, lists, absl::InfiniteFuture()));
  ASSERT_EQ(got.rows, 4);
  const LayerKvView view = ctx->KvView(1);
  const size_t row = kDim * sizeof(float);
  int64_t r = 0;
  for (int32_t g = 0; g < kKvHeads; ++g) {
    for (int64_t pos : lists[g]) {
      EXPECT_EQ(std::memcmp(got.keys.data() + r * row, view.KeyRow(g, pos), row), 0);
      EXPECT_EQ(std::memcmp(got.values.data() + r * row, view.ValueRow(g, pos), row), 0);
      ++r;
    }
  }
  EXPECT_THAT(service_->GatherKv("", chain.back(), 2, lists, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 2")));
  EXPECT_THAT(service_->GatherKv("", chain.back(), 0, {{1}, {2}, {3}, {4}}, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("one per KV head")));
  EXPECT_THAT(service_->GatherKv("", chain.back(), 0, {{1}, {-1}}, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("outside")));
}

TEST_F(RetrievalServiceTest, FlatIndexSearchIsExactAndHonoursExclusions) {
  auto chain = StoreContext(200, 4);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  const OperationInfo op = BuildAndWait(chain.back(), "flat");
  ASSERT_EQ(op.state, OperationState::kDone) << op.error;
  EXPECT_EQ(op.fraction, 1.0);
  const auto q = RandomQueries(5);
  RetrieveRequest req;
  req.context = chain.back();
  req.layer = 0;
  req.queries = q;
  req.k = 10;
  req.index.kind = "flat";
  req.exclude = {{50, 60}};
  KVR_ASSERT_OK_AND_ASSIGN(SearchReply got, service_->Search(req));
  req.index.kind = "all";
  KVR_ASSERT_OK_AND_ASSIGN(SearchReply exact, service_->Search(req));
  for (int h = 0; h < kQHeads; ++h) {
    ASSERT_EQ(got.ids[h].size(), 10u);
    EXPECT_EQ(got.ids[h], exact.ids[h]) << "head " << h;
    for (int64_t id : got.ids[h]) EXPECT_TRUE(id < 50 || id >= 60);
  }
  // Union mode gives every head of a group the same positions.
  req.index.kind = "flat";
  req.gqa_mode = GqaMode::kUnion;
  KVR_ASSERT_OK_AND_ASSIGN(SearchReply uni, service_->Search(req));
  auto sorted = [](std::vector<int64_t> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  EXPECT_EQ(sorted(uni.ids[0]), sorted(uni.ids[1]));
  EXPECT_GE(uni.ids[0].size(), 10u);
}

TEST_F(RetrievalServiceTest, EveryKindAtMaxEffortEqualsExactTopK) {
  auto chain = StoreContext(160, 12);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  // Prefill queries of the prefix train the query-aware kinds.
  std::mt19937 rng(13);
  std::normal_distribution<float> dist;
  std::vector<float> prefill(160 * kQHeads * kDim);
  for (float& x : prefill) x = dist(rng);
  for (int32_t layer = 0; layer < kLayers; ++layer) {
    KVR_ASSERT_OK(service_->AddQueries("", chain.back(), layer, 0, 160, prefill));
  }
  const auto q = RandomQueries(14);
  RetrieveRequest req;
  req.context = chain.back();
  req.layer = 1;
  req.queries = q;
  req.k = 7;
  req.index.kind = "all";
  KVR_ASSERT_OK_AND_ASSIGN(SearchReply exact, service_->Search(req));
  for (const std::string& kind : index::IndexKinds()) {
    SCOPED_TRACE(kind);
    const OperationInfo op = BuildAndWait(chain.back(), kind);
    ASSERT_EQ(op.state, OperationState::kDone) << op.error;
    req.index.kind = kind;
    req.index.effort = int64_t{1} << 40;  // clamped to the kind's maximum: exact
    KVR_ASSERT_OK_AND_ASSIGN(SearchReply got, service_->Search(req));
    for (int h = 0; h < kQHeads; ++h) EXPECT_EQ(got.ids[h], exact.ids[h]) << "head " << h;
  }
}

TEST_F(RetrievalServiceTest, LokiBuildsUseTheModelsBasisArtifact) {
  auto chain = StoreContext(128, 15);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  auto ctx = OpenedContext(chain);
  // Fit one basis per (layer, KV head) of layer 0 only.
  std::vector<index::loki::PcaBasis> bases;
  for (int32_t h = 0; h < kKvHeads; ++h) {
    const std::string keys = ctx->GatherKeys(0, h, 0, 128);
    KVR_ASSERT_OK_AND_ASSIGN(
        index::loki::PcaBasis b,
        index::loki::FitPcaBasis(index::VectorView::F32(reinterpret_cast<const float*>(keys.data()),
                                                        128, kDim),
                                 index::loki::PcaFitOptions()));
    b.layer = 0;
    b.kv_head = h;
    bases.push_back(std::move(b));
  }
  KVR_ASSERT_OK(service_->PutArtifact("", /*shared=*/true, "tiny", "loki_basis",
                                      index::loki::SerializePcaBases(bases), "layer 0 only")
                    .status());
  BuildIndexRequest req;
  req.context = chain.back();
  req.kind = "loki";
  req.layers = {0};
  KVR_ASSERT_OK_AND_ASSIGN(std::string op, service_->BuildIndex(req));
  KVR_ASSERT_OK_AND_ASSIGN(OperationInfo done, service_->WaitOperation("", op, absl::InfiniteFuture()));
  EXPECT_EQ(done.state, OperationState::kDone) << done.error;
  // Layer 1 has no basis in the artifact: the build fails and says which entry is missing.
  req.layers = {1};
  KVR_ASSERT_OK_AND_ASSIGN(op, service_->BuildIndex(req));
  KVR_ASSERT_OK_AND_ASSIGN(OperationInfo failed, service_->WaitOperation("", op, absl::InfiniteFuture()));
  EXPECT_EQ(failed.state, OperationState::kFailed);
  EXPECT_THAT(std::string(failed.error.message()), HasSubstr("layer 1"));
}

TEST_F(RetrievalServiceTest, BadRequestsAreRejected) {
  auto chain = StoreContext(64, 6);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  auto q = RandomQueries(7);
  RetrieveRequest req;
  req.context = chain.back();
  req.queries = q;
  req.k = 5;
  req.index.kind = "roar";
  EXPECT_THAT(service_->Search(req),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("BuildIndex")));
  req.index.kind = "all";
  req.layer = 9;
  EXPECT_THAT(service_->Attend(req), StatusIs(absl::StatusCode::kInvalidArgument));
  req.layer = 0;
  req.k = 65;
  EXPECT_THAT(service_->Search(req), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("larger")));
  req.k = 5;
  req.exclude = {{10, 20}, {15, 30}};
  EXPECT_THAT(service_->Search(req), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("disjoint")));
  req.exclude = {{60, 70}};
  EXPECT_THAT(service_->Search(req), StatusIs(absl::StatusCode::kInvalidArgument));
  req.exclude.clear();
  q[3] = NAN;
  EXPECT_THAT(service_->Attend(req), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("finite")));
  q[3] = 0;
  std::vector<float> short_q(kDim);
  req.queries = short_q;
  EXPECT_THAT(service_->Search(req), StatusIs(absl::StatusCode::kInvalidArgument));
  req.queries = q;
  req.deadline = absl::Now() - absl::Seconds(1);
  EXPECT_THAT(service_->Attend(req), StatusIs(absl::StatusCode::kDeadlineExceeded));
  req.deadline = absl::InfiniteFuture();
  req.context = Hash128{5, 5};
  EXPECT_THAT(service_->Attend(req), StatusIs(absl::StatusCode::kNotFound, HasSubstr("unknown context")));
  BuildIndexRequest b;
  b.context = chain.back();
  b.kind = "nope";
  EXPECT_THAT(service_->BuildIndex(b), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("roar")));
  b.kind = "flat";
  b.layers = {7};
  EXPECT_THAT(service_->BuildIndex(b), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(RetrievalServiceTest, IndexesPersistAndReloadLazilyAfterRestart) {
  auto chain = StoreContext(96, 8);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  ASSERT_EQ(BuildAndWait(chain.back(), "flat").state, OperationState::kDone);
  const auto q = RandomQueries(9);
  RetrieveRequest req;
  req.context = chain.back();
  req.layer = 1;
  req.queries = q;
  req.k = 8;
  req.index.kind = "flat";
  KVR_ASSERT_OK_AND_ASSIGN(AttendReply before, service_->Attend(req));
  Reopen();
  KVR_ASSERT_OK_AND_ASSIGN(auto listed, service_->ListIndexes("", chain.back()));
  EXPECT_EQ(listed.size(), static_cast<size_t>(kLayers * kKvHeads));
  for (const auto& info : listed) EXPECT_FALSE(info.loaded);
  KVR_ASSERT_OK_AND_ASSIGN(AttendReply after, service_->Attend(req));  // reopens + reloads
  EXPECT_EQ(after.ids, before.ids);
  for (size_t i = 0; i < before.state.out.size(); ++i) {
    EXPECT_FLOAT_EQ(after.state.out[i], before.state.out[i]);
  }
  KVR_ASSERT_OK(service_->DeleteIndex("", chain.back(), "flat", ""));
  req.index.kind = "flat";
  EXPECT_THAT(service_->Search(req), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_F(RetrievalServiceTest, AppendedTokensAreSearchable) {
  auto chain = StoreContext(32, 10);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  ASSERT_EQ(BuildAndWait(chain.back(), "flat").state, OperationState::kDone);
  const auto q = RandomQueries(11);
  // Append 3 tokens to both layers whose keys equal 10 * q of head 0's group.
  const int n = 3;
  std::vector<float> k(kLayers * kKvHeads * n * kDim), v(k.size(), 1.0f);
  for (int l = 0; l < kLayers; ++l)
    for (int h = 0; h < kKvHeads; ++h)
      for (int t = 0; t < n; ++t)
        for (int j = 0; j < kDim; ++j)
          k[((l * kKvHeads + h) * n + t) * kDim + j] = 10.0f * q[(h * 2) * kDim + j];
  AppendBatch batch;
  batch.layer_begin = 0;
  batch.layer_end = kLayers;
  batch.num_tokens = n;
  batch.keys = absl::string_view(reinterpret_cast<const char*>(k.data()), k.size() * 4);
  batch.values = absl::string_view(reinterpret_cast<const char*>(v.data()), v.size() * 4);
  KVR_ASSERT_OK_AND_ASSIGN(int64_t first, service_->AppendTokens("", chain.back(), batch));
  EXPECT_EQ(first, 32);
  RetrieveRequest req;
  req.context = chain.back();
  req.layer = 1;
  req.queries = q;
  req.k = 3;
  req.index.kind = "flat";
  KVR_ASSERT_OK_AND_ASSIGN(SearchReply got, service_->Search(req));
  std::vector<int64_t> ids = got.ids[0];
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(ids, (std::vector<int64_t>{32, 33, 34}));
  // Layer 1 alone may run ahead of layer 0; a range over both is then out of step.
  AppendBatch one = batch;
  one.layer_begin = 1;
  one.keys = batch.keys.substr(0, batch.keys.size() / 2);
  one.values = batch.values.substr(0, batch.values.size() / 2);
  KVR_ASSERT_OK(service_->AppendTokens("", chain.back(), one).status());
  EXPECT_THAT(service_->AppendTokens("", chain.back(), batch),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

// Decode tokens for both layers: every element `value`.
struct Tokens {
  std::vector<float> k, v;
  AppendBatch Batch(int64_t expected) const {
    AppendBatch b;
    b.layer_begin = 0;
    b.layer_end = kLayers;
    b.num_tokens = static_cast<int32_t>(k.size() / (kLayers * kKvHeads * kDim));
    b.keys = absl::string_view(reinterpret_cast<const char*>(k.data()), k.size() * 4);
    b.values = absl::string_view(reinterpret_cast<const char*>(v.data()), v.size() * 4);
    b.expected_position = expected;
    return b;
  }
};
Tokens MakeTokens(int n, float value) {
  Tokens t;
  t.k.assign(static_cast<size_t>(kLayers) * kKvHeads * n * kDim, value);
  t.v.assign(t.k.size(), -value);
  return t;
}

TEST_F(RetrievalServiceTest, AppendsAtAnExpectedPositionAreIdempotentAndDivergentOnesFork) {
  auto chain = StoreContext(32, 12);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  const Hash128 ctx = chain.back();
  auto tokens_of = [&](const Hash128& id) {
    std::vector<std::vector<int64_t>> lists(kKvHeads, std::vector<int64_t>{0});
    auto model = service_->ContextModel("", id, absl::InfiniteFuture());
    EXPECT_TRUE(model.ok()) << model.status();
    RetrieveRequest req;
    req.context = id;
    req.layer = 1;
    const auto q = RandomQueries(1);
    req.queries = q;
    req.index.kind = "all";
    auto r = service_->Attend(req);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->stats.context_tokens : -1;
  };
  auto key_at = [&](const Hash128& id, int64_t pos) {
    auto rows = service_->GatherKv("", id, 0, {{pos}, {pos}}, absl::InfiniteFuture());
    EXPECT_TRUE(rows.ok()) << rows.status();
    float x = 0;
    if (rows.ok()) std::memcpy(&x, rows->keys.data(), 4);
    return x;
  };
  const Tokens a = MakeTokens(2, 1.0f), b = MakeTokens(2, 2.0f), c = MakeTokens(1, 3.0f);
  Hash128 to;
  KVR_ASSERT_OK_AND_ASSIGN(int64_t first, service_->AppendTokens("", ctx, a.Batch(32), &to));
  EXPECT_EQ(first, 32);
  EXPECT_EQ(to, ctx);
  // A retry of the same append changes nothing.
  KVR_ASSERT_OK_AND_ASSIGN(first, service_->AppendTokens("", ctx, a.Batch(32), &to));
  EXPECT_EQ(first, 32);
  EXPECT_EQ(to, ctx);
  EXPECT_EQ(tokens_of(ctx), 34);
  // The next one goes on; a gap or a position inside the prefix is refused.
  KVR_ASSERT_OK(service_->AppendTokens("", ctx, c.Batch(34)).status());
  EXPECT_THAT(service_->AppendTokens("", ctx, c.Batch(40)),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("past the next")));
  EXPECT_THAT(service_->AppendTokens("", ctx, c.Batch(5)),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("prefix")));
  // Another decode of the same prefix writes other tokens at 32: it forks.
  KVR_ASSERT_OK_AND_ASSIGN(first, service_->AppendTokens("", ctx, b.Batch(32), &to));
  EXPECT_EQ(first, 32);
  EXPECT_NE(to, ctx);
  const Hash128 fork = to;
  EXPECT_EQ(tokens_of(ctx), 35);  // untouched: a's two tokens and c
  EXPECT_EQ(key_at(ctx, 32), 1.0f);
  EXPECT_EQ(tokens_of(fork), 34);
  EXPECT_EQ(key_at(fork, 32), 2.0f);
  EXPECT_EQ(key_at(fork, 31), key_at(ctx, 31));  // the shared prefix
  // Its retry lands in the same fork and changes nothing.
  KVR_ASSERT_OK_AND_ASSIGN(first, service_->AppendTokens("", ctx, b.Batch(32), &to));
  EXPECT_EQ(to, fork);
  EXPECT_EQ(tokens_of(fork), 34);
  // Without an expected position, tokens go at the end (as before).
  KVR_ASSERT_OK_AND_ASSIGN(first, service_->AppendTokens("", ctx, c.Batch(-1)));
  EXPECT_EQ(first, 35);
}

TEST_F(RetrievalServiceTest, AnIdleCloseNeverSilentlyDropsAppendedTokens) {
  RetrievalOptions options;
  options.context_idle_ttl = absl::Milliseconds(1);
  service_.reset();
  store_.reset();
  OpenAll(options);
  auto chain = StoreContext(32, 13);
  auto other = StoreContext(16, 14);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  KVR_ASSERT_OK(service_->AppendTokens("", chain.back(), MakeTokens(2, 1.0f).Batch(32)).status());
  absl::SleepFor(absl::Milliseconds(20));  // let the TTL pass (no thread ordering involved)
  // Opening any context closes idle ones: ours held 2 appended tokens.
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", other, absl::InfiniteFuture()).status());
  EXPECT_THAT(service_->AppendTokens("", chain.back(), MakeTokens(1, 1.0f).Batch(34)),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("2 appended")));
  EXPECT_THAT(service_->ContextModel("", chain.back(), absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  // Opened again on purpose, it holds its prefix and takes appends from 32.
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  KVR_ASSERT_OK_AND_ASSIGN(int64_t first,
                           service_->AppendTokens("", chain.back(),
                                                  MakeTokens(1, 1.0f).Batch(32)));
  EXPECT_EQ(first, 32);
}

TEST_F(RetrievalServiceTest, QuotasOfContextsBuildsAndQueriesNameTheirFlag) {
  RetrievalOptions options;
  options.tenant_contexts = 1;
  options.tenant_builds = 1;
  options.max_context_query_bytes = 2 * kQHeads * kDim * 4;  // two query rows
  service_.reset();
  store_.reset();
  OpenAll(options);
  auto a = StoreContext(32, 21);
  auto b = StoreContext(16, 22);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", a, absl::InfiniteFuture()).status());
  EXPECT_THAT(service_->OpenContext("", "tiny", b, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("--tenant_contexts")));
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", a, absl::InfiniteFuture()).status());  // same
  const std::vector<float> q(3 * kQHeads * kDim, 0.5f);
  EXPECT_THAT(service_->AddQueries("", a.back(), 0, 0, 3, q),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("--max_context_query_bytes")));
  KVR_ASSERT_OK(service_->AddQueries("", a.back(), 0, 0, 2,
                                     absl::MakeConstSpan(q).subspan(0, 2 * kQHeads * kDim)));
  EXPECT_THAT(service_->AddQueries("", a.back(), 1, 0, 1,
                                   absl::MakeConstSpan(q).subspan(0, kQHeads * kDim)),
              StatusIs(absl::StatusCode::kResourceExhausted));
  // Builds: one queued or running per tenant.
  BuildIndexRequest req;
  req.context = a.back();
  req.kind = "roar";
  KVR_ASSERT_OK_AND_ASSIGN(std::string op, service_->BuildIndex(req));
  auto second = service_->BuildIndex(req);
  if (!second.ok()) {
    EXPECT_THAT(second, StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("--tenant_builds")));
  } else {
    // The first one already finished: then the quota had room.
    KVR_ASSERT_OK(service_->WaitOperation("", *second, absl::InfiniteFuture()).status());
  }
  KVR_ASSERT_OK(service_->WaitOperation("", op, absl::InfiniteFuture()).status());
  KVR_ASSERT_OK(service_->CloseContext("", a.back()));
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", b, absl::InfiniteFuture()).status());
}

TEST_F(RetrievalServiceTest, TheBuildQueueIsBounded) {
  RetrievalOptions options;
  options.max_queued_builds = 1;
  service_.reset();
  store_.reset();
  OpenAll(options);
  auto chain = StoreContext(16 * kBlock, 23);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  BuildIndexRequest req;
  req.context = chain.back();
  req.kind = "faiss_hnsw";  // milliseconds per build: the queue fills behind the first
  std::vector<std::string> accepted;
  int refused = 0;
  for (int i = 0; i < 6; ++i) {
    absl::StatusOr<std::string> op = service_->BuildIndex(req);
    if (op.ok()) {
      accepted.push_back(*op);
    } else {
      EXPECT_THAT(op, StatusIs(absl::StatusCode::kResourceExhausted,
                               HasSubstr("--max_queued_builds=1")));
      ++refused;
    }
  }
  EXPECT_GT(refused, 0);
  EXPECT_GE(accepted.size(), 1u);
  for (const std::string& op : accepted) {
    KVR_ASSERT_OK_AND_ASSIGN(OperationInfo info,
                             service_->WaitOperation("", op, absl::InfiniteFuture()));
    EXPECT_EQ(info.state, OperationState::kDone) << info.error;
  }
  KVR_EXPECT_OK(service_->BuildIndex(req).status());  // room again
}

TEST_F(RetrievalServiceTest, ArtifactsAreVersionedPerNamespace) {
  EXPECT_THAT(service_->PutArtifact("a", false, "nope", "loki_basis", "x", ""),
              StatusIs(absl::StatusCode::kNotFound));
  KVR_ASSERT_OK_AND_ASSIGN(int64_t v1,
                           service_->PutArtifact("a", false, "tiny", "loki_basis", "one", "first"));
  KVR_ASSERT_OK_AND_ASSIGN(int64_t v2,
                           service_->PutArtifact("a", false, "tiny", "loki_basis", "two", "second"));
  KVR_ASSERT_OK_AND_ASSIGN(int64_t p1, service_->PutArtifact("a", false, "tiny", "policy", "p", ""));
  EXPECT_EQ(v1, 1);
  EXPECT_EQ(v2, 2);
  EXPECT_EQ(p1, 1);
  KVR_ASSERT_OK_AND_ASSIGN(auto latest, service_->GetArtifact("a", false, "tiny", "loki_basis", 0));
  EXPECT_EQ(latest.second, "two");
  EXPECT_EQ(latest.first.description, "second");
  KVR_ASSERT_OK_AND_ASSIGN(auto first, service_->GetArtifact("a", false, "tiny", "loki_basis", 1));
  EXPECT_EQ(first.second, "one");
  EXPECT_THAT(service_->GetArtifact("a", false, "tiny", "loki_basis", 3),
              StatusIs(absl::StatusCode::kNotFound));
  KVR_ASSERT_OK_AND_ASSIGN(auto all, service_->ListArtifacts("a", "tiny"));
  EXPECT_EQ(all.size(), 3u);

  // Tenant b sees none of a's, and its own versions start at 1.
  EXPECT_THAT(service_->GetArtifact("b", false, "tiny", "loki_basis", 0),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(service_->GetArtifact("b", false, "tiny", "loki_basis", 1),
              StatusIs(absl::StatusCode::kNotFound));
  KVR_ASSERT_OK_AND_ASSIGN(auto none, service_->ListArtifacts("b", "tiny"));
  EXPECT_TRUE(none.empty());
  KVR_ASSERT_OK_AND_ASSIGN(int64_t b1,
                           service_->PutArtifact("b", false, "tiny", "loki_basis", "bee", ""));
  EXPECT_EQ(b1, 1);
  KVR_ASSERT_OK_AND_ASSIGN(latest, service_->GetArtifact("a", false, "tiny", "loki_basis", 0));
  EXPECT_EQ(latest.second, "two");  // b cannot replace what a's builds load

  // The shared namespace is read by everyone, listed as shared.
  KVR_ASSERT_OK(service_->PutArtifact("admin", true, "tiny", "loki_basis", "shared", "").status());
  KVR_ASSERT_OK_AND_ASSIGN(auto shared, service_->GetArtifact("b", true, "tiny", "loki_basis", 0));
  EXPECT_EQ(shared.second, "shared");
  EXPECT_TRUE(shared.first.shared);
  KVR_ASSERT_OK_AND_ASSIGN(auto listed, service_->ListArtifacts("b", "tiny"));
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_FALSE(listed[0].shared);
  EXPECT_TRUE(listed[1].shared);
}

TEST_F(RetrievalServiceTest, OperationsBelongToTheirTenantAndHaveUnguessableIds) {
  const std::vector<Hash128> chain = StoreContext(2 * kBlock, 91);
  KVR_ASSERT_OK(service_->OpenContext("", "tiny", chain, absl::InfiniteFuture()).status());
  BuildIndexRequest req;
  req.context = chain.back();
  req.kind = "flat";
  KVR_ASSERT_OK_AND_ASSIGN(std::string op1, service_->BuildIndex(req));
  KVR_ASSERT_OK_AND_ASSIGN(std::string op2, service_->BuildIndex(req));
  EXPECT_THAT(op1, ::testing::MatchesRegex("op-[0-9a-f]{32}"));
  EXPECT_NE(op1, op2);
  EXPECT_THAT(service_->GetOperation("other", op1), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(service_->WaitOperation("other", op1, absl::InfiniteFuture()),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(service_->CancelOperation("other", op1), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_TRUE(service_->ListOperations("other").empty());
  KVR_ASSERT_OK_AND_ASSIGN(OperationInfo done,
                           service_->WaitOperation("", op1, absl::InfiniteFuture()));
  EXPECT_EQ(done.state, OperationState::kDone) << done.error;
  EXPECT_EQ(service_->ListOperations("").size(), 2u);
}

}  // namespace
}  // namespace kvrecall::retrieval
