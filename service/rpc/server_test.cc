// Tests of the Server over a real loopback port: health, reflection,
// metrics over HTTP, the port file, message limits and shutdown.

#include "service/rpc/server.h"

#include <string>

#include <httplib.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvrecall/v1/admin.grpc.pb.h"
#include "kvrecall/v1/kv_store.grpc.pb.h"
#include "service/rpc/metrics_http.h"
#include "service/rpc/testing/observed_store.h"
#include "service/store/tiered_store.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/byte_buffer.h>

namespace kvrecall::rpc {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;
using testing::ObservedStore;

constexpr auto kRealStore = &store::TieredStore::Open;

ServerOptions LoopbackOptions() {
  ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.store.data_dir = kvrecall::testing::MakeTempDir("server-test");
  return options;
}

std::string ToString(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string out;
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// Calls a unary method with raw serialized bytes (for services whose stubs
// gRPC does not install, like grpc.health.v1.Health).
grpc::Status RawUnary(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                      const std::string& request, std::string* response) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::Slice slice(request);
  grpc::ByteBuffer req(&slice, 1);
  grpc::ByteBuffer resp;
  absl::Mutex mu;
  bool done = false;
  grpc::Status status;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &req, &resp, [&](grpc::Status s) {
    absl::MutexLock lock(&mu);
    status = s;
    done = true;
  });
  absl::MutexLock lock(&mu);
  mu.Await(absl::Condition(&done));
  if (status.ok()) *response = ToString(resp);
  return status;
}

TEST(ServerTest, ServesHealthReflectionAndWritesThePortFile) {
  ServerOptions options = LoopbackOptions();
  options.port_file = options.store.data_dir + "/port";
  KVR_ASSERT_OK_AND_ASSIGN(auto server, Server::Create(options, kRealStore));
  ASSERT_GT(server->port(), 0);
  KVR_ASSERT_OK_AND_ASSIGN(std::string port_text, ReadFileToString(options.port_file));
  int port = 0;
  ASSERT_TRUE(absl::SimpleAtoi(absl::StripAsciiWhitespace(port_text), &port));
  EXPECT_EQ(port, server->port());

  auto channel = grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials());
  std::string response;
  // grpc.health.v1.HealthCheckRequest{service: ""} is empty; SERVING is status = 1.
  ASSERT_TRUE(RawUnary(channel, "/grpc.health.v1.Health/Check", "", &response).ok());
  EXPECT_EQ(response, std::string("\x08\x01", 2));

  // Server reflection: ServerReflectionRequest{list_services: "*"} (field 7).
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::CompletionQueue cq;
  auto call = stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                               &cq);
  void* tag = nullptr;
  bool ok = false;
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::Slice slice(std::string("\x3a\x01*", 3));
  grpc::ByteBuffer req(&slice, 1);
  call->Write(req, reinterpret_cast<void*>(2));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::ByteBuffer resp;
  call->Read(&resp, reinterpret_cast<void*>(3));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  const std::string services = ToString(resp);
  EXPECT_THAT(services, HasSubstr("kvrecall.v1.KvStore"));
  EXPECT_THAT(services, HasSubstr("kvrecall.v1.Admin"));
  EXPECT_THAT(services, HasSubstr("grpc.health.v1.Health"));
  call->WritesDone(reinterpret_cast<void*>(4));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  grpc::Status finish;
  call->Finish(&finish, reinterpret_cast<void*>(5));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }

  KVR_EXPECT_OK(server->Shutdown(absl::Seconds(5)));
  // After shutdown the health service no longer answers SERVING.
  EXPECT_FALSE(RawUnary(channel, "/grpc.health.v1.Health/Check", "", &response).ok() &&
               response == std::string("\x08\x01", 2));
}

TEST(ServerTest, MetricsOverHttp) {
  ServerOptions options = LoopbackOptions();
  // Pick a free port for the metrics endpoint through the library itself.
  options.metrics_port = 0;
  KVR_ASSERT_OK_AND_ASSIGN(auto server, Server::Create(options, kRealStore));
  KVR_ASSERT_OK_AND_ASSIGN(auto http, MetricsHttpServer::Start("127.0.0.1", 0, server->metrics()));
  auto admin = v1::Admin::NewStub(server->InProcessChannel());
  grpc::ClientContext ctx;
  v1::StatsResponse stats;
  ASSERT_TRUE(admin->Stats(&ctx, v1::StatsRequest(), &stats).ok());

  httplib::Client client("127.0.0.1", http->port());
  auto res = client.Get("/metrics");
  ASSERT_TRUE(res) << "no HTTP response";
  EXPECT_EQ(res->status, 200);
  EXPECT_THAT(res->body, HasSubstr(
                             "kvrecall_rpc_calls_total{code=\"OK\",method=\"kvrecall.v1.Admin/Stats\"} 1"));
  EXPECT_THAT(res->body, HasSubstr("kvrecall_rpc_latency_seconds"));
}

TEST(ServerTest, DaemonMetricsPortServesToo) {
  // A free port found by binding one with the metrics server and releasing
  // it; another process may take it meanwhile, so try a few. Failing to
  // start on every one is a failure, not a skip.
  MetricsRegistry scratch;
  absl::StatusOr<std::unique_ptr<Server>> server = absl::UnknownError("not tried");
  int free_port = 0;
  for (int attempt = 0; attempt < 5 && !server.ok(); ++attempt) {
    {
      KVR_ASSERT_OK_AND_ASSIGN(auto probe, MetricsHttpServer::Start("127.0.0.1", 0, &scratch));
      free_port = probe->port();
    }
    ServerOptions options = LoopbackOptions();
    options.metrics_port = free_port;
    server = Server::Create(options, kRealStore);
  }
  KVR_ASSERT_OK(server.status());
  EXPECT_EQ((*server)->metrics_port(), free_port);
  httplib::Client client("127.0.0.1", free_port);
  auto res = client.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
}

