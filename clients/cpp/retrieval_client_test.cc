// RetrievalClient against the real server (with the Retrieval service) in-process.

#include "clients/cpp/retrieval_client.h"

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/span_keys.h"
#include "clients/cpp/testing/test_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/rpc/retrieval_rpc_service.h"
#include "service/rpc/server.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::client {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

constexpr int32_t kLayers = 2, kQHeads = 4, kKvHeads = 2, kDim = 16, kBlock = 32, kTokens = 150;

v1::ModelGeometry Model() {
  v1::ModelGeometry g;
  g.set_model_id("retrieval-client-model");
  g.set_num_layers(kLayers);
  g.set_num_q_heads(kQHeads);
  g.set_num_kv_heads(kKvHeads);
  g.set_head_dim(kDim);
  g.set_dtype(v1::DTYPE_F32);
  g.set_keys_post_rope(true);
  g.set_block_tokens(kBlock);
  return g;
}

class RetrievalClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    rpc::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.store.data_dir = kvrecall::testing::MakeTempDir("retrieval-client-test");
    options.store.memory_capacity_bytes = 64 << 20;
    KVR_ASSERT_OK_AND_ASSIGN(
        server_, rpc::Server::Create(options, testing::TestStoreOpener(),
                                     {rpc::RetrievalServiceFactory(retrieval::RetrievalOptions(),
                                                                   rpc::RetrievalRpcOptions())}));
    ClientOptions co;
    co.channel = server_->InProcessChannel();
    KVR_ASSERT_OK_AND_ASSIGN(kv_, KvStoreClient::Create(co));
    KVR_ASSERT_OK_AND_ASSIGN(rc_, RetrievalClient::Create(co));
    KVR_ASSERT_OK(kv_->RegisterModel(Model()).status());
    // A sequence of finite f32 K/V, stored as spans.
    std::mt19937 rng(77);
    std::normal_distribution<float> dist;
    std::vector<uint32_t> ids(kTokens);
    for (auto& t : ids) t = rng() % 1000;
    std::vector<float> kv(SpanPayloadBytes(Model(), kTokens) / 4);
    for (float& x : kv) x = dist(rng);
    KVR_ASSERT_OK_AND_ASSIGN(
        auto spans, SequenceToSpans(Model(), "", ids,
                                    absl::string_view(reinterpret_cast<const char*>(kv.data()),
                                                      kv.size() * 4),
                                    /*include_partial_tail=*/true));
    std::vector<SpanToPut> put;
    for (const auto& s : spans) {
      put.push_back(SpanToPut{s.hash, s.parent, static_cast<int32_t>(s.token_ids.size()),
                              s.token_ids, s.payload, false});
      chain_.push_back(s.hash);
    }
    KVR_ASSERT_OK(kv_->PutSpans(Model().model_id(), put).status());
    queries_.resize(kQHeads * kDim);
    for (float& x : queries_) x = dist(rng);
  }

  std::unique_ptr<rpc::Server> server_;
  std::unique_ptr<KvStoreClient> kv_;
  std::unique_ptr<RetrievalClient> rc_;
  std::vector<Hash128> chain_;
  std::vector<float> queries_;
};

