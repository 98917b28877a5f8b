// KvStoreClient against the real server in-process (clients/cpp/testing/
// test_store.h picks the store), and against small fake services for
// retries, deadlines, metadata and checksum verification.

#include "clients/cpp/kv_store_client.h"

#include <atomic>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "clients/cpp/span_keys.h"
#include "clients/cpp/testing/test_store.h"
#include "common/checksum.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/rpc/server.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"
#include <grpcpp/server_builder.h>

namespace kvrecall::client {
namespace {

using ::kvrecall::testing::IsOk;
using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint32_t kSeed = 424242;

v1::ModelGeometry Model() {
  v1::ModelGeometry g;
  g.set_model_id("client-test-model");
  g.set_num_layers(4);
  g.set_num_q_heads(4);
  g.set_num_kv_heads(2);
  g.set_head_dim(16);
  g.set_dtype(v1::DTYPE_BF16);
  g.set_keys_post_rope(true);
  g.set_block_tokens(32);
  return g;
}

class KvStoreClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    rpc::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.store.data_dir = kvrecall::testing::MakeTempDir("client-test");
    options.store.memory_capacity_bytes = 64 << 20;
    KVR_ASSERT_OK_AND_ASSIGN(server_,
                             rpc::Server::Create(options, testing::TestStoreOpener()));
    ClientOptions client_options;
    client_options.channel = server_->InProcessChannel();
    client_options.chunk_bytes = 4096;  // several chunks per span
    KVR_ASSERT_OK_AND_ASSIGN(client_, KvStoreClient::Create(client_options));
    KVR_ASSERT_OK(client_->RegisterModel(Model()).status());
  }

  // A random sequence of `tokens` tokens and its K/V bytes.
  void MakeSequence(int tokens, uint32_t seed, std::vector<uint32_t>* ids, std::string* kv) {
    std::mt19937 rng(seed);
    ids->resize(tokens);
    for (auto& t : *ids) t = rng() % 50000;
    kv->resize(SpanPayloadBytes(Model(), tokens));
    for (char& c : *kv) c = static_cast<char>(rng());
  }

  static std::vector<SpanToPut> ToPut(const std::vector<OwnedSpan>& spans, bool durable) {
    std::vector<SpanToPut> out;
    for (const auto& s : spans) {
      out.push_back(SpanToPut{s.hash, s.parent, static_cast<int32_t>(s.token_ids.size()),
                              s.token_ids, s.payload, durable});
    }
    return out;
  }

  std::unique_ptr<rpc::Server> server_;
  std::unique_ptr<KvStoreClient> client_;
};

TEST_F(KvStoreClientTest, SequenceRoundTripWithLookupFirst) {
  SCOPED_TRACE(absl::StrCat("seed ", kSeed, " store ", testing::TestStoreName()));
  std::vector<uint32_t> ids;
  std::string kv;
  MakeSequence(100, kSeed, &ids, &kv);  // 3 full spans + a partial one
  KVR_ASSERT_OK_AND_ASSIGN(auto spans, SequenceToSpans(Model(), "", ids, kv, true));
  ASSERT_EQ(spans.size(), 4u);
  std::vector<Hash128> hashes;
  for (const auto& s : spans) hashes.push_back(s.hash);

  KVR_ASSERT_OK_AND_ASSIGN(LookupResult before, client_->Lookup(Model().model_id(), hashes));
  EXPECT_EQ(before.prefix_spans, 0);
  ASSERT_EQ(before.missing.size(), 4u);
  EXPECT_EQ(before.missing[0].reason, v1::MISS_REASON_NEVER_STORED);

  int progress_calls = 0;
  PutOptions put_options;
  put_options.progress = [&](const Progress& p) {
    ++progress_calls;
    EXPECT_LE(p.done, p.total);
    return true;
  };
  KVR_ASSERT_OK_AND_ASSIGN(auto results,
                           client_->PutSpans(Model().model_id(), ToPut(spans, true), put_options));
  ASSERT_EQ(results.size(), 4u);
  EXPECT_GT(progress_calls, 4);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(results[i].hash, spans[i].hash);
    EXPECT_FALSE(results[i].already_present);
    EXPECT_NE(results[i].durable_tier, v1::TIER_UNSPECIFIED) << "durable spans name their tier";
  }

  KVR_ASSERT_OK_AND_ASSIGN(LookupResult after, client_->LookupTokens(Model().model_id(), ids));
  EXPECT_EQ(after.prefix_spans, 3);  // the partial tail is not hashed by LookupTokens' default
  EXPECT_EQ(after.prefix_tokens, 96);
  ASSERT_EQ(after.hashes.size(), 3u);
  EXPECT_EQ(after.hashes[2], hashes[2]);

  KVR_ASSERT_OK_AND_ASSIGN(auto fetched, client_->GetSpans(Model().model_id(), hashes));
  ASSERT_EQ(fetched.size(), 4u);
  std::vector<absl::string_view> payloads;
  std::vector<int32_t> counts;
  for (const auto& f : fetched) {
    ASSERT_TRUE(f.found) << MissReasonName(f.miss_reason);
    payloads.push_back(f.payload);
    counts.push_back(f.num_tokens);
  }
  KVR_ASSERT_OK_AND_ASSIGN(std::string back, SpansToSequence(Model(), 4, payloads, counts));
  EXPECT_EQ(back, kv);
}