TEST(ServerTest, ShutdownSyncsTheStoreOnce) {
  ObservedStore* observed = nullptr;
  auto opener = [&](const store::TieredStoreOptions& o) { return ObservedStore::Open(o, &observed); };
  KVR_ASSERT_OK_AND_ASSIGN(auto server, Server::Create(LoopbackOptions(), opener));
  ASSERT_NE(observed, nullptr);
  KVR_EXPECT_OK(server->Shutdown(absl::Seconds(1)));
  KVR_EXPECT_OK(server->Shutdown(absl::Seconds(1)));
  EXPECT_EQ(observed->sync_calls(), 1);
}

TEST(ServerTest, RefusesBadOptionsAndBusyPorts) {
  ServerOptions options = LoopbackOptions();
  options.max_message_bytes = 10;
  EXPECT_THAT(Server::Create(options, kRealStore),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--max_message_bytes")));

  KVR_ASSERT_OK_AND_ASSIGN(auto first, Server::Create(LoopbackOptions(), kRealStore));
  ServerOptions busy = LoopbackOptions();
  busy.listen_address = first->address();
  EXPECT_THAT(Server::Create(busy, kRealStore),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("--listen")));

  ServerOptions tenants = LoopbackOptions();
  tenants.tenants_file = tenants.store.data_dir + "/missing";
  EXPECT_THAT(Server::Create(tenants, kRealStore),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(ServerTest, MessagesOverTheLimitAreResourceExhausted) {
  ServerOptions options = LoopbackOptions();
  options.max_message_bytes = 1 << 20;
  options.get_chunk_bytes = 256 << 10;
  KVR_ASSERT_OK_AND_ASSIGN(auto server, Server::Create(options, kRealStore));
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(64 << 20);
  auto channel = grpc::CreateCustomChannel(server->address(), grpc::InsecureChannelCredentials(),
                                           args);
  auto kv = v1::KvStore::NewStub(channel);
  grpc::ClientContext ctx;
  v1::PutSpansResponse resp;
  auto writer = kv->PutSpans(&ctx, &resp);
  v1::PutSpansRequest big;
  big.set_payload_chunk(std::string(2 << 20, 'x'));
  writer->Write(big);
  writer->WritesDone();
  const grpc::Status s = writer->Finish();
  EXPECT_EQ(s.error_code(), grpc::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_EQ(server->store()->Stats().tiers[0].spans, 0);
}

// Streams run as callback reactors, outside the --rpc_threads pool: the
// daemon-wide bound on concurrent streams is what refuses one too many.
TEST(ServerTest, StreamsBeyondTheConcurrentBoundAreResourceExhausted) {
  ServerOptions options = LoopbackOptions();
  options.max_concurrent_streams = 2;
  KVR_ASSERT_OK_AND_ASSIGN(auto server, Server::Create(options, kRealStore));
  auto channel = grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials());
  auto kv = v1::KvStore::NewStub(channel);
  // The server admits a stream when its call arrives, after the client's
  // call has started: wait for it to count each one.
  auto await_streams = [&](int64_t n) {
    for (int i = 0; i < 1000 && server->streams_in_flight() != n; ++i) {
      absl::SleepFor(absl::Milliseconds(5));
    }
    ASSERT_EQ(server->streams_in_flight(), n);
  };
  // Two PutSpans streams held open (nothing written yet).
  grpc::ClientContext c1, c2;
  v1::PutSpansResponse r1, r2;
  auto w1 = kv->PutSpans(&c1, &r1);
  await_streams(1);
  auto w2 = kv->PutSpans(&c2, &r2);
  await_streams(2);
  grpc::Status s;
  {
    grpc::ClientContext c3;
    v1::PutSpansResponse r3;
    auto w3 = kv->PutSpans(&c3, &r3);
    w3->WritesDone();
    s = w3->Finish();
  }
  EXPECT_EQ(s.error_code(), grpc::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("--max_concurrent_streams"));
  v1::RegisterModelRequest reg;
  reg.mutable_model()->set_model_id("m");
  reg.mutable_model()->set_num_layers(1);
  reg.mutable_model()->set_num_q_heads(1);
  reg.mutable_model()->set_num_kv_heads(1);
  reg.mutable_model()->set_head_dim(4);
  reg.mutable_model()->set_dtype(v1::DTYPE_F32);
  reg.mutable_model()->set_block_tokens(8);
  {
    grpc::ClientContext rc;
    v1::RegisterModelResponse rr;
    ASSERT_TRUE(kv->RegisterModel(&rc, reg, &rr).ok());
  }
  grpc::ClientContext g;
  v1::GetSpansRequest get;
  get.set_model_id("m");
  get.add_hashes(std::string(16, '\1'));
  auto reader = kv->GetSpans(&g, get);
  v1::GetSpansResponse msg;
  while (reader->Read(&msg)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::RESOURCE_EXHAUSTED);
  // Ending one frees its place.
  w1->WritesDone();
  EXPECT_EQ(w1->Finish().error_code(), grpc::INVALID_ARGUMENT);  // an empty stream
  await_streams(1);
  {
    grpc::ClientContext c4;
    v1::PutSpansResponse r4;
    auto w4 = kv->PutSpans(&c4, &r4);
    w4->WritesDone();
    s = w4->Finish();
  }
  EXPECT_EQ(s.error_code(), grpc::INVALID_ARGUMENT) << s.error_message();
  w2->WritesDone();
  w2->Finish().IgnoreError();
}

}  // namespace
}  // namespace kvrecall::rpc
