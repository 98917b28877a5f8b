// kvrecalld as a process on 127.0.0.1 (port 0), driven through the C++
// client: round trips across all tiers, eviction and promotion under small
// capacities, restart, on-disk corruption, graceful shutdown, bad flags.

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/span_keys.h"
#include "common/npy.h"
#include "common/span_hash.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/integration/random_spans.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

namespace kvrecall {
namespace {

using ::kvrecall::testing::DaemonProcess;
using ::kvrecall::testing::RandomChain;
using ::kvrecall::testing::SmallModel;
using ::kvrecall::testing::SpanHashes;
using ::testing::HasSubstr;

constexpr char kModel[] = "it-model";
constexpr int64_t kSpanBytes = 64 << 10;  // 4 layers x 2 x 4 heads x 64 tokens x 16 x 2 bytes

v1::ModelGeometry Model() {
  v1::ModelGeometry g = SmallModel(kModel, v1::DTYPE_F16, 4, 8, 4, 64);
  g.set_keys_post_rope(true);
  return g;
}

// A chain of `n` full spans with seeded tokens and payloads.
std::vector<client::OwnedSpan> Chain(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  return RandomChain(kModel, n, 64, kSpanBytes, rng);
}

class DaemonIntegrationTest : public ::testing::Test {
 protected:
  void StartDaemon(std::vector<std::string> flags) {
    dir_ = kvrecall::testing::MakeTempDir("kvrecalld-it");
    daemon_ = std::make_unique<DaemonProcess>(dir_ + "/data", std::move(flags));
    KVR_ASSERT_OK(daemon_->Start());
    Connect();
    KVR_ASSERT_OK(client_->RegisterModel(Model()).status());
  }

  void Connect() {
    client::ClientOptions o;
    o.target = daemon_->address();
    o.deadline_ms = 120000;
    o.chunk_bytes = 16 << 10;
    KVR_ASSERT_OK_AND_ASSIGN(client_, client::KvStoreClient::Create(o));
  }

  void Put(const std::vector<client::OwnedSpan>& spans, bool durable, int batch = 8) {
    for (size_t b = 0; b < spans.size(); b += batch) {
      std::vector<client::SpanToPut> put;
      for (size_t i = b; i < std::min(spans.size(), b + batch); ++i) {
        const auto& s = spans[i];
        put.push_back(client::SpanToPut{s.hash, s.parent, 64, s.token_ids, s.payload, durable});
      }
      KVR_ASSERT_OK(client_->PutSpans(kModel, put).status());
    }
  }

  v1::StatsResponse Stats() {
    auto s = client_->Stats();
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *s : v1::StatsResponse();
  }

  std::map<v1::Tier, v1::TierStats> TierMap() {
    std::map<v1::Tier, v1::TierStats> out;
    const v1::StatsResponse stats = Stats();
    for (const auto& t : stats.tiers()) out[t.tier()] = t;
    return out;
  }

