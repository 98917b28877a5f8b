// Tests of the KvStore and Admin services through an in-process channel to a
// Server over the real TieredStore in a temporary directory.

#include "service/rpc/kv_store_service.h"

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/checksum.h"
#include "common/npy.h"
#include "common/span_hash.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvrecall/v1/admin.grpc.pb.h"
#include "kvrecall/v1/kv_store.grpc.pb.h"
#include "service/rpc/grpc_status.h"
#include "service/rpc/server.h"
#include "service/rpc/testing/observed_store.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"
#include <grpcpp/client_context.h>

namespace kvrecall::rpc {
namespace {

using ::kvrecall::testing::IsOk;
using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;
using testing::ObservedStore;

constexpr char kModel[] = "tiny";
constexpr uint32_t kSeed = 20261124;

// 2 layers x 2 (K, V) x 2 kv heads x 16 tokens x 8 dims x 2 bytes = 2048 bytes.
v1::ModelGeometry TinyGeometry() {
  v1::ModelGeometry g;
  g.set_model_id(kModel);
  g.set_num_layers(2);
  g.set_num_q_heads(4);
  g.set_num_kv_heads(2);
  g.set_head_dim(8);
  g.set_dtype(v1::DTYPE_F16);
  g.set_keys_post_rope(true);
  g.set_block_tokens(16);
  return g;
}
constexpr int64_t kFullSpanBytes = 2048;

struct TestSpan {
  Hash128 hash;
  Hash128 parent;
  std::vector<uint32_t> tokens;
  std::string payload;
};

// A chain of `n` full spans of random tokens and payloads.
std::vector<TestSpan> MakeChain(int n, uint32_t seed, const std::string& salt = "") {
  std::mt19937 rng(seed);
  std::vector<TestSpan> spans;
  Hash128 parent = SpanRootHash(kModel, salt);
  for (int i = 0; i < n; ++i) {
    TestSpan s;
    s.parent = parent;
    for (int t = 0; t < 16; ++t) s.tokens.push_back(rng() % 32000);
    s.hash = SpanHash(parent, s.tokens);
    s.payload.resize(kFullSpanBytes);
    for (char& c : s.payload) c = static_cast<char>(rng());
    parent = s.hash;
    spans.push_back(std::move(s));
  }
  return spans;
}

v1::PutSpanHeader HeaderFor(const TestSpan& s, bool with_tokens = true) {
  v1::PutSpanHeader h;
  h.set_model_id(kModel);
  h.set_hash(s.hash.ToBytes());
  h.set_parent_hash(s.parent.ToBytes());
  h.set_num_tokens(static_cast<int32_t>(s.tokens.size()));
  if (with_tokens) h.mutable_token_ids()->Add(s.tokens.begin(), s.tokens.end());
  h.set_payload_bytes(static_cast<int64_t>(s.payload.size()));
  h.set_payload_checksum(Checksum64(s.payload));
  return h;
}

class KvStoreServiceTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServer(""); }

  void StartServer(const std::string& tenants_text) {
    ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.store.data_dir = kvrecall::testing::MakeTempDir("rpc-test");
    // The real store: memory in one LRU shard (eviction follows the order of
    // use) over a small disk tier that drops what it evicts (RocksDB holds
    // the catalog only), so that a test can push chosen spans down the tiers.
    options.store.memory_capacity_bytes = kMemoryBytes;
    options.store.memory_shards = 1;
    options.store.disk_capacity_bytes = kDiskBytes;
    options.store.rocksdb_capacity_bytes = 0;
    options.store.disk_background_compaction = false;
    data_dir_ = options.store.data_dir;
    options.max_span_bytes = 64 << 10;
    if (!tenants_text.empty()) {
      options.tenants_file = options.store.data_dir + "/tenants";
      KVR_ASSERT_OK(WriteStringToFileAtomic(options.tenants_file, tenants_text));
    }
    store_ = nullptr;
    auto opener = [this](const store::TieredStoreOptions& o) {
      return ObservedStore::Open(o, &store_);
    };
    KVR_ASSERT_OK_AND_ASSIGN(server_, Server::Create(options, opener));
    channel_ = server_->InProcessChannel();
    kv_ = v1::KvStore::NewStub(channel_);
    admin_ = v1::Admin::NewStub(channel_);
  }

  void Register() {
    grpc::ClientContext ctx;
    Authorize(&ctx);
    v1::RegisterModelRequest req;
    *req.mutable_model() = TinyGeometry();
    v1::RegisterModelResponse resp;
    ASSERT_TRUE(kv_->RegisterModel(&ctx, req, &resp).ok());
  }

  void Authorize(grpc::ClientContext* ctx) {
    if (!token_.empty()) ctx->AddMetadata("authorization", "Bearer " + token_);
  }