TEST_F(KvStoreClientTest, LayerByLayerStreaming) {
  std::vector<uint32_t> ids;
  std::string kv;
  MakeSequence(64, kSeed + 1, &ids, &kv);
  KVR_ASSERT_OK_AND_ASSIGN(auto spans, SequenceToSpans(Model(), "", ids, kv, false));
  KVR_ASSERT_OK(client_->PutSpans(Model().model_id(), ToPut(spans, false)).status());
  std::vector<Hash128> hashes = {spans[0].hash, spans[1].hash};
  for (int layer = 0; layer < 4; ++layer) {
    std::vector<std::string> got;
    KVR_ASSERT_OK(client_->GetSpansStreaming(Model().model_id(), hashes, {layer, layer + 1},
                                             [&](FetchedSpan&& s) {
                                               EXPECT_EQ(s.shape[0], 1);
                                               got.push_back(std::move(s.payload));
                                               return absl::OkStatus();
                                             }));
    ASSERT_EQ(got.size(), 2u);
    const int64_t layer_bytes = SpanPayloadBytes(Model(), 32) / 4;
    for (int s = 0; s < 2; ++s) {
      EXPECT_EQ(got[s], spans[s].payload.substr(layer * layer_bytes, layer_bytes));
    }
  }
  // A callback error cancels the call and is returned.
  EXPECT_THAT(client_->GetSpansStreaming(Model().model_id(), hashes, {},
                                         [](FetchedSpan&&) { return absl::AbortedError("stop"); }),
              StatusIs(absl::StatusCode::kAborted, "stop"));
}

