// kvrecalld as a process with TLS (certificates made here with the openssl
// command), mutual TLS and a tenants file: who can connect, and the isolation
// matrix: tenant B tries every RPC on tenant A's spans, context, index build,
// indexes and artifacts, and learns nothing (NOT_FOUND / never_stored /
// PERMISSION_DENIED), while A's objects stay intact.

#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "clients/cli/cli.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/rpc_policy.h"
#include "clients/cpp/span_keys.h"
#include "common/npy.h"
#include "common/span_hash.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvrecall/v1/admin.grpc.pb.h"
#include "kvrecall/v1/kv_store.grpc.pb.h"
#include "kvrecall/v1/retrieval.grpc.pb.h"
#include "tests/integration/daemon_process.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

namespace kvrecall {
namespace {

using ::kvrecall::testing::DaemonProcess;

constexpr char kModel[] = "sec-model";
constexpr int kBlock = 16;
constexpr char kTokenA[] = "token-alpha-0123456789abcdef";
constexpr char kTokenB[] = "token-beta-0123456789abcdef01";
constexpr char kTokenAdmin[] = "token-admin-0123456789abcdef";
constexpr char kTokenC[] = "token-gamma-0123456789abcdef";  // alpha's trust group

int Sh(const std::string& command) { return std::system(command.c_str()); }

// A CA, a server certificate for 127.0.0.1/localhost, a client certificate
// of that CA, and a client certificate of another CA, in `dir`.
void MakeCertificates(const std::string& dir) {
  const std::string q = absl::StrCat("cd '", dir, "' && ");
  const std::string quiet = " >/dev/null 2>&1";
  ASSERT_EQ(Sh(q + "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kvr-test-ca "
                   "-keyout ca.key -out ca.pem" + quiet), 0) << "is the openssl command installed?";
  ASSERT_EQ(Sh(q + "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext && "
                   "openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key "
                   "-out server.csr" + quiet + " && openssl x509 -req -in server.csr -CA ca.pem "
                   "-CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out server.pem" +
                   quiet), 0);
  ASSERT_EQ(Sh(q + "openssl req -newkey rsa:2048 -nodes -subj /CN=client -keyout client.key "
                   "-out client.csr" + quiet + " && openssl x509 -req -in client.csr -CA ca.pem "
                   "-CAkey ca.key -CAcreateserial -days 2 -out client.pem" + quiet), 0);
  ASSERT_EQ(Sh(q + "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=rogue-ca "
                   "-keyout rogue-ca.key -out rogue-ca.pem" + quiet + " && openssl req -newkey "
                   "rsa:2048 -nodes -subj /CN=rogue -keyout rogue.key -out rogue.csr" + quiet +
                   " && openssl x509 -req -in rogue.csr -CA rogue-ca.pem -CAkey rogue-ca.key "
                   "-CAcreateserial -days 2 -out rogue.pem" + quiet), 0);
}

class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(kvrecall::testing::MakeTempDir("kvrecalld-sec"));
    MakeCertificates(*dir_);
    KVR_ASSERT_OK(WriteStringToFileAtomic(
        *dir_ + "/tenants",
        absl::StrCat("alpha ", kTokenA, " group=research\nbeta ", kTokenB, "\ngamma ", kTokenC,
                     " group=research\nops ", kTokenAdmin, " admin\n")));
    daemon_ = new DaemonProcess(
        *dir_ + "/data",
        {"--tls_cert_file=" + *dir_ + "/server.pem", "--tls_key_file=" + *dir_ + "/server.key",
         "--tls_client_ca_file=" + *dir_ + "/ca.pem", "--tenants_file=" + *dir_ + "/tenants",
         "--memory_capacity_bytes=64MiB", "--disk_capacity_bytes=64MiB",
         "--rocksdb_capacity_bytes=64MiB"});
    KVR_ASSERT_OK(daemon_->Start());
  }
  static void TearDownTestSuite() {
    if (daemon_ != nullptr) {
      EXPECT_THAT(daemon_->Stop(), ::kvrecall::testing::IsOk());
    }
    delete daemon_;
    daemon_ = nullptr;
  }

