// kill -9 while a client streams durable puts: after a restart on the same
// data directory every acknowledged span is intact, and nothing corrupt is
// served (an unacknowledged span is either absent or exactly right).

#include <signal.h>

#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/span_keys.h"
#include "common/span_hash.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/integration/random_spans.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall {
namespace {

using ::kvrecall::testing::DaemonProcess;

constexpr char kModel[] = "e2e-model";
constexpr int kTokens = 64;
constexpr int64_t kSpanBytes = 4 * 2 * 4 * kTokens * 16 * 2;  // 64 KiB
constexpr int kSpansPerStream = 4;

v1::ModelGeometry Model() {
  v1::ModelGeometry g;
  g.set_model_id(kModel);
  g.set_num_layers(4);
  g.set_num_q_heads(8);
  g.set_num_kv_heads(4);
  g.set_head_dim(16);
  g.set_dtype(v1::DTYPE_BF16);
  g.set_block_tokens(kTokens);
  return g;
}

// Span i of the chain of `seed`: deterministic tokens and payload, so the
// checker can recompute what every span must hold.
struct ChainGen {
  explicit ChainGen(uint64_t seed) : seed(seed), parent(SpanRootHash(kModel)) {}
  client::OwnedSpan Next() {
    std::mt19937_64 rng(seed * 1000003 + index++);
    client::OwnedSpan s = ::kvrecall::testing::RandomSpan(parent, kTokens, kSpanBytes, rng);
    parent = s.hash;
    return s;
  }
  uint64_t seed;
  uint64_t index = 0;
  Hash128 parent;
};

std::unique_ptr<client::KvStoreClient> Connect(const DaemonProcess& d, int max_attempts) {
  client::ClientOptions o;
  o.target = d.address();
  o.deadline_ms = 60000;
  o.max_attempts = max_attempts;
  o.chunk_bytes = 16 << 10;  // several messages per span: the kill lands mid-span too
  auto c = client::KvStoreClient::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(c).value();
}

TEST(Kill9Test, EveryAcknowledgedDurableSpanSurvivesSigkill) {
  const uint64_t seed = 9009;
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  const std::string dir = kvrecall::testing::MakeTempDir("kvrecalld-kill9");
  DaemonProcess daemon(dir + "/data", {"--memory_capacity_bytes=256MiB"});
  KVR_ASSERT_OK(daemon.Start());
  KVR_ASSERT_OK(Connect(daemon, 4)->RegisterModel(Model()).status());

  std::vector<client::OwnedSpan> acked;    // acknowledged, in chain order
  std::vector<client::OwnedSpan> attempted;  // sent but not acknowledged
  int total_acked = 0;
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    auto writer_client = Connect(daemon, /*max_attempts=*/1);
    absl::Mutex mu;
    int acked_this_round = 0;
    ChainGen gen(seed + round);
    std::vector<client::OwnedSpan> round_acked, round_attempted;
    absl::Status writer_status;
    std::thread writer([&] {
      for (;;) {
        std::vector<client::OwnedSpan> batch;
        for (int i = 0; i < kSpansPerStream; ++i) batch.push_back(gen.Next());
        std::vector<client::SpanToPut> put;
        for (const auto& s : batch) {
          put.push_back(client::SpanToPut{s.hash, s.parent, kTokens, s.token_ids, s.payload, true});
        }
        auto results = writer_client->PutSpans(kModel, put);
        absl::MutexLock lock(&mu);
        if (!results.ok()) {
          writer_status = results.status();
          round_attempted = std::move(batch);
          return;
        }
        for (auto& s : batch) round_acked.push_back(std::move(s));
        acked_this_round += kSpansPerStream;
      }
    });
    {
      // Kill while the writer is streaming, once a good number is acknowledged.
      absl::MutexLock lock(&mu);
      auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
        return acked_this_round >= 96 || !writer_status.ok();
      };
      ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(&enough), absl::Seconds(120)));
      ASSERT_TRUE(writer_status.ok()) << writer_status;
    }
    KVR_ASSERT_OK(daemon.Kill());
    writer.join();
    EXPECT_FALSE(writer_status.ok()) << "the writer must notice the daemon died";
    total_acked += static_cast<int>(round_acked.size());

    KVR_ASSERT_OK(daemon.Start());
    auto checker = Connect(daemon, 4);
    // Every acknowledged span of this round is there, byte for byte.
    std::vector<Hash128> hashes;
    for (const auto& s : round_acked) hashes.push_back(s.hash);
    KVR_ASSERT_OK_AND_ASSIGN(auto lookup, checker->Lookup(kModel, hashes));
    EXPECT_EQ(lookup.prefix_spans, static_cast<int>(round_acked.size()));
    KVR_ASSERT_OK_AND_ASSIGN(auto got, checker->GetSpans(kModel, hashes));
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(got[i].found) << "acknowledged span " << i << " lost: "
                                << client::MissReasonName(got[i].miss_reason);
      ASSERT_EQ(got[i].payload, round_acked[i].payload) << "acknowledged span " << i;
    }
    // The batch in flight at the kill: each span is absent or exact.
    std::vector<Hash128> in_flight;
    for (const auto& s : round_attempted) in_flight.push_back(s.hash);
    if (!in_flight.empty()) {
      KVR_ASSERT_OK_AND_ASSIGN(auto maybe, checker->GetSpans(kModel, in_flight));
      for (size_t i = 0; i < maybe.size(); ++i) {
        if (maybe[i].found) {
          EXPECT_EQ(maybe[i].payload, round_attempted[i].payload) << "unacknowledged span " << i;
        } else {
          EXPECT_EQ(maybe[i].miss_reason, v1::MISS_REASON_NEVER_STORED);
        }
      }
    }
    for (auto& s : round_acked) acked.push_back(std::move(s));
  }

  // After both crashes, the first round's spans are still all there.
  auto checker = Connect(daemon, 4);
  std::vector<Hash128> all;
  for (const auto& s : acked) all.push_back(s.hash);
  KVR_ASSERT_OK_AND_ASSIGN(auto got, checker->GetSpans(kModel, all));
  int intact = 0;
  for (size_t i = 0; i < got.size(); ++i) intact += got[i].found && got[i].payload == acked[i].payload;
  EXPECT_EQ(intact, total_acked);
  KVR_ASSERT_OK_AND_ASSIGN(v1::StatsResponse stats, checker->Stats());
  for (const auto& t : stats.tiers()) EXPECT_EQ(t.checksum_failures(), 0);
  KVR_EXPECT_OK(daemon.Stop());
}

}  // namespace
}  // namespace kvrecall