TEST_F(KvStoreClientTest, PinDeleteAndAdmin) {
  std::vector<uint32_t> ids;
  std::string kv;
  MakeSequence(32, kSeed + 2, &ids, &kv);
  KVR_ASSERT_OK_AND_ASSIGN(auto spans, SequenceToSpans(Model(), "", ids, kv, false));
  KVR_ASSERT_OK(client_->PutSpans(Model().model_id(), ToPut(spans, false)).status());
  const Hash128 missing{9, 9};
  KVR_ASSERT_OK_AND_ASSIGN(auto pinned, client_->PinSpans({spans[0].hash, missing},
                                                          absl::Minutes(5)));
  ASSERT_EQ(pinned.size(), 2u);
  EXPECT_THAT(pinned[0], IsOk());
  EXPECT_THAT(pinned[1], StatusIs(absl::StatusCode::kNotFound));
  KVR_ASSERT_OK_AND_ASSIGN(auto unpinned, client_->UnpinSpans({spans[0].hash}));
  EXPECT_THAT(unpinned[0], IsOk());
  KVR_ASSERT_OK_AND_ASSIGN(auto deleted, client_->DeleteSpans({spans[0].hash}));
  EXPECT_THAT(deleted[0], IsOk());
  KVR_ASSERT_OK_AND_ASSIGN(auto fetched, client_->GetSpans(Model().model_id(), {spans[0].hash}));
  EXPECT_EQ(fetched[0].miss_reason, v1::MISS_REASON_DELETED);

  KVR_ASSERT_OK_AND_ASSIGN(v1::StatsResponse stats, client_->Stats());
  EXPECT_GE(stats.tiers_size(), 1);
  EXPECT_EQ(stats.models(), 1);
  KVR_EXPECT_OK(client_->CheckCompatibility());
  KVR_ASSERT_OK_AND_ASSIGN(v1::ModelGeometry model, client_->GetModel(Model().model_id()));
  EXPECT_EQ(model.head_dim(), 16);
  EXPECT_THAT(client_->GetModel("nope"), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(KvStoreClientTest, ServerErrorsComeBackWithTheirCode) {
  std::vector<uint32_t> ids;
  std::string kv;
  MakeSequence(32, kSeed + 3, &ids, &kv);
  KVR_ASSERT_OK_AND_ASSIGN(auto spans, SequenceToSpans(Model(), "", ids, kv, false));
  EXPECT_THAT(client_->PutSpans("unknown-model", ToPut(spans, false)),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("unknown model")));
  std::vector<SpanToPut> wrong = ToPut(spans, false);
  const std::string short_payload = spans[0].payload.substr(1);
  wrong[0].payload = short_payload;
  EXPECT_THAT(client_->PutSpans(Model().model_id(), wrong),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("payload_bytes")));
  EXPECT_THAT(client_->GetSpans(Model().model_id(), {spans[0].hash}, {3, 9}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layers")));
}

TEST(KvStoreClientOptionsTest, BadOptionsAreRejected) {
  ClientOptions o;
  o.deadline_ms = 0;
  EXPECT_THAT(KvStoreClient::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = ClientOptions();
  o.max_attempts = 0;
  EXPECT_THAT(KvStoreClient::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = ClientOptions();
  o.chunk_bytes = o.max_message_bytes;
  EXPECT_THAT(KvStoreClient::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = ClientOptions();
  o.jitter = 1.5;
  EXPECT_THAT(KvStoreClient::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
}

// A KvStore/Admin double: Lookup fails UNAVAILABLE `unavailable_left` times,
// ListModels always fails INVALID_ARGUMENT, GetConfig blocks until the
// client's deadline, GetSpans sends a payload whose checksum is wrong.
class FlakyKvStore final : public v1::KvStore::Service {
 public:
  std::atomic<int> lookups{0};
  std::atomic<int> list_models{0};
  std::atomic<int> unavailable_left{0};
  std::string last_authorization;

  grpc::Status Lookup(grpc::ServerContext* ctx, const v1::LookupRequest*,
                      v1::LookupResponse* resp) override {
    ++lookups;
    auto it = ctx->client_metadata().find("authorization");
    if (it != ctx->client_metadata().end()) {
      last_authorization.assign(it->second.data(), it->second.size());
    }
    if (unavailable_left.fetch_sub(1) > 0) return grpc::Status(grpc::UNAVAILABLE, "restarting");
    resp->set_prefix_spans(7);
    return grpc::Status::OK;
  }
  grpc::Status ListModels(grpc::ServerContext*, const v1::ListModelsRequest*,
                          v1::ListModelsResponse*) override {
    ++list_models;
    return grpc::Status(grpc::INVALID_ARGUMENT, "no");
  }
  grpc::Status GetSpans(grpc::ServerContext*, const v1::GetSpansRequest* req,
                        grpc::ServerWriter<v1::GetSpansResponse>* writer) override {
    v1::GetSpansResponse msg;
    msg.mutable_header()->set_hash(req->hashes(0));
    msg.mutable_header()->set_found(true);
    msg.mutable_header()->set_parent_hash(std::string(16, '\0'));
    msg.mutable_header()->set_payload_bytes(5);
    msg.mutable_header()->set_payload_checksum(Checksum64("hello") + 1);
    msg.set_payload_chunk("hello");
    writer->Write(msg);
    return grpc::Status::OK;
  }
};

class SlowAdmin final : public v1::Admin::Service {
 public:
  grpc::Status GetConfig(grpc::ServerContext* ctx, const v1::GetConfigRequest*,
                         v1::GetConfigResponse*) override {
    while (!ctx->IsCancelled()) absl::SleepFor(absl::Milliseconds(1));
    return grpc::Status(grpc::CANCELLED, "cancelled");
  }
  grpc::Status Stats(grpc::ServerContext*, const v1::StatsRequest*,
                     v1::StatsResponse*) override {
    return grpc::Status::OK;
  }
};

class ClientRetryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.RegisterService(&kv_);
    builder.RegisterService(&admin_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }
  void TearDown() override { server_->Shutdown(); }

  std::unique_ptr<KvStoreClient> Client(int max_attempts, int64_t deadline_ms = 30000) {
    ClientOptions o;
    o.channel = server_->InProcessChannel(grpc::ChannelArguments());
    o.max_attempts = max_attempts;
    o.initial_backoff_ms = 1;
    o.max_backoff_ms = 4;
    o.deadline_ms = deadline_ms;
    o.bearer_token = "token-for-the-test";
    auto client = KvStoreClient::Create(o);
    EXPECT_TRUE(client.ok());
    return std::move(client).value();
  }

  FlakyKvStore kv_;
  SlowAdmin admin_;
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(ClientRetryTest, UnavailableIsRetriedUntilItSucceeds) {
  kv_.unavailable_left = 2;
  KVR_ASSERT_OK_AND_ASSIGN(LookupResult r, Client(5)->Lookup("m", {}));
  EXPECT_EQ(r.prefix_spans, 7);
  EXPECT_EQ(kv_.lookups.load(), 3);
  EXPECT_EQ(kv_.last_authorization, "Bearer token-for-the-test");
}

TEST_F(ClientRetryTest, RetriesStopAtMaxAttempts) {
  kv_.unavailable_left = 10;
  EXPECT_THAT(Client(3)->Lookup("m", {}), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(kv_.lookups.load(), 3);
}

TEST_F(ClientRetryTest, OtherErrorsAreNotRetried) {
  EXPECT_THAT(Client(5)->ListModels(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(kv_.list_models.load(), 1);
}

TEST_F(ClientRetryTest, EveryCallHasADeadline) {
  EXPECT_THAT(Client(1, /*deadline_ms=*/100)->GetConfig(),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
}

TEST_F(ClientRetryTest, APayloadCorruptedInTransitIsDataLoss) {
  EXPECT_THAT(Client(1)->GetSpans("m", {Hash128{1, 1}}),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("checksum")));
}

}  // namespace
}  // namespace kvrecall::client