  static client::ClientOptions Options(const std::string& token, bool client_cert = true) {
    client::ClientOptions o;
    o.target = daemon_->address();
    o.bearer_token = token;
    o.tls_root_ca_file = *dir_ + "/ca.pem";
    if (client_cert) {
      o.tls_client_cert_file = *dir_ + "/client.pem";
      o.tls_client_key_file = *dir_ + "/client.key";
    }
    o.deadline_ms = 60000;
    o.max_attempts = 1;
    return o;
  }
  static std::shared_ptr<grpc::Channel> Channel(const client::ClientOptions& o) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    return grpc::CreateCustomChannel(o.target, client::ChannelCredentialsFor(o), args);
  }
  static std::unique_ptr<grpc::ClientContext> Ctx(const std::string& token) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    ctx->AddMetadata("authorization", absl::StrCat("Bearer ", token));
    return ctx;
  }

  static std::string* dir_;
  static DaemonProcess* daemon_;
};

std::string* SecurityTest::dir_ = nullptr;
DaemonProcess* SecurityTest::daemon_ = nullptr;

v1::ModelGeometry Model() {
  v1::ModelGeometry g;
  g.set_model_id(kModel);
  g.set_num_layers(2);
  g.set_num_q_heads(4);
  g.set_num_kv_heads(2);
  g.set_head_dim(16);
  g.set_dtype(v1::DTYPE_F32);
  g.set_block_tokens(kBlock);
  return g;
}

std::vector<client::OwnedSpan> Chain(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<client::OwnedSpan> spans;
  Hash128 parent = SpanRootHash(kModel);
  for (int i = 0; i < n; ++i) {
    client::OwnedSpan s;
    s.parent = parent;
    s.token_ids.resize(kBlock);
    for (auto& t : s.token_ids) t = static_cast<uint32_t>(rng() % 50000);
    s.hash = SpanHash(parent, s.token_ids);
    s.payload.resize(2 * 2 * 2 * kBlock * 16 * sizeof(float));
    for (size_t b = 0; b < s.payload.size(); b += 4) {
      const float v = dist(rng);
      std::memcpy(s.payload.data() + b, &v, 4);
    }
    parent = s.hash;
    spans.push_back(std::move(s));
  }
  return spans;
}

v1::Tensor F32(std::vector<int64_t> shape, float value) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_F32);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  std::vector<float> data(static_cast<size_t>(n), value);
  t.set_data(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(float));
  return t;
}

// Attention of layer 0 over positions 0 and 1 of each KV head.
v1::AttendRequest AttendByPositions(const std::string& context) {
  v1::AttendRequest r;
  r.set_context(context);
  *r.mutable_queries() = F32({4, 16}, 1.0f);
  for (int h = 0; h < 2; ++h) {
    r.add_positions()->add_positions(0);
    r.mutable_positions(h)->add_positions(1);
  }
  return r;
}

// Attention over every position that also selects the top 2 of each head.
v1::AttendRequest AttendSelecting(const std::string& context) {
  v1::AttendRequest r;
  r.set_context(context);
  *r.mutable_queries() = F32({4, 16}, 1.0f);
  r.mutable_index()->set_kind("all");
  r.set_select_k(2);
  return r;
}

TEST_F(SecurityTest, OnlyTlsClientsWithACertificateOfTheClientCaConnect) {
  // Plaintext to a TLS port: no answer.
  client::ClientOptions plain;
  plain.target = daemon_->address();
  plain.bearer_token = kTokenA;
  plain.deadline_ms = 5000;
  plain.max_attempts = 1;
  KVR_ASSERT_OK_AND_ASSIGN(auto c0, client::KvStoreClient::Create(plain));
  EXPECT_THAT(c0->ListModels(), ::kvrecall::testing::StatusIs(absl::StatusCode::kUnavailable));
  // TLS without a client certificate: refused by mutual TLS.
  client::ClientOptions no_cert = Options(kTokenA, /*client_cert=*/false);
  no_cert.deadline_ms = 5000;
  KVR_ASSERT_OK_AND_ASSIGN(auto c1, client::KvStoreClient::Create(no_cert));
  EXPECT_FALSE(c1->ListModels().ok());
  // A certificate of another CA: refused.
  client::ClientOptions rogue = Options(kTokenA);
  rogue.tls_client_cert_file = *dir_ + "/rogue.pem";
  rogue.tls_client_key_file = *dir_ + "/rogue.key";
  rogue.deadline_ms = 5000;
  KVR_ASSERT_OK_AND_ASSIGN(auto c2, client::KvStoreClient::Create(rogue));
  EXPECT_FALSE(c2->ListModels().ok());
  // A server certificate the client does not trust: refused by the client.
  client::ClientOptions untrusted = Options(kTokenA);
  untrusted.tls_root_ca_file = *dir_ + "/rogue-ca.pem";
  untrusted.deadline_ms = 5000;
  KVR_ASSERT_OK_AND_ASSIGN(auto c3, client::KvStoreClient::Create(untrusted));
  EXPECT_FALSE(c3->ListModels().ok());
  // The right CA and certificate, but no token: UNAUTHENTICATED.
  KVR_ASSERT_OK_AND_ASSIGN(auto c4, client::KvStoreClient::Create(Options("")));
  EXPECT_THAT(c4->ListModels(),
              ::kvrecall::testing::StatusIs(absl::StatusCode::kUnauthenticated));
  // Everything right.
  KVR_ASSERT_OK_AND_ASSIGN(auto c5, client::KvStoreClient::Create(Options(kTokenA)));
  KVR_EXPECT_OK(c5->ListModels().status());
  // Unpaired client files are refused up front.
  client::ClientOptions half = Options(kTokenA);
  half.tls_client_key_file.clear();
  EXPECT_THAT(client::KvStoreClient::Create(half),
              ::kvrecall::testing::StatusIs(absl::StatusCode::kInvalidArgument));
}