TEST_F(RetrievalClientTest, OpenBuildSearchAttendAndStream) {
  KVR_ASSERT_OK_AND_ASSIGN(auto opened, rc_->OpenContext(Model().model_id(), chain_));
  EXPECT_EQ(opened.num_tokens(), kTokens);
  KVR_ASSERT_OK_AND_ASSIGN(Hash128 ctx, Hash128::FromBytes(opened.context()));
  EXPECT_EQ(ctx, chain_.back());

  RetrieveOptions o;
  o.kind = "flat";
  o.k = 5;
  EXPECT_THAT(rc_->Search(ctx, 1, queries_, kQHeads, o),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("build")));

  KVR_ASSERT_OK_AND_ASSIGN(v1::Operation op, rc_->BuildIndex(ctx, "flat"));
  int reports = 0;
  KVR_ASSERT_OK_AND_ASSIGN(op, rc_->WaitOperation(op.id(), absl::Minutes(1),
                                                   [&](const Progress&) {
                                                     ++reports;
                                                     return true;
                                                   }));
  EXPECT_EQ(op.state(), v1::OPERATION_STATE_DONE) << op.error_message();
  EXPECT_GE(reports, 1);
  KVR_ASSERT_OK_AND_ASSIGN(auto indexes, rc_->ListIndexes(ctx));
  EXPECT_EQ(indexes.size(), static_cast<size_t>(kLayers * kKvHeads));

  KVR_ASSERT_OK_AND_ASSIGN(v1::SearchResponse flat, rc_->Search(ctx, 1, queries_, kQHeads, o));
  o.kind = "all";
  KVR_ASSERT_OK_AND_ASSIGN(v1::SearchResponse exact, rc_->Search(ctx, 1, queries_, kQHeads, o));
  ASSERT_EQ(flat.heads_size(), kQHeads);
  for (int h = 0; h < kQHeads; ++h) {
    EXPECT_THAT(flat.heads(h).positions(), ::testing::ElementsAreArray(exact.heads(h).positions()));
  }

  // Attend over the flat top-5 with positions 0..9 excluded; the positions come back.
  o.kind = "flat";
  o.exclude = {{0, 10}};
  KVR_ASSERT_OK_AND_ASSIGN(AttendResult r, rc_->Attend(ctx, 1, queries_, kQHeads, o));
  ASSERT_EQ(r.out.size(), static_cast<size_t>(kQHeads * kDim));
  ASSERT_EQ(r.lse.size(), static_cast<size_t>(kQHeads));
  for (const auto& p : r.positions) {
    EXPECT_EQ(p.size(), 5u);
    for (int64_t id : p) EXPECT_GE(id, 10);
  }
  for (float x : r.out) EXPECT_TRUE(std::isfinite(x));

  // One stream, three requests (one per "layer" of a decode step); the bad
  // one (layer 9) fails in-band and the stream goes on.
  KVR_ASSERT_OK_AND_ASSIGN(auto stream, rc_->OpenAttendStream(absl::Minutes(1)));
  for (int layer : {0, 9, 1}) {
    v1::AttendRequest req = MakeAttendRequest(ctx, layer, queries_, kQHeads, o);
    req.set_request_id(100 + layer);
    ASSERT_TRUE(stream->Send(req));
    KVR_ASSERT_OK_AND_ASSIGN(v1::AttendResponse resp, stream->Receive());
    EXPECT_EQ(resp.request_id(), static_cast<uint64_t>(100 + layer));
    if (layer == 9) {
      EXPECT_EQ(resp.error_code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
    } else {
      KVR_ASSERT_OK_AND_ASSIGN(AttendResult one, ToAttendResult(resp));
      if (layer == 1) {
        for (size_t i = 0; i < one.out.size(); ++i) EXPECT_FLOAT_EQ(one.out[i], r.out[i]);
      }
    }
  }
  KVR_EXPECT_OK(stream->Finish());

  KVR_ASSERT_OK(rc_->DeleteIndex(ctx, "flat"));
  EXPECT_THAT(rc_->DeleteIndex(ctx, "flat"), StatusIs(absl::StatusCode::kNotFound));
  KVR_EXPECT_OK(rc_->CloseContext(ctx));
}