  std::string dir_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<client::KvStoreClient> client_;
};

TEST_F(DaemonIntegrationTest, PutGetRoundTripAcrossAllTiers) {
  // 16 spans fit in memory, 32 on disk, the rest goes to RocksDB.
  StartDaemon({"--memory_capacity_bytes=1MiB", "--disk_capacity_bytes=2MiB",
               "--rocksdb_capacity_bytes=64MiB", "--rocksdb_compression=none"});
  const uint64_t seed = 1001;
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  const auto spans = Chain(96, seed);
  Put(spans, /*durable=*/false);

  auto tiers = TierMap();
  EXPECT_GT(tiers[v1::TIER_MEMORY].spans(), 0);
  EXPECT_GT(tiers[v1::TIER_DISK].spans(), 0);
  EXPECT_GT(tiers[v1::TIER_ROCKSDB].spans(), 0);
  EXPECT_LE(tiers[v1::TIER_MEMORY].bytes(), 1 << 20);
  EXPECT_LE(tiers[v1::TIER_DISK].bytes(), 2 << 20);

  // The newest span first (still in memory), then the rest from the lower tiers.
  std::vector<size_t> order = {95};
  for (size_t i = 0; i < 95; ++i) order.push_back(i);
  std::set<v1::Tier> answered_by;
  for (size_t i : order) {
    KVR_ASSERT_OK_AND_ASSIGN(auto got, client_->GetSpans(kModel, {spans[i].hash}));
    ASSERT_TRUE(got[0].found) << "span " << i << ": " << client::MissReasonName(got[0].miss_reason);
    ASSERT_EQ(got[0].payload, spans[i].payload) << "span " << i;
    answered_by.insert(got[0].tier);
  }
  EXPECT_EQ(answered_by, (std::set<v1::Tier>{v1::TIER_MEMORY, v1::TIER_DISK, v1::TIER_ROCKSDB}));
  tiers = TierMap();
  EXPECT_GT(tiers[v1::TIER_MEMORY].hits(), 0);
  EXPECT_GT(tiers[v1::TIER_DISK].hits(), 0);
  EXPECT_GT(tiers[v1::TIER_ROCKSDB].hits(), 0);
  EXPECT_GT(tiers[v1::TIER_MEMORY].promotions(), 0);

  KVR_ASSERT_OK_AND_ASSIGN(auto lookup, client_->Lookup(kModel, SpanHashes(spans)));
  EXPECT_EQ(lookup.prefix_spans, 96);
  EXPECT_EQ(lookup.prefix_tokens, 96 * 64);
}

TEST_F(DaemonIntegrationTest, EvictionAndPromotionUnderSmallCapacities) {
  // One memory shard, so that 256 KiB hold 4 spans (16 shards of 16 KiB could not).
  StartDaemon({"--memory_capacity_bytes=256KiB", "--memory_shards=1", "--disk_capacity_bytes=512KiB",
               "--rocksdb_capacity_bytes=1MiB", "--rocksdb_compression=none"});
  const uint64_t seed = 2002;
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  const auto spans = Chain(40, seed);
  Put(spans, /*durable=*/false);

  KVR_ASSERT_OK_AND_ASSIGN(auto got, client_->GetSpans(kModel, SpanHashes(spans)));
  ASSERT_EQ(got.size(), 40u);
  int found = 0, evicted = 0;
  std::vector<size_t> lower;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i].found) {
      ++found;
      EXPECT_EQ(got[i].payload, spans[i].payload) << "span " << i;
      if (got[i].tier != v1::TIER_MEMORY) lower.push_back(i);
    } else {
      EXPECT_EQ(got[i].miss_reason, v1::MISS_REASON_EVICTED)
          << "span " << i << ": " << client::MissReasonName(got[i].miss_reason);
      ++evicted;
    }
  }
  // 4 + 8 + 16 spans of capacity: at most 28 survive, the rest were evicted.
  EXPECT_LE(found, 28);
  EXPECT_GE(evicted, 12);
  auto tiers = TierMap();
  EXPECT_GT(tiers[v1::TIER_MEMORY].evictions(), 0);
  EXPECT_GT(tiers[v1::TIER_ROCKSDB].evictions(), 0);
  std::map<int, int64_t> reasons;
  const v1::StatsResponse stats = Stats();
  for (const auto& m : stats.misses_by_reason()) reasons[m.reason()] = m.count();
  EXPECT_GE(reasons[v1::MISS_REASON_EVICTED], 12);

  // A hit below memory is promoted: the next read comes from memory.
  ASSERT_FALSE(lower.empty());
  const size_t i = lower.back();
  KVR_ASSERT_OK_AND_ASSIGN(auto again, client_->GetSpans(kModel, {spans[i].hash}));
  ASSERT_TRUE(again[0].found);
  EXPECT_EQ(again[0].tier, v1::TIER_MEMORY);
  EXPECT_EQ(again[0].payload, spans[i].payload);

  // A pinned span stays in memory while a new chain streams through.
  KVR_ASSERT_OK_AND_ASSIGN(auto pinned, client_->PinSpans({spans[i].hash}, absl::InfiniteDuration()));
  KVR_ASSERT_OK(pinned[0]);
  Put(Chain(40, seed + 1), /*durable=*/false);
  KVR_ASSERT_OK_AND_ASSIGN(auto still, client_->GetSpans(kModel, {spans[i].hash}));
  ASSERT_TRUE(still[0].found);
  EXPECT_EQ(still[0].tier, v1::TIER_MEMORY);
}