// The kvrecall command over mutual TLS: with the CA and a client certificate
// (flags or KVRECALL_TLS_* variables) it works; without them it does not.
TEST_F(SecurityTest, TheCliConnectsOverMutualTls) {
  auto run = [&](std::vector<std::string> args, std::string* out_text = nullptr) {
    args.insert(args.begin(),
                {"kvrecall", "--target=" + daemon_->address(), std::string("--token=") + kTokenB,
                 "--deadline_ms=5000"});
    std::vector<const char*> argv;
    for (const auto& a : args) argv.push_back(a.c_str());
    std::ostringstream out, err;
    const int code = cli::RunCli(static_cast<int>(argv.size()), argv.data(), out, err);
    if (out_text != nullptr) *out_text = out.str() + err.str();
    return code;
  };
  const std::string ca = "--tls_ca=" + *dir_ + "/ca.pem";
  const std::string cert = "--tls_cert=" + *dir_ + "/client.pem";
  const std::string key = "--tls_key=" + *dir_ + "/client.key";
  std::string text;
  EXPECT_EQ(run({ca, cert, key, "models"}, &text), 0) << text;
  EXPECT_NE(run({"models"}, &text), 0) << "plaintext to a TLS port";
  EXPECT_NE(run({ca, "models"}, &text), 0) << "no client certificate";
  EXPECT_NE(run({ca, cert, "models"}, &text), 0) << "a certificate without its key";
  EXPECT_NE(run({"--tls_ca=" + *dir_ + "/rogue-ca.pem", cert, key, "models"}, &text), 0)
      << "a server the CA does not vouch for";
  setenv("KVRECALL_TLS_CA", (*dir_ + "/ca.pem").c_str(), 1);
  setenv("KVRECALL_TLS_CERT", (*dir_ + "/client.pem").c_str(), 1);
  setenv("KVRECALL_TLS_KEY", (*dir_ + "/client.key").c_str(), 1);
  EXPECT_EQ(run({"models"}, &text), 0) << text;
  unsetenv("KVRECALL_TLS_CA");
  unsetenv("KVRECALL_TLS_CERT");
  unsetenv("KVRECALL_TLS_KEY");
}