TEST_F(RetrievalClientTest, AttendByPositionsSelectKAndGatherKv) {
  KVR_ASSERT_OK_AND_ASSIGN(auto opened, rc_->OpenContext(Model().model_id(), chain_));
  KVR_ASSERT_OK_AND_ASSIGN(Hash128 ctx, Hash128::FromBytes(opened.context()));
  // Full attention over everything but [0, 10) that also selects the top 6.
  RetrieveOptions all;
  all.kind = "all";
  all.exclude = {{0, 10}};
  all.select_k = 6;
  KVR_ASSERT_OK_AND_ASSIGN(AttendResult full, rc_->Attend(ctx, 1, queries_, kQHeads, all));
  ASSERT_EQ(full.positions.size(), static_cast<size_t>(kQHeads));
  for (const auto& p : full.positions) {
    ASSERT_EQ(p.size(), 6u);
    for (int64_t id : p) EXPECT_GE(id, 10);
  }
  // A later layer reuses that selection: attend by positions, per query head.
  RetrieveOptions reuse;
  reuse.positions = full.positions;
  KVR_ASSERT_OK_AND_ASSIGN(AttendResult by_pos, rc_->Attend(ctx, 0, queries_, kQHeads, reuse));
  EXPECT_TRUE(by_pos.positions.empty());
  // The same as an exact search-and-attend of layer 1 over the same top 6.
  RetrieveOptions exact;
  exact.kind = "all";
  exact.k = 6;
  exact.exclude = {{0, 10}};
  KVR_ASSERT_OK_AND_ASSIGN(AttendResult top6, rc_->Attend(ctx, 1, queries_, kQHeads, exact));
  reuse.positions = full.positions;
  KVR_ASSERT_OK_AND_ASSIGN(AttendResult same, rc_->Attend(ctx, 1, queries_, kQHeads, reuse));
  for (size_t i = 0; i < same.out.size(); ++i) EXPECT_NEAR(same.out[i], top6.out[i], 1e-6);

  // Rows of two KV heads' positions in both layers, in small messages.
  std::vector<std::vector<int64_t>> lists = {{1, 149, 77}, {0}};
  std::vector<int32_t> layers_seen;
  int64_t rows = 0;
  KVR_ASSERT_OK(rc_->GatherKv(ctx, 0, 0, lists, [&](const v1::GatherKvResponse& m) {
    if (layers_seen.empty() || layers_seen.back() != m.layer()) layers_seen.push_back(m.layer());
    EXPECT_EQ(m.keys().shape(1), kDim);
    EXPECT_EQ(m.keys().data().size(), m.values().data().size());
    rows += m.keys().shape(0);
    return absl::OkStatus();
  }));
  EXPECT_EQ(layers_seen, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(rows, 8);
  // The callback's error stops the stream and is returned.
  EXPECT_THAT(rc_->GatherKv(ctx, 0, 2, lists,
                            [](const v1::GatherKvResponse&) { return absl::AbortedError("enough"); }),
              StatusIs(absl::StatusCode::kAborted, HasSubstr("enough")));
  EXPECT_THAT(rc_->GatherKv(ctx, 1, 3, lists,
                            [](const v1::GatherKvResponse&) { return absl::OkStatus(); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layers [1, 3)")));
}

// A queries tensor whose shape multiplies past 2^63 (2^57 x 4 x 16 x 4
// bytes: 0 modulo 2^64) must not pass the size check by wrapping: the server
// multiplied the extents in int64 (undefined behaviour) and compared the
// wrapped byte count with the empty data.
TEST_F(RetrievalClientTest, AQueriesShapeWhoseSizeWrapsIsInvalidArgument) {
  KVR_ASSERT_OK_AND_ASSIGN(auto opened, rc_->OpenContext(Model().model_id(), chain_));
  auto stub = v1::Retrieval::NewStub(server_->InProcessChannel());
  grpc::ClientContext context;
  v1::AddQueriesResponse response;
  auto writer = stub->AddQueries(&context, &response);
  v1::AddQueriesRequest msg;
  msg.set_context(opened.context());
  msg.set_layer(0);
  msg.mutable_queries()->set_dtype(v1::DTYPE_F32);
  for (int64_t s : {int64_t{1} << 57, int64_t{kQHeads}, int64_t{kDim}}) {
    msg.mutable_queries()->add_shape(s);
  }
  writer->Write(msg);
  writer->WritesDone();
  const grpc::Status status = writer->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
}

TEST_F(RetrievalClientTest, QueriesAppendsAndArtifacts) {
  KVR_ASSERT_OK_AND_ASSIGN(auto opened, rc_->OpenContext(Model().model_id(), chain_));
  KVR_ASSERT_OK_AND_ASSIGN(Hash128 ctx, Hash128::FromBytes(opened.context()));
  std::vector<float> prefill(kTokens * kQHeads * kDim, 0.25f);
  KVR_ASSERT_OK_AND_ASSIGN(int64_t stored, rc_->AddQueries(ctx, 0, 0, kQHeads, kDim, prefill));
  EXPECT_EQ(stored, kTokens);
  EXPECT_THAT(rc_->AddQueries(ctx, 0, 0, kQHeads, kDim, absl::MakeConstSpan(prefill).subspan(1)),
              StatusIs(absl::StatusCode::kInvalidArgument));

  v1::AppendTokensRequest append;
  append.set_context(ctx.ToBytes());
  std::vector<float> k(kLayers * kKvHeads * 2 * kDim, 0.5f);
  for (auto* t : {append.mutable_keys(), append.mutable_values()}) {
    t->set_dtype(v1::DTYPE_F32);
    for (int64_t s : {kLayers, kKvHeads, 2, kDim}) t->add_shape(s);
    t->set_data(reinterpret_cast<const char*>(k.data()), k.size() * 4);
  }
  KVR_ASSERT_OK_AND_ASSIGN(int64_t first, rc_->AppendTokens(append));
  EXPECT_EQ(first, kTokens);
  append.mutable_keys()->set_dtype(v1::DTYPE_BF16);  // the model stores f32
  EXPECT_THAT(rc_->AppendTokens(append), StatusIs(absl::StatusCode::kInvalidArgument));

  std::string big(3 << 20, 'x');  // several chunks
  big[12345] = 'y';
  KVR_ASSERT_OK_AND_ASSIGN(v1::ArtifactInfo info,
                           rc_->PutArtifact(Model().model_id(), "layer_policy", big, "test"));
  EXPECT_EQ(info.version(), 1);
  EXPECT_EQ(info.bytes(), static_cast<int64_t>(big.size()));
  KVR_ASSERT_OK_AND_ASSIGN(auto got, rc_->GetArtifact(Model().model_id(), "layer_policy"));
  EXPECT_EQ(got.second, big);
  EXPECT_EQ(got.first.description(), "test");
  KVR_ASSERT_OK_AND_ASSIGN(auto list, rc_->ListArtifacts(Model().model_id()));
  EXPECT_EQ(list.size(), 1u);
  EXPECT_THAT(rc_->GetArtifact(Model().model_id(), "nope"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(rc_->PutArtifact("unknown-model", "x", "y"), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace kvrecall::client