  // Streams `messages` in one PutSpans call and returns its status.
  absl::Status PutMessages(const std::vector<v1::PutSpansRequest>& messages,
                           v1::PutSpansResponse* response = nullptr) {
    grpc::ClientContext ctx;
    Authorize(&ctx);
    v1::PutSpansResponse local;
    auto writer = kv_->PutSpans(&ctx, response != nullptr ? response : &local);
    for (const auto& m : messages) {
      if (!writer->Write(m)) break;
    }
    writer->WritesDone();
    return FromGrpcStatus(writer->Finish());
  }

  // Messages putting `spans`, payloads split into chunks of `chunk` bytes.
  static std::vector<v1::PutSpansRequest> PutMessagesFor(const std::vector<TestSpan>& spans,
                                                         size_t chunk, bool durable = false) {
    std::vector<v1::PutSpansRequest> out;
    for (const TestSpan& s : spans) {
      v1::PutSpansRequest first;
      *first.mutable_header() = HeaderFor(s);
      first.mutable_header()->set_durable(durable);
      out.push_back(first);
      for (size_t off = 0; off < s.payload.size(); off += chunk) {
        v1::PutSpansRequest m;
        m.set_payload_chunk(s.payload.substr(off, chunk));
        out.push_back(m);
      }
    }
    return out;
  }

  absl::Status Put(const std::vector<TestSpan>& spans, size_t chunk = 512,
                   v1::PutSpansResponse* response = nullptr) {
    return PutMessages(PutMessagesFor(spans, chunk), response);
  }

  struct Fetched {
    v1::GetSpanHeader header;
    std::string payload;
  };
  absl::Status Get(const std::vector<Hash128>& hashes, std::vector<Fetched>* out,
                   int32_t layer_begin = 0, int32_t layer_end = 0, int32_t max_chunk = 0,
                   const std::string& model = kModel, int* messages = nullptr) {
    grpc::ClientContext ctx;
    Authorize(&ctx);
    v1::GetSpansRequest req;
    req.set_model_id(model);
    for (const Hash128& h : hashes) req.add_hashes(h.ToBytes());
    req.mutable_layers()->set_begin(layer_begin);
    req.mutable_layers()->set_end(layer_end);
    req.set_max_chunk_bytes(max_chunk);
    auto reader = kv_->GetSpans(&ctx, req);
    v1::GetSpansResponse msg;
    out->clear();
    int count = 0;
    while (reader->Read(&msg)) {
      ++count;
      if (msg.has_header()) out->push_back(Fetched{msg.header(), ""});
      if (!out->empty()) out->back().payload += msg.payload_chunk();
    }
    if (messages != nullptr) *messages = count;
    return FromGrpcStatus(reader->Finish());
  }