TEST_F(DaemonIntegrationTest, RestartKeepsEveryDurableSpan) {
  StartDaemon({"--memory_capacity_bytes=64MiB"});
  const uint64_t seed = 3003;
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  const auto durable = Chain(32, seed);
  Put(durable, /*durable=*/true);
  Put(Chain(8, seed + 1), /*durable=*/false);
  KVR_ASSERT_OK(daemon_->Stop());
  EXPECT_THAT(daemon_->Log(), HasSubstr("stopped cleanly"));

  KVR_ASSERT_OK(daemon_->Start());
  Connect();
  KVR_ASSERT_OK_AND_ASSIGN(auto models, client_->ListModels());
  ASSERT_EQ(models.size(), 1u) << "the model catalog survives restart";
  KVR_ASSERT_OK_AND_ASSIGN(auto lookup, client_->Lookup(kModel, SpanHashes(durable)));
  EXPECT_EQ(lookup.prefix_spans, 32);
  KVR_ASSERT_OK_AND_ASSIGN(auto got, client_->GetSpans(kModel, SpanHashes(durable)));
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(got[i].found) << "durable span " << i << ": "
                              << client::MissReasonName(got[i].miss_reason);
    EXPECT_EQ(got[i].payload, durable[i].payload) << "durable span " << i;
  }
}

// Flips one byte of `needle`'s first occurrence in any file under `dir`.
bool CorruptFirstOccurrence(const std::string& dir, const std::string& needle) {
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
    if (!entry.is_regular_file()) continue;
    auto text = ReadFileToString(entry.path().string());
    if (!text.ok()) continue;
    const size_t at = text->find(needle);
    if (at == std::string::npos) continue;
    std::fstream f(entry.path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(at + needle.size() / 2));
    const char flipped = static_cast<char>(needle[needle.size() / 2] ^ 0x5a);
    f.write(&flipped, 1);
    return f.good();
  }
  return false;
}

TEST_F(DaemonIntegrationTest, CorruptRecordOnDiskIsDroppedCountedAndNeverServed) {
  // Spans live only in the disk tier's segment files: no memory tier, and
  // RocksDB keeps just the catalog.
  StartDaemon({"--memory_capacity_bytes=0", "--rocksdb_capacity_bytes=0"});
  const uint64_t seed = 4004;
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  const auto spans = Chain(4, seed);
  Put(spans, /*durable=*/true);

  // Bit rot under a running daemon: the next read finds the record corrupt.
  ASSERT_TRUE(CorruptFirstOccurrence(dir_ + "/data/segments", spans[2].payload.substr(30000, 64)))
      << "span 2's payload was not found in the segment files";
  for (int attempt = 0; attempt < 2; ++attempt) {
    KVR_ASSERT_OK_AND_ASSIGN(auto got, client_->GetSpans(kModel, SpanHashes(spans)));
    for (int i : {0, 1, 3}) {
      ASSERT_TRUE(got[i].found) << "span " << i;
      EXPECT_EQ(got[i].payload, spans[i].payload);
    }
    EXPECT_FALSE(got[2].found) << "a corrupt record is never served";
    EXPECT_TRUE(got[2].payload.empty());
    EXPECT_EQ(got[2].miss_reason, v1::MISS_REASON_CHECKSUM_FAILURE)
        << "attempt " << attempt << ": " << client::MissReasonName(got[2].miss_reason);
  }
  {
    const v1::StatsResponse stats = Stats();
    int64_t corrupt = 0;
    for (const auto& t : stats.tiers()) corrupt += t.checksum_failures();
    EXPECT_EQ(corrupt, 1) << "the record is counted once, then dropped";
    for (const auto& m : stats.misses_by_reason()) {
      if (m.reason() == v1::MISS_REASON_CHECKSUM_FAILURE) {
        EXPECT_GE(m.count(), 2);
      }
    }
  }
  KVR_ASSERT_OK_AND_ASSIGN(auto lookup, client_->Lookup(kModel, SpanHashes(spans)));
  EXPECT_EQ(lookup.prefix_spans, 2);

  // Corruption found while the daemon is down: recovery skips the record,
  // logs and counts it; it is never served after the restart, and its miss
  // says checksum failure.
  KVR_ASSERT_OK(daemon_->Stop());
  ASSERT_TRUE(CorruptFirstOccurrence(dir_ + "/data/segments", spans[3].payload.substr(1000, 64)));
  KVR_ASSERT_OK(daemon_->Start());
  Connect();
  KVR_ASSERT_OK_AND_ASSIGN(auto got, client_->GetSpans(kModel, SpanHashes(spans)));
  EXPECT_TRUE(got[0].found && got[0].payload == spans[0].payload);
  EXPECT_TRUE(got[1].found && got[1].payload == spans[1].payload);
  EXPECT_FALSE(got[2].found);
  EXPECT_FALSE(got[3].found) << "a record corrupted at rest is never served";
  EXPECT_TRUE(got[3].payload.empty());
  EXPECT_EQ(got[3].miss_reason, v1::MISS_REASON_CHECKSUM_FAILURE)
      << "a record found corrupt by recovery says why: "
      << client::MissReasonName(got[3].miss_reason);
  {
    const v1::StatsResponse after = Stats();
    int64_t corrupt = 0;
    for (const auto& t : after.tiers()) corrupt += t.checksum_failures();
    EXPECT_GE(corrupt, 1) << "recovery counts the corrupt record";
  }
  EXPECT_THAT(daemon_->Log(), HasSubstr("corrupt records"));
}