TEST_F(SecurityTest, TenantBLearnsNothingOfTenantAsObjects) {
  KVR_ASSERT_OK_AND_ASSIGN(auto a, client::KvStoreClient::Create(Options(kTokenA)));
  KVR_ASSERT_OK(a->RegisterModel(Model()).status());
  const auto spans = Chain(3, 4242);
  std::vector<client::SpanToPut> put;
  for (const auto& s : spans) {
    put.push_back(client::SpanToPut{s.hash, s.parent, kBlock, s.token_ids, s.payload, true});
  }
  KVR_ASSERT_OK(a->PutSpans(kModel, put).status());

  auto channel = Channel(Options(kTokenA));
  auto kv = v1::KvStore::NewStub(channel);
  auto rt = v1::Retrieval::NewStub(channel);
  auto admin = v1::Admin::NewStub(channel);

  // A's context, index build, artifact.
  v1::OpenContextRequest open;
  open.set_model_id(kModel);
  for (const auto& s : spans) open.add_chain(s.hash.ToBytes());
  v1::OpenContextResponse opened;
  ASSERT_TRUE(rt->OpenContext(Ctx(kTokenA).get(), open, &opened).ok());
  const std::string ctx_id = opened.context();
  v1::BuildIndexRequest build;
  build.set_context(ctx_id);
  build.set_kind("flat");
  v1::Operation op;
  ASSERT_TRUE(rt->BuildIndex(Ctx(kTokenA).get(), build, &op).ok());
  EXPECT_THAT(op.id(), ::testing::MatchesRegex("op-[0-9a-f]{32}"));
  {
    v1::PutArtifactRequest art;
    art.set_model_id(kModel);
    art.set_kind("layer_policy");
    art.set_chunk("alpha's policy");
    v1::ArtifactInfo info;
    auto ctx = Ctx(kTokenA);
    auto w = rt->PutArtifact(ctx.get(), &info);
    ASSERT_TRUE(w->Write(art));
    w->WritesDone();
    ASSERT_TRUE(w->Finish().ok());
  }

  const std::string b = kTokenB;
  auto expect_not_found = [](const grpc::Status& s, const char* what) {
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << what << ": " << s.error_message();
  };

  // --- KvStore ---
  {
    v1::GetSpansRequest req;
    req.set_model_id(kModel);
    for (const auto& s : spans) req.add_hashes(s.hash.ToBytes());
    auto ctx = Ctx(b);
    auto reader = kv->GetSpans(ctx.get(), req);
    v1::GetSpansResponse msg;
    int headers = 0;
    while (reader->Read(&msg)) {
      if (!msg.has_header()) continue;
      ++headers;
      EXPECT_FALSE(msg.header().found());
      EXPECT_EQ(msg.header().miss_reason(), v1::MISS_REASON_NEVER_STORED);
      EXPECT_TRUE(msg.payload_chunk().empty());
    }
    EXPECT_TRUE(reader->Finish().ok());
    EXPECT_EQ(headers, 3);
  }
  {
    v1::LookupRequest req;
    req.set_model_id(kModel);
    for (const auto& s : spans) req.add_hashes(s.hash.ToBytes());
    v1::LookupResponse resp;
    ASSERT_TRUE(kv->Lookup(Ctx(b).get(), req, &resp).ok());
    EXPECT_EQ(resp.prefix_spans(), 0);
    ASSERT_GT(resp.missing_size(), 0);
    EXPECT_EQ(resp.missing(0).reason(), v1::MISS_REASON_NEVER_STORED);
  }
  {
    // Only a tenant of alpha's trust group learns that the hashes are stored
    // elsewhere; a span alpha deleted is never "deleted" to others.
    v1::ModelGeometry second = Model();
    second.set_model_id("sec-model-2");
    KVR_ASSERT_OK(a->RegisterModel(second).status());
    const auto gone = Chain(1, 4343);
    KVR_ASSERT_OK(a->PutSpans(kModel, {client::SpanToPut{gone[0].hash, gone[0].parent, kBlock,
                                                         gone[0].token_ids, gone[0].payload,
                                                         true}})
                      .status());
    KVR_ASSERT_OK(a->DeleteSpans({gone[0].hash}).status());
    for (const char* token : {kTokenB, kTokenC}) {
      v1::LookupRequest req;
      req.set_model_id(kModel);
      req.add_hashes(spans[0].hash.ToBytes());
      v1::LookupResponse resp;
      ASSERT_TRUE(kv->Lookup(Ctx(token).get(), req, &resp).ok());
      ASSERT_EQ(resp.missing_size(), 1);
      EXPECT_EQ(resp.missing(0).reason(), token == kTokenC ? v1::MISS_REASON_OTHER_NAMESPACE
                                                           : v1::MISS_REASON_NEVER_STORED)
          << token;
      req.set_hashes(0, gone[0].hash.ToBytes());
      ASSERT_TRUE(kv->Lookup(Ctx(token).get(), req, &resp).ok());
      ASSERT_EQ(resp.missing_size(), 1);
      EXPECT_NE(resp.missing(0).reason(), v1::MISS_REASON_DELETED) << token;
      // Under another model id: no "model mismatch" for another tenant's span.
      req.set_model_id("sec-model-2");
      req.set_hashes(0, spans[0].hash.ToBytes());
      const grpc::Status st = kv->Lookup(Ctx(token).get(), req, &resp);
      ASSERT_TRUE(st.ok()) << st.error_message();
      for (const auto& m : resp.missing()) {
        EXPECT_NE(m.reason(), v1::MISS_REASON_MODEL_MISMATCH) << token;
      }
    }
  }
  {
    v1::DeleteSpansRequest del;
    v1::PinSpansRequest pin;
    v1::UnpinSpansRequest unpin;
    for (const auto& s : spans) {
      del.add_hashes(s.hash.ToBytes());
      pin.add_hashes(s.hash.ToBytes());
      unpin.add_hashes(s.hash.ToBytes());
    }
    v1::DeleteSpansResponse dr;
    ASSERT_TRUE(kv->DeleteSpans(Ctx(b).get(), del, &dr).ok());
    EXPECT_EQ(dr.deleted(), 0);
    for (const auto& r : dr.results()) EXPECT_EQ(r.code(), 5);
    v1::PinSpansResponse pr;
    ASSERT_TRUE(kv->PinSpans(Ctx(b).get(), pin, &pr).ok());
    EXPECT_EQ(pr.pinned(), 0);
    v1::UnpinSpansResponse ur;
    ASSERT_TRUE(kv->UnpinSpans(Ctx(b).get(), unpin, &ur).ok());
    EXPECT_EQ(ur.unpinned(), 0);
  }
  {
    // Models are shared by all tenants, but none can change one's geometry.
    v1::ModelGeometry changed = Model();
    changed.set_head_dim(32);
    v1::RegisterModelRequest reg;
    *reg.mutable_model() = changed;
    v1::RegisterModelResponse rr;
    EXPECT_EQ(kv->RegisterModel(Ctx(b).get(), reg, &rr).error_code(),
              grpc::StatusCode::ALREADY_EXISTS);
  }
  {
    // B cannot chain its own span onto A's.
    client::OwnedSpan child = Chain(1, 99)[0];
    child.parent = spans.back().hash;
    child.hash = SpanHash(child.parent, child.token_ids);
    KVR_ASSERT_OK_AND_ASSIGN(auto bc, client::KvStoreClient::Create(Options(b)));
    EXPECT_THAT(bc->PutSpans(kModel, {client::SpanToPut{child.hash, child.parent, kBlock,
                                                        child.token_ids, child.payload, false}}),
                ::kvrecall::testing::StatusIs(absl::StatusCode::kFailedPrecondition));
    // And a span without its token ids (unverifiable hash) is refused.
    client::OwnedSpan root = Chain(1, 98)[0];
    EXPECT_THAT(bc->PutSpans(kModel, {client::SpanToPut{root.hash, root.parent, kBlock, {},
                                                        root.payload, false}}),
                ::kvrecall::testing::StatusIs(absl::StatusCode::kInvalidArgument));
  }

  // --- Retrieval: contexts ---
  {
    v1::OpenContextResponse r;
    expect_not_found(rt->OpenContext(Ctx(b).get(), open, &r), "OpenContext");
    v1::CloseContextRequest close;
    close.set_context(ctx_id);
    v1::CloseContextResponse cr;
    expect_not_found(rt->CloseContext(Ctx(b).get(), close, &cr), "CloseContext");
    v1::AppendTokensRequest app;
    app.set_context(ctx_id);
    *app.mutable_keys() = F32({2, 2, 1, 16}, 0.5f);
    *app.mutable_values() = F32({2, 2, 1, 16}, 0.5f);
    v1::AppendTokensResponse ar;
    expect_not_found(rt->AppendTokens(Ctx(b).get(), app, &ar), "AppendTokens");
    v1::AddQueriesRequest aq;
    aq.set_context(ctx_id);
    *aq.mutable_queries() = F32({1, 4, 16}, 1.0f);
    v1::AddQueriesResponse aqr;
    auto ctx = Ctx(b);
    auto w = rt->AddQueries(ctx.get(), &aqr);
    w->Write(aq);
    w->WritesDone();
    expect_not_found(w->Finish(), "AddQueries");
    v1::SearchRequest search;
    search.set_context(ctx_id);
    *search.mutable_queries() = F32({4, 16}, 1.0f);
    search.set_k(4);
    search.mutable_index()->set_kind("flat");
    v1::SearchResponse sr;
    expect_not_found(rt->Search(Ctx(b).get(), search, &sr), "Search");
    v1::AttendRequest attend;
    attend.set_context(ctx_id);
    *attend.mutable_queries() = F32({4, 16}, 1.0f);
    attend.mutable_index()->set_kind("all");
    v1::AttendResponse atr;
    expect_not_found(rt->Attend(Ctx(b).get(), attend, &atr), "Attend");
    {
      auto bctx = Ctx(b);
      auto stream = rt->BatchAttend(bctx.get());
      ASSERT_TRUE(stream->Write(attend));
      v1::AttendResponse one;
      ASSERT_TRUE(stream->Read(&one));
      EXPECT_EQ(one.error_code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
      EXPECT_EQ(one.out().data().size(), 0u);
      stream->WritesDone();
      EXPECT_TRUE(stream->Finish().ok());
    }
    // Attention by positions (one list per KV head), by itself and in a
    // BatchAttend stream, and attention over everything that selects for
    // later layers (select_k).
    v1::AttendRequest by_positions = AttendByPositions(ctx_id);
    expect_not_found(rt->Attend(Ctx(b).get(), by_positions, &atr), "Attend by positions");
    {
      auto bctx = Ctx(b);
      auto stream = rt->BatchAttend(bctx.get());
      ASSERT_TRUE(stream->Write(by_positions));
      v1::AttendResponse one;
      ASSERT_TRUE(stream->Read(&one));
      EXPECT_EQ(one.error_code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
      EXPECT_EQ(one.out().data().size(), 0u);
      stream->WritesDone();
      EXPECT_TRUE(stream->Finish().ok());
    }
    v1::AttendRequest selecting = AttendSelecting(ctx_id);
    expect_not_found(rt->Attend(Ctx(b).get(), selecting, &atr), "Attend with select_k");
    v1::GatherKvRequest gather;
    gather.set_context(ctx_id);
    gather.add_kv_heads()->add_positions(0);
    gather.add_kv_heads()->add_positions(0);
    auto gctx = Ctx(b);
    auto gr = rt->GatherKv(gctx.get(), gather);
    v1::GatherKvResponse rows;
    EXPECT_FALSE(gr->Read(&rows));
    expect_not_found(gr->Finish(), "GatherKv");
  }
  // --- Retrieval: builds and indexes ---
  {
    v1::Operation o;
    expect_not_found(rt->BuildIndex(Ctx(b).get(), build, &o), "BuildIndex");
    v1::GetOperationRequest get;
    get.set_id(op.id());
    expect_not_found(rt->GetOperation(Ctx(b).get(), get, &o), "GetOperation");
    v1::WaitOperationRequest wait;
    wait.set_id(op.id());
    wait.set_timeout_ms(100);
    expect_not_found(rt->WaitOperation(Ctx(b).get(), wait, &o), "WaitOperation");
    v1::CancelOperationRequest cancel;
    cancel.set_id(op.id());
    expect_not_found(rt->CancelOperation(Ctx(b).get(), cancel, &o), "CancelOperation");
    // A's build still completes.
    wait.set_timeout_ms(50000);
    ASSERT_TRUE(rt->WaitOperation(Ctx(kTokenA).get(), wait, &o).ok());
    EXPECT_EQ(o.state(), v1::OPERATION_STATE_DONE) << o.error_message();
    v1::ListIndexesRequest list;
    v1::ListIndexesResponse lr;
    ASSERT_TRUE(rt->ListIndexes(Ctx(b).get(), list, &lr).ok());
    EXPECT_EQ(lr.indexes_size(), 0);
    list.set_context(ctx_id);
    ASSERT_TRUE(rt->ListIndexes(Ctx(b).get(), list, &lr).ok());
    EXPECT_EQ(lr.indexes_size(), 0);
    v1::DeleteIndexRequest di;
    di.set_context(ctx_id);
    di.set_kind("flat");
    v1::DeleteIndexResponse dir;
    expect_not_found(rt->DeleteIndex(Ctx(b).get(), di, &dir), "DeleteIndex");
    list.clear_context();
    ASSERT_TRUE(rt->ListIndexes(Ctx(kTokenA).get(), list, &lr).ok());
    EXPECT_EQ(lr.indexes_size(), 4);  // 2 layers x 2 KV heads, still there
  }
  // --- Retrieval: artifacts ---
  {
    v1::GetArtifactRequest get;
    get.set_model_id(kModel);
    get.set_kind("layer_policy");
    auto ctx = Ctx(b);
    auto reader = rt->GetArtifact(ctx.get(), get);
    v1::GetArtifactResponse msg;
    EXPECT_FALSE(reader->Read(&msg));
    expect_not_found(reader->Finish(), "GetArtifact");
    v1::ListArtifactsRequest list;
    list.set_model_id(kModel);
    v1::ListArtifactsResponse lr;
    ASSERT_TRUE(rt->ListArtifacts(Ctx(b).get(), list, &lr).ok());
    EXPECT_EQ(lr.artifacts_size(), 0);
    // B may not write the shared namespace; its own put does not touch A's.
    for (bool shared : {true, false}) {
      v1::PutArtifactRequest art;
      art.set_model_id(kModel);
      art.set_kind("layer_policy");
      art.set_shared(shared);
      art.set_chunk("beta's policy");
      v1::ArtifactInfo info;
      auto pctx = Ctx(b);
      auto w = rt->PutArtifact(pctx.get(), &info);
      w->Write(art);
      w->WritesDone();
      const grpc::Status s = w->Finish();
      if (shared) {
        EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
      } else {
        EXPECT_TRUE(s.ok()) << s.error_message();
        EXPECT_EQ(info.version(), 1);
      }
    }
    auto actx = Ctx(kTokenA);
    auto ar = rt->GetArtifact(actx.get(), get);
    std::string bytes;
    while (ar->Read(&msg)) bytes += msg.chunk();
    ASSERT_TRUE(ar->Finish().ok());
    EXPECT_EQ(bytes, "alpha's policy");
  }
  // --- Admin ---
  {
    v1::StatsResponse stats;
    EXPECT_EQ(admin->Stats(Ctx(b).get(), v1::StatsRequest(), &stats).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
    v1::GetConfigResponse config;
    ASSERT_TRUE(admin->GetConfig(Ctx(b).get(), v1::GetConfigRequest(), &config).ok());
    EXPECT_EQ(config.options_size(), 0);
    EXPECT_EQ(config.api_version(), "kvrecall.v1");
    ASSERT_TRUE(admin->Stats(Ctx(kTokenAdmin).get(), v1::StatsRequest(), &stats).ok());
    ASSERT_TRUE(admin->GetConfig(Ctx(kTokenAdmin).get(), v1::GetConfigRequest(), &config).ok());
    EXPECT_GT(config.options_size(), 10);
  }
  // A's spans and context are intact.
  KVR_ASSERT_OK_AND_ASSIGN(auto got, a->GetSpans(kModel, {spans[0].hash, spans[2].hash}));
  ASSERT_EQ(got.size(), 2u);
  EXPECT_TRUE(got[0].found);
  EXPECT_EQ(got[0].payload, spans[0].payload);
  EXPECT_EQ(got[1].payload, spans[2].payload);
  v1::SearchRequest search;
  search.set_context(ctx_id);
  *search.mutable_queries() = F32({4, 16}, 1.0f);
  search.set_k(4);
  search.mutable_index()->set_kind("flat");
  v1::SearchResponse sr;
  ASSERT_TRUE(rt->Search(Ctx(kTokenA).get(), search, &sr).ok());
  EXPECT_EQ(sr.heads_size(), 4);
  // The requests B was refused are valid ones: A's succeed.
  v1::AttendResponse atr;
  grpc::Status st = rt->Attend(Ctx(kTokenA).get(), AttendByPositions(ctx_id), &atr);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(atr.lse_natural_size(), 4);
  st = rt->Attend(Ctx(kTokenA).get(), AttendSelecting(ctx_id), &atr);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_EQ(atr.heads_size(), 4);
  EXPECT_EQ(atr.heads(0).positions_size(), 2);
  v1::GatherKvRequest gather;
  gather.set_context(ctx_id);
  gather.add_kv_heads()->add_positions(0);
  gather.add_kv_heads()->add_positions(0);
  auto gctx = Ctx(kTokenA);
  auto gr = rt->GatherKv(gctx.get(), gather);
  v1::GatherKvResponse rows;
  int messages = 0;
  while (gr->Read(&rows)) ++messages;
  st = gr->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_GT(messages, 0);
}

}  // namespace
}  // namespace kvrecall