  v1::LookupResponse Lookup(const std::vector<Hash128>& hashes) {
    grpc::ClientContext ctx;
    Authorize(&ctx);
    v1::LookupRequest req;
    req.set_model_id(kModel);
    for (const Hash128& h : hashes) req.add_hashes(h.ToBytes());
    v1::LookupResponse resp;
    const grpc::Status s = kv_->Lookup(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp;
  }

  int64_t StoredSpans() { return store_->Stats().tiers[0].spans; }

  static int64_t Evictions(const store::StoreStats& stats, store::TierId tier) {
    for (const store::TierStats& t : stats.tiers) {
      if (t.tier == tier) return t.evictions;
    }
    return 0;
  }

  // Pins `keep`, then stores spans of another model until the memory tier
  // has evicted `memory` more spans and the disk tier `disk` more: the
  // unpinned spans of the test, older than every filler, go first (memory
  // demotes to disk, disk drops, in order of use), then unpins `keep`.
  void PushDown(const std::vector<TestSpan>& keep, int memory, int disk) {
    for (const TestSpan& s : keep) KVR_ASSERT_OK(store_->Pin({"", s.hash}, absl::InfiniteDuration()));
    store::ModelGeometry filler;
    filler.model_id = "filler";
    filler.num_layers = 2;
    filler.num_q_heads = 4;
    filler.num_kv_heads = 2;
    filler.head_dim = 8;
    filler.dtype = DType::kF16;
    filler.block_tokens = 16;
    KVR_ASSERT_OK(store_->RegisterModel(filler));
    const store::StoreStats before = store_->Stats();
    const int64_t memory_goal = Evictions(before, store::TierId::kMemory) + memory;
    const int64_t disk_goal = Evictions(before, store::TierId::kDisk) + disk;
    std::mt19937_64 rng(kSeed);
    for (int i = 0; i < 4 * (kMemoryBytes + kDiskBytes) / kFullSpanBytes; ++i) {
      const store::StoreStats now = store_->Stats();
      if (Evictions(now, store::TierId::kMemory) >= memory_goal &&
          Evictions(now, store::TierId::kDisk) >= disk_goal) {
        break;
      }
      store::StoredSpan span;
      span.meta.model_id = "filler";
      span.meta.parent = SpanRootHash("filler");
      span.meta.num_tokens = 16;
      for (int t = 0; t < 16; ++t) span.meta.token_ids.push_back(static_cast<uint32_t>(rng() % 32000));
      span.key.hash = SpanHash(span.meta.parent, span.meta.token_ids);
      span.payload.resize(kFullSpanBytes);
      for (char& c : span.payload) c = static_cast<char>(rng());
      span.meta.payload_bytes = kFullSpanBytes;
      span.meta.payload_checksum = Checksum64(span.payload);
      KVR_ASSERT_OK(store_->Put(std::move(span), store::PutOptions()).status());
    }
    const store::StoreStats after = store_->Stats();
    ASSERT_GE(Evictions(after, store::TierId::kMemory), memory_goal);
    ASSERT_EQ(Evictions(after, store::TierId::kDisk), disk_goal);
    for (const TestSpan& s : keep) KVR_ASSERT_OK(store_->Unpin({"", s.hash}));
  }

  // Flips a byte in the payload of `span`'s record in the disk segments.
  void CorruptOnDisk(const TestSpan& span) {
    bool corrupted = false;
    for (const auto& e : std::filesystem::directory_iterator(data_dir_ + "/segments")) {
      KVR_ASSERT_OK_AND_ASSIGN(std::string data, ReadFileToString(e.path().string()));
      const size_t at = data.find(span.payload.substr(0, 64));
      if (at == std::string::npos) continue;
      std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(static_cast<std::streamoff>(at + 100));
      const char flipped = static_cast<char>(data[at + 100] ^ 1);
      f.write(&flipped, 1);
      corrupted = true;
    }
    ASSERT_TRUE(corrupted) << "the span has no record on disk";
  }

  static constexpr int64_t kMemoryBytes = 256 << 10;
  static constexpr int64_t kDiskBytes = 256 << 10;

  std::string data_dir_;
  std::unique_ptr<Server> server_;
  ObservedStore* store_ = nullptr;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvStore::Stub> kv_;
  std::unique_ptr<v1::Admin::Stub> admin_;
  std::string token_;
};

TEST_F(KvStoreServiceTest, RegisterModelIsIdempotentAndRejectsAnotherGeometry) {
  Register();
  grpc::ClientContext ctx;
  v1::RegisterModelRequest req;
  *req.mutable_model() = TinyGeometry();
  v1::RegisterModelResponse resp;
  ASSERT_TRUE(kv_->RegisterModel(&ctx, req, &resp).ok());
  EXPECT_TRUE(resp.already_registered());
  EXPECT_EQ(resp.model().block_tokens(), 16);

  grpc::ClientContext ctx2;
  req.mutable_model()->set_head_dim(16);
  EXPECT_EQ(kv_->RegisterModel(&ctx2, req, &resp).error_code(), grpc::ALREADY_EXISTS);

  grpc::ClientContext ctx3;
  req.mutable_model()->set_num_q_heads(3);
  req.mutable_model()->set_model_id("other");
  const grpc::Status bad = kv_->RegisterModel(&ctx3, req, &resp);
  EXPECT_EQ(bad.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(bad.error_message(), HasSubstr("num_q_heads"));

  grpc::ClientContext ctx4;
  v1::ListModelsResponse models;
  ASSERT_TRUE(kv_->ListModels(&ctx4, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).head_dim(), 8);
}

TEST_F(KvStoreServiceTest, PutGetRoundTripInChunks) {
  SCOPED_TRACE(absl::StrCat("seed ", kSeed));
  Register();
  const auto spans = MakeChain(3, kSeed);
  v1::PutSpansResponse put;
  KVR_ASSERT_OK(Put(spans, /*chunk=*/300, &put));
  ASSERT_EQ(put.results_size(), 3);
  EXPECT_EQ(put.payload_bytes(), 3 * kFullSpanBytes);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(put.results(i).index(), i);
    EXPECT_EQ(put.results(i).hash(), spans[i].hash.ToBytes());
    EXPECT_FALSE(put.results(i).already_present());
  }

  std::vector<Fetched> got;
  int messages = 0;
  KVR_ASSERT_OK(Get({spans[0].hash, spans[1].hash, spans[2].hash}, &got, 0, 0, 700, kModel,
                    &messages));
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(messages, 3 * 3);  // 2048 bytes in chunks of 700
  for (int i = 0; i < 3; ++i) {
    const auto& h = got[i].header;
    EXPECT_TRUE(h.found());
    EXPECT_EQ(h.index(), i);
    EXPECT_EQ(h.tier(), v1::TIER_MEMORY);
    EXPECT_EQ(h.parent_hash(), spans[i].parent.ToBytes());
    EXPECT_EQ(h.num_tokens(), 16);
    EXPECT_THAT(h.token_ids(), ::testing::ElementsAreArray(spans[i].tokens));
    EXPECT_EQ(h.dtype(), v1::DTYPE_F16);
    EXPECT_THAT(h.shape(), ::testing::ElementsAre(2, 2, 2, 16, 8));
    EXPECT_EQ(h.payload_bytes(), kFullSpanBytes);
    EXPECT_EQ(h.payload_checksum(), Checksum64(spans[i].payload));
    EXPECT_EQ(got[i].payload, spans[i].payload);
  }
}

TEST_F(KvStoreServiceTest, WholePayloadInTheHeaderMessage) {
  Register();
  const auto spans = MakeChain(1, kSeed);
  v1::PutSpansRequest m;
  *m.mutable_header() = HeaderFor(spans[0]);
  m.set_payload_chunk(spans[0].payload);
  KVR_ASSERT_OK(PutMessages({m}));
  std::vector<Fetched> got;
  KVR_ASSERT_OK(Get({spans[0].hash}, &got));
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].payload, spans[0].payload);
}