TEST_F(DaemonIntegrationTest, SigtermEndsInFlightStreamsWithinTheGracePeriod) {
  StartDaemon({"--shutdown_grace_ms=300"});
  const auto spans = Chain(1, 5005);
  auto channel = grpc::CreateChannel(daemon_->address(), grpc::InsecureChannelCredentials());
  auto stub = v1::KvStore::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::PutSpansResponse response;
  auto writer = stub->PutSpans(&ctx, &response);
  v1::PutSpansRequest message;
  auto* h = message.mutable_header();
  h->set_model_id(kModel);
  h->set_hash(spans[0].hash.ToBytes());
  h->set_parent_hash(spans[0].parent.ToBytes());
  h->set_num_tokens(64);
  h->set_payload_bytes(kSpanBytes);
  h->set_durable(true);
  message.set_payload_chunk(spans[0].payload.substr(0, 1000));
  ASSERT_TRUE(writer->Write(message));
  // The stream stays open (the writer never finishes the span).
  KVR_ASSERT_OK(daemon_->Stop(absl::Seconds(30)));
  EXPECT_FALSE(writer->Finish().ok());

  KVR_ASSERT_OK(daemon_->Start());
  Connect();
  KVR_ASSERT_OK_AND_ASSIGN(auto got, client_->GetSpans(kModel, {spans[0].hash}));
  EXPECT_FALSE(got[0].found) << "nothing of an unfinished span is stored";
  EXPECT_EQ(got[0].miss_reason, v1::MISS_REASON_NEVER_STORED);
}

TEST_F(DaemonIntegrationTest, RefusesBadFlagsAndASecondDaemonOnTheSameDataDir) {
  const std::string dir = kvrecall::testing::MakeTempDir("kvrecalld-it");
  DaemonProcess bad(dir + "/data", {"--memory_shards=0"});
  const absl::Status s = bad.Start();
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("--memory_shards"));

  DaemonProcess bad_flag(dir + "/data", {"--no_such_flag=1"});
  EXPECT_FALSE(bad_flag.Start().ok());

  DaemonProcess first(dir + "/data", {});
  KVR_ASSERT_OK(first.Start());
  DaemonProcess second(dir + "/data", {});
  EXPECT_FALSE(second.Start().ok()) << "two daemons must not share a data directory";
  KVR_EXPECT_OK(first.Stop());
}

}  // namespace
}  // namespace kvrecall