TEST_F(KvStoreServiceTest, LayerRangeIsAContiguousSliceWithItsOwnChecksum) {
  Register();
  const auto spans = MakeChain(1, kSeed + 1);
  KVR_ASSERT_OK(Put(spans));
  for (int layer = 0; layer < 2; ++layer) {
    std::vector<Fetched> got;
    KVR_ASSERT_OK(Get({spans[0].hash}, &got, layer, layer + 1));
    ASSERT_EQ(got.size(), 1u);
    const std::string expected = spans[0].payload.substr(layer * 1024, 1024);
    EXPECT_EQ(got[0].payload, expected);
    EXPECT_EQ(got[0].header.payload_checksum(), Checksum64(expected));
    EXPECT_THAT(got[0].header.shape(), ::testing::ElementsAre(1, 2, 2, 16, 8));
    EXPECT_EQ(got[0].header.layers().begin(), layer);
    EXPECT_EQ(got[0].header.layers().end(), layer + 1);
  }
}

TEST_F(KvStoreServiceTest, GetReportsEveryMissReasonAndStatsCountsThem) {
  Register();
  const auto spans = MakeChain(5, kSeed + 2);
  KVR_ASSERT_OK(Put(spans));
  // deleted
  {
    grpc::ClientContext ctx;
    v1::DeleteSpansRequest req;
    req.add_hashes(spans[1].hash.ToBytes());
    v1::DeleteSpansResponse resp;
    ASSERT_TRUE(kv_->DeleteSpans(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.deleted(), 1);
  }
  // spans[2] and spans[3] go to disk; spans[3]'s record there is damaged;
  // spans[2] is then dropped from the disk, the last tier.
  PushDown({spans[0], spans[4]}, /*memory=*/2, /*disk=*/0);
  CorruptOnDisk(spans[3]);
  PushDown({spans[0], spans[4]}, /*memory=*/0, /*disk=*/1);
  const Hash128 never = SpanHash(spans[4].hash, {1, 2, 3});

  std::vector<Fetched> got;
  KVR_ASSERT_OK(Get({spans[0].hash, spans[1].hash, spans[2].hash, spans[3].hash, never}, &got));
  ASSERT_EQ(got.size(), 5u);
  EXPECT_TRUE(got[0].header.found());
  EXPECT_EQ(got[1].header.miss_reason(), v1::MISS_REASON_DELETED);
  EXPECT_EQ(got[2].header.miss_reason(), v1::MISS_REASON_EVICTED);
  EXPECT_EQ(got[3].header.miss_reason(), v1::MISS_REASON_CHECKSUM_FAILURE);
  EXPECT_EQ(got[4].header.miss_reason(), v1::MISS_REASON_NEVER_STORED);
  for (int i = 1; i < 5; ++i) {
    EXPECT_FALSE(got[i].header.found());
    EXPECT_TRUE(got[i].payload.empty()) << "a miss carries no payload";
  }

  // The same hash asked under another registered model is a model mismatch.
  {
    grpc::ClientContext ctx;
    v1::RegisterModelRequest req;
    *req.mutable_model() = TinyGeometry();
    req.mutable_model()->set_model_id("other");
    v1::RegisterModelResponse resp;
    ASSERT_TRUE(kv_->RegisterModel(&ctx, req, &resp).ok());
  }
  KVR_ASSERT_OK(Get({spans[0].hash}, &got, 0, 0, 0, "other"));
  EXPECT_EQ(got[0].header.miss_reason(), v1::MISS_REASON_MODEL_MISMATCH);

  grpc::ClientContext ctx;
  v1::StatsResponse stats;
  ASSERT_TRUE(admin_->Stats(&ctx, v1::StatsRequest(), &stats).ok());
  std::map<int, int64_t> by_reason;
  for (const auto& m : stats.misses_by_reason()) by_reason[m.reason()] = m.count();
  EXPECT_EQ(by_reason[v1::MISS_REASON_DELETED], 1);
  EXPECT_EQ(by_reason[v1::MISS_REASON_EVICTED], 1);
  EXPECT_EQ(by_reason[v1::MISS_REASON_CHECKSUM_FAILURE], 1);
  EXPECT_EQ(by_reason[v1::MISS_REASON_NEVER_STORED], 1);
  EXPECT_EQ(by_reason[v1::MISS_REASON_MODEL_MISMATCH], 1);
  EXPECT_EQ(stats.misses_by_reason_size(), 8);  // every reason a read can report
  for (const v1::TierStats& tier : stats.tiers()) {
    EXPECT_EQ(tier.checksum_failures(), tier.tier() == v1::TIER_DISK ? 1 : 0) << tier.tier();
  }
}

TEST_F(KvStoreServiceTest, LookupGivesThePrefixAndWhyTheRestIsMissing) {
  Register();
  const auto spans = MakeChain(4, kSeed + 3);
  KVR_ASSERT_OK(Put({spans[0], spans[1], spans[2]}));
  PushDown({spans[0], spans[2]}, /*memory=*/1, /*disk=*/1);
  const v1::LookupResponse r =
      Lookup({spans[0].hash, spans[1].hash, spans[2].hash, spans[3].hash});
  EXPECT_EQ(r.prefix_spans(), 1);
  EXPECT_EQ(r.prefix_tokens(), 16);
  ASSERT_EQ(r.missing_size(), 3);
  EXPECT_EQ(r.missing(0).index(), 1);
  EXPECT_EQ(r.missing(0).reason(), v1::MISS_REASON_EVICTED);
  EXPECT_EQ(r.missing(1).index(), 2);
  EXPECT_EQ(r.missing(1).reason(), v1::MISS_REASON_PARENT_MISSING);
  EXPECT_EQ(r.missing(2).hash(), spans[3].hash.ToBytes());
  EXPECT_EQ(r.missing(2).reason(), v1::MISS_REASON_NEVER_STORED);
}

TEST_F(KvStoreServiceTest, LookupByTokensHashesLikeTheClient) {
  Register();
  const auto spans = MakeChain(2, kSeed + 4);
  KVR_ASSERT_OK(Put(spans));
  std::vector<uint32_t> tokens = spans[0].tokens;
  tokens.insert(tokens.end(), spans[1].tokens.begin(), spans[1].tokens.end());
  tokens.push_back(7);  // a partial tail, not hashed by default

  grpc::ClientContext ctx;
  v1::LookupRequest req;
  req.set_model_id(kModel);
  req.mutable_tokens()->mutable_token_ids()->Add(tokens.begin(), tokens.end());
  v1::LookupResponse resp;
  ASSERT_TRUE(kv_->Lookup(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.prefix_spans(), 2);
  EXPECT_EQ(resp.prefix_tokens(), 32);
  ASSERT_EQ(resp.hashes_size(), 2);
  EXPECT_EQ(resp.hashes(1), spans[1].hash.ToBytes());

  grpc::ClientContext ctx2;
  req.add_hashes(spans[0].hash.ToBytes());
  EXPECT_EQ(kv_->Lookup(&ctx2, req, &resp).error_code(), grpc::INVALID_ARGUMENT);

  grpc::ClientContext ctx3;
  req.clear_tokens();
  req.set_model_id("nope");
  EXPECT_EQ(kv_->Lookup(&ctx3, req, &resp).error_code(), grpc::NOT_FOUND);
}

TEST_F(KvStoreServiceTest, DuplicatePutIsIdempotentAndAnotherPayloadIsRejected) {
  Register();
  auto spans = MakeChain(2, kSeed + 5);
  KVR_ASSERT_OK(Put(spans));
  v1::PutSpansResponse again;
  KVR_ASSERT_OK(Put(spans, 4096, &again));
  ASSERT_EQ(again.results_size(), 2);
  EXPECT_TRUE(again.results(0).already_present());
  EXPECT_TRUE(again.results(1).already_present());

  spans[1].payload[0] ^= 1;
  EXPECT_THAT(Put({spans[1]}), StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("span 0")));
  std::vector<Fetched> got;
  KVR_ASSERT_OK(Get({spans[1].hash}, &got));
  EXPECT_NE(got[0].payload, spans[1].payload) << "the stored payload must not change";
}

// Every rejected PutSpans stream names the span, and the rejected span
// changes nothing in the store.
TEST_F(KvStoreServiceTest, BadPutsGetAClearStatusAndChangeNothing) {
  Register();
  const auto spans = MakeChain(2, kSeed + 6);
  const int64_t before = StoredSpans();
  auto one = [&](auto mutate) {
    auto messages = PutMessagesFor({spans[0]}, 1024);
    mutate(&messages);
    return PutMessages(messages);
  };
  using Msgs = std::vector<v1::PutSpansRequest>;
  EXPECT_THAT(one([](Msgs* m) { m->at(0).mutable_header()->set_model_id("nope"); }),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("unknown model nope")));
  EXPECT_THAT(one([](Msgs* m) { m->at(0).mutable_header()->set_model_id(""); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_id")));
  EXPECT_THAT(one([](Msgs* m) { m->at(0).mutable_header()->set_hash("short"); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("header.hash")));
  EXPECT_THAT(one([](Msgs* m) { m->at(0).mutable_header()->set_parent_hash(""); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("header.parent_hash")));
  EXPECT_THAT(one([](Msgs* m) { m->at(0).mutable_header()->set_num_tokens(0); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_tokens")));
  EXPECT_THAT(one([](Msgs* m) { m->at(0).mutable_header()->set_payload_bytes(2000); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("does not match the geometry")));
  EXPECT_THAT(one([](Msgs* m) { m->at(0).mutable_header()->mutable_token_ids()->Set(0, 99999); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not the span hash")));
  EXPECT_THAT(one([](Msgs* m) { m->at(0).mutable_header()->mutable_token_ids()->RemoveLast(); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("token_ids has 15")));
  EXPECT_THAT(one([](Msgs* m) { m->at(0).mutable_header()->set_payload_checksum(1); }),
              StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(one([](Msgs* m) { m->pop_back(); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("ended after 1024 of 2048")));
  EXPECT_THAT(one([](Msgs* m) { m->back().mutable_payload_chunk()->append("x"); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("overrun")));
  EXPECT_THAT(one([](Msgs* m) { m->erase(m->begin()); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("without a span header")));
  EXPECT_THAT(PutMessages({}), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty")));
  // The second span's parent (spans[0]) is not stored.
  EXPECT_THAT(Put({spans[1]}), StatusIs(absl::StatusCode::kFailedPrecondition));
  // A header before the previous span is complete.
  {
    auto messages = PutMessagesFor({spans[0]}, 1024);
    messages.pop_back();
    auto next = PutMessagesFor({spans[1]}, 1024);
    messages.insert(messages.end(), next.begin(), next.end());
    EXPECT_THAT(PutMessages(messages),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("new header")));
  }
  EXPECT_EQ(StoredSpans(), before);
}

TEST_F(KvStoreServiceTest, ErrorsKeepTheSpansBeforeThem) {
  Register();
  auto spans = MakeChain(3, kSeed + 7);
  auto messages = PutMessagesFor(spans, 1024);
  messages[6].mutable_header()->set_payload_checksum(42);  // span 2's header
  EXPECT_THAT(PutMessages(messages),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr("span 2 of the stream: ")));
  const v1::LookupResponse r = Lookup({spans[0].hash, spans[1].hash, spans[2].hash});
  EXPECT_EQ(r.prefix_spans(), 2);
}

TEST_F(KvStoreServiceTest, SpansOverMaxSpanBytesAreRejectedBeforeTheirPayload) {
  grpc::ClientContext ctx;
  v1::RegisterModelRequest req;
  *req.mutable_model() = TinyGeometry();
  // 64 layers x 2 x 2 heads x 32 tokens x 8 dims x 2 bytes = 128 KiB per span,
  // over this server's max_span_bytes (64 KiB).
  req.mutable_model()->set_num_layers(64);
  req.mutable_model()->set_block_tokens(32);
  v1::RegisterModelResponse resp;
  ASSERT_TRUE(kv_->RegisterModel(&ctx, req, &resp).ok());
  v1::PutSpansRequest m;
  auto* h = m.mutable_header();
  h->set_model_id(kModel);
  h->set_hash(Hash128{1, 2}.ToBytes());
  h->set_parent_hash(SpanRootHash(kModel).ToBytes());
  h->set_num_tokens(32);
  h->set_payload_bytes(int64_t{64} * 2 * 2 * 32 * 8 * 2);
  EXPECT_THAT(PutMessages({m}),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("--max_span_bytes")));
}

TEST_F(KvStoreServiceTest, AnAbortedStreamStoresCompletedSpansAndNothingOfTheUnfinishedOne) {
  Register();
  const auto spans = MakeChain(2, kSeed + 8);
  grpc::ClientContext ctx;
  v1::PutSpansResponse resp;
  auto writer = kv_->PutSpans(&ctx, &resp);
  auto messages = PutMessagesFor(spans, 1024);  // header+2 chunks per span
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(writer->Write(messages[i]));  // span 1 half-sent
  // Wait until the server has stored span 0 (it stores each span when complete).
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (Lookup({spans[0].hash}).prefix_spans() != 1 && absl::Now() < deadline) {
  }
  ctx.TryCancel();  // the writer dies mid-span
  EXPECT_EQ(writer->Finish().error_code(), grpc::CANCELLED);
  const v1::LookupResponse r = Lookup({spans[0].hash, spans[1].hash});
  EXPECT_EQ(r.prefix_spans(), 1);
  ASSERT_EQ(r.missing_size(), 1);
  EXPECT_EQ(r.missing(0).reason(), v1::MISS_REASON_NEVER_STORED);
  std::vector<Fetched> got;
  KVR_ASSERT_OK(Get({spans[0].hash}, &got));
  EXPECT_EQ(got[0].payload, spans[0].payload);
}

TEST_F(KvStoreServiceTest, BadGetsAreRejected) {
  Register();
  std::vector<Fetched> got;
  const Hash128 h{1, 2};
  EXPECT_THAT(Get({h}, &got, 0, 0, 0, "nope"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(Get({}, &got), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("hashes")));
  EXPECT_THAT(Get({h}, &got, 1, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layers")));
  EXPECT_THAT(Get({h}, &got, 0, 3),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layers")));
  EXPECT_THAT(Get({h}, &got, -1, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layers")));
  grpc::ClientContext ctx;
  v1::GetSpansRequest req;
  req.set_model_id(kModel);
  req.add_hashes(h.ToBytes());
  req.add_hashes("0123456789");
  auto reader = kv_->GetSpans(&ctx, req);
  v1::GetSpansResponse msg;
  EXPECT_FALSE(reader->Read(&msg)) << "nothing is sent before every hash is validated";
  const grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("hashes[1]"));
}

TEST_F(KvStoreServiceTest, PinUnpinDeleteReportPerSpanOutcomes) {
  Register();
  const auto spans = MakeChain(2, kSeed + 9);
  KVR_ASSERT_OK(Put({spans[0]}));
  {
    grpc::ClientContext ctx;
    v1::PinSpansRequest req;
    req.add_hashes(spans[0].hash.ToBytes());
    req.add_hashes(spans[1].hash.ToBytes());
    req.set_ttl_ms(60000);
    v1::PinSpansResponse resp;
    ASSERT_TRUE(kv_->PinSpans(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.pinned(), 1);
    ASSERT_EQ(resp.results_size(), 2);
    EXPECT_EQ(resp.results(0).code(), 0);
    EXPECT_EQ(resp.results(1).code(), static_cast<int>(absl::StatusCode::kNotFound));
    EXPECT_EQ(store_->Stats().pinned_spans, 1);
  }
  {
    grpc::ClientContext ctx;
    v1::PinSpansRequest req;
    req.add_hashes(spans[0].hash.ToBytes());
    req.add_hashes("bad");
    v1::PinSpansResponse resp;
    EXPECT_EQ(kv_->PinSpans(&ctx, req, &resp).error_code(), grpc::INVALID_ARGUMENT);
    EXPECT_EQ(store_->Stats().pinned_spans, 1) << "a rejected request pins nothing";
    grpc::ClientContext ctx2;
    req.clear_hashes();
    req.add_hashes(spans[0].hash.ToBytes());
    req.set_ttl_ms(-5);
    EXPECT_EQ(kv_->PinSpans(&ctx2, req, &resp).error_code(), grpc::INVALID_ARGUMENT);
  }
  {
    grpc::ClientContext ctx;
    v1::UnpinSpansRequest req;
    req.add_hashes(spans[0].hash.ToBytes());
    req.add_hashes(spans[0].hash.ToBytes());
    v1::UnpinSpansResponse resp;
    ASSERT_TRUE(kv_->UnpinSpans(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.unpinned(), 1);
    EXPECT_EQ(resp.results(1).code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  }
  {
    grpc::ClientContext ctx;
    v1::DeleteSpansRequest req;
    req.add_hashes(spans[0].hash.ToBytes());
    req.add_hashes(spans[1].hash.ToBytes());
    v1::DeleteSpansResponse resp;
    ASSERT_TRUE(kv_->DeleteSpans(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.deleted(), 1);
    EXPECT_EQ(resp.results(1).code(), static_cast<int>(absl::StatusCode::kNotFound));
  }
  EXPECT_EQ(StoredSpans(), 0);
}

TEST_F(KvStoreServiceTest, AdminStatsCountsRpcsAndGetConfigShowsTheOptions) {
  Register();
  const auto spans = MakeChain(1, kSeed + 10);
  KVR_ASSERT_OK(Put(spans));
  KVR_ASSERT_OK(Put(spans, 512));  // a duplicate: OK, counted as a second call
  Lookup({spans[0].hash});

  grpc::ClientContext ctx;
  v1::StatsResponse stats;
  ASSERT_TRUE(admin_->Stats(&ctx, v1::StatsRequest(), &stats).ok());
  std::map<std::string, v1::RpcStats> rpcs;
  for (const auto& r : stats.rpcs()) rpcs[r.method()] = r;
  EXPECT_EQ(rpcs["kvrecall.v1.KvStore/PutSpans"].count(), 2);
  EXPECT_EQ(rpcs["kvrecall.v1.KvStore/PutSpans"].payload_bytes(), 2 * kFullSpanBytes);
  EXPECT_EQ(rpcs["kvrecall.v1.KvStore/Lookup"].count(), 1);
  EXPECT_GT(rpcs["kvrecall.v1.KvStore/Lookup"].p50_us(), 0);
  EXPECT_EQ(stats.models(), 1);
  EXPECT_EQ(stats.tiers(0).spans(), 1);

  grpc::ClientContext ctx2;
  v1::GetConfigResponse config;
  ASSERT_TRUE(admin_->GetConfig(&ctx2, v1::GetConfigRequest(), &config).ok());
  EXPECT_EQ(config.api_version(), "kvrecall.v1");
  EXPECT_EQ(config.span_hash_version(), "kvrecall.span.v1");
  EXPECT_EQ(config.max_message_bytes(), int64_t{16} << 20);
  std::map<std::string, std::string> options;
  for (const auto& e : config.options()) options[e.name()] = e.value();
  EXPECT_EQ(options["listen"], "127.0.0.1:0");
  EXPECT_EQ(options["max_span_bytes"], "65536");
}

constexpr char kTenants[] =
    "alpha token-alpha-0123456789 group=team\n"
    "beta  token-beta-01234567890 group=team\n"
    "gamma token-gamma-0123456789\n";

TEST_F(KvStoreServiceTest, TokensSelectTenantsAndMissingTokensAreUnauthenticated) {
  StartServer(kTenants);
  token_ = "token-alpha-0123456789";
  Register();
  const auto spans = MakeChain(1, kSeed + 11);
  KVR_ASSERT_OK(Put(spans));

  token_ = "";
  std::vector<Fetched> got;
  EXPECT_THAT(Get({spans[0].hash}, &got),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("authorization")));
  EXPECT_THAT(Put(spans), StatusIs(absl::StatusCode::kUnauthenticated));
  token_ = "token-wrong-0123456789";
  EXPECT_THAT(Get({spans[0].hash}, &got), StatusIs(absl::StatusCode::kUnauthenticated));
  {
    grpc::ClientContext ctx;
    v1::StatsResponse stats;
    EXPECT_EQ(admin_->Stats(&ctx, v1::StatsRequest(), &stats).error_code(),
              grpc::UNAUTHENTICATED);
  }

  token_ = "token-beta-01234567890";
  KVR_ASSERT_OK(Get({spans[0].hash}, &got));
  EXPECT_FALSE(got[0].header.found());
  EXPECT_EQ(got[0].header.miss_reason(), v1::MISS_REASON_OTHER_NAMESPACE);

  // gamma shares no group with alpha: its miss reveals nothing.
  token_ = "token-gamma-0123456789";
  KVR_ASSERT_OK(Get({spans[0].hash}, &got));
  EXPECT_FALSE(got[0].header.found());
  EXPECT_EQ(got[0].header.miss_reason(), v1::MISS_REASON_NEVER_STORED);

  token_ = "token-alpha-0123456789";
  KVR_ASSERT_OK(Get({spans[0].hash}, &got));
  EXPECT_TRUE(got[0].header.found());
}

}  // namespace
}  // namespace kvrecall::rpc

namespace kvrecall::rpc {
namespace {

// Graceful shutdown: a stream in flight may finish (and its span is stored)
// while new calls are turned away with UNAVAILABLE.
TEST_F(KvStoreServiceTest, ShutdownLetsInFlightCallsFinishAndTurnsNewOnesAway) {
  Register();
  const auto spans = MakeChain(1, kSeed + 12);
  auto messages = PutMessagesFor(spans, 1024);
  grpc::ClientContext ctx;
  v1::PutSpansResponse resp;
  auto writer = kv_->PutSpans(&ctx, &resp);
  ASSERT_TRUE(writer->Write(messages[0]));
  ASSERT_TRUE(writer->Write(messages[1]));
  // Wait until the server runs the stream's handler (admitted, in flight).
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (server_->in_flight_calls() != 1 && absl::Now() < deadline) {
  }
  ASSERT_EQ(server_->in_flight_calls(), 1);
  absl::Status shutdown_status;
  std::thread shutdown([&] { shutdown_status = server_->Shutdown(absl::Seconds(60)); });
  // New calls are refused while the stream is still open.
  absl::StatusCode code = absl::StatusCode::kOk;
  while (code != absl::StatusCode::kUnavailable && absl::Now() < deadline) {
    grpc::ClientContext c;
    v1::LookupRequest req;
    req.set_model_id(kModel);
    v1::LookupResponse r;
    code = static_cast<absl::StatusCode>(kv_->Lookup(&c, req, &r).error_code());
  }
  EXPECT_EQ(code, absl::StatusCode::kUnavailable);
  ASSERT_TRUE(writer->Write(messages[2]));
  writer->WritesDone();
  const grpc::Status finished = writer->Finish();
  EXPECT_TRUE(finished.ok()) << finished.error_message();
  shutdown.join();
  KVR_EXPECT_OK(shutdown_status);
  EXPECT_EQ(store_->Stats().tiers[0].spans, 1) << "the in-flight span was stored";
  EXPECT_EQ(store_->sync_calls(), 1);
}

}  // namespace
}  // namespace kvrecall::rpc
