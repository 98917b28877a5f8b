// A kvrecalld cluster on loopback (docs/cluster.md): one real etcd (Debian's
// etcd-server) and 3 or 4 kvrecalld processes, driven through the cluster
// client (clients/cpp/cluster_client.h). Lease TTL 2 s and sweeps every
// second keep each test to a few seconds.

#include <atomic>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "clients/cpp/cluster_client.h"
#include "clients/cpp/span_keys.h"
#include "common/span_hash.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/testing/etcd_process.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall {
namespace {

using ::kvrecall::testing::DaemonProcess;
using ::kvrecall::testing::EtcdProcess;

constexpr char kModel[] = "cluster-model";
constexpr int kTokens = 64;
constexpr int64_t kSpanBytes = 2 * 2 * 2 * kTokens * 16 * 2;  // 16 KiB

v1::ModelGeometry Model() {
  v1::ModelGeometry g;
  g.set_model_id(kModel);
  g.set_num_layers(2);
  g.set_num_q_heads(4);
  g.set_num_kv_heads(2);
  g.set_head_dim(16);
  g.set_dtype(v1::DTYPE_F16);
  g.set_keys_post_rope(true);
  g.set_block_tokens(kTokens);
  return g;
}

std::vector<client::OwnedSpan> Chain(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<client::OwnedSpan> spans;
  Hash128 parent = SpanRootHash(kModel);
  for (int i = 0; i < n; ++i) {
    client::OwnedSpan s;
    s.parent = parent;
    s.token_ids.resize(kTokens);
    for (auto& t : s.token_ids) t = static_cast<uint32_t>(rng() % 100000);
    s.hash = SpanHash(parent, s.token_ids);
    s.payload.resize(kSpanBytes);
    for (size_t b = 0; b < s.payload.size(); b += 8) {
      const uint64_t v = rng();
      std::memcpy(s.payload.data() + b, &v, 8);
    }
    parent = s.hash;
    spans.push_back(std::move(s));
  }
  return spans;
}

std::vector<Hash128> Hashes(const std::vector<client::OwnedSpan>& spans) {
  std::vector<Hash128> out;
  for (const auto& s : spans) out.push_back(s.hash);
  return out;
}

// Polls `done` every 100 ms until it holds or `timeout` passes.
bool WaitFor(const std::function<bool()>& done, absl::Duration timeout) {
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(100));
  }
  return done();
}

class ClusterIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!EtcdProcess::Available()) {
      if (std::getenv("KVRECALL_REQUIRE_ETCD") != nullptr) {
        FAIL() << EtcdProcess::BinaryPath() << " is missing (apt-get install etcd-server)";
      }
      GTEST_SKIP() << EtcdProcess::BinaryPath() << " is missing (apt-get install etcd-server)";
    }
    dir_ = kvrecall::testing::MakeTempDir("kvrecall-cluster-it");
    std::filesystem::create_directories(dir_ + "/etcd");
    etcd_ = std::make_unique<EtcdProcess>(dir_ + "/etcd");
    KVR_ASSERT_OK(etcd_->Start());
  }

  void TearDown() override {
    client_.reset();
    for (auto& n : nodes_) {
      if (n != nullptr && n->running()) n->Kill().IgnoreError();
    }
    if (etcd_ != nullptr && etcd_->running()) etcd_->Kill().IgnoreError();
  }

  // Adds node n<i> (i = nodes_.size() + 1) on a fixed port and starts it.
  void AddNode() {
    const int i = static_cast<int>(nodes_.size()) + 1;
    const int port = kvrecall::testing::PickFreePort();
    nodes_.push_back(std::make_unique<DaemonProcess>(
        absl::StrCat(dir_, "/n", i),
        std::vector<std::string>{
            absl::StrCat("--listen=127.0.0.1:", port), absl::StrCat("--node_id=n", i),
            "--etcd_endpoints=" + etcd_->endpoint(), "--replication_factor=2",
            "--lease_ttl_s=2", "--replication_interval_s=1", "--memory_capacity_bytes=64MiB",
            "--shutdown_grace_ms=2000"}));
    KVR_ASSERT_OK(nodes_.back()->Start());
  }

  void StartCluster(int n) {
    for (int i = 0; i < n; ++i) AddNode();
    client::ClusterClientOptions o;
    o.seeds = {nodes_[0]->address()};
    o.node.deadline_ms = 20000;
    o.refresh_interval = absl::Milliseconds(500);
    KVR_ASSERT_OK_AND_ASSIGN(client_, client::ClusterClient::Create(o));
    ASSERT_TRUE(WaitFor([&] { return LiveNodes() == n; }, absl::Seconds(10)));
    KVR_ASSERT_OK(client_->RegisterModel(Model()).status());
  }

  int LiveNodes() {
    if (!client_->Refresh().ok()) return -1;
    int live = 0;
    const v1::Membership m = client_->membership();
    for (const auto& n : m.nodes()) live += n.live() ? 1 : 0;
    return live;
  }

  void Put(const std::vector<client::OwnedSpan>& spans, int batch = 8) {
    for (size_t b = 0; b < spans.size(); b += batch) {
      std::vector<client::SpanToPut> put;
      for (size_t i = b; i < std::min(spans.size(), b + batch); ++i) {
        const auto& s = spans[i];
        put.push_back(client::SpanToPut{s.hash, s.parent, kTokens, s.token_ids, s.payload, true});
      }
      KVR_ASSERT_OK(client_->PutSpans(kModel, put).status());
    }
  }

  // Every span readable with the right bytes; returns how many were.
  int CountReadable(const std::vector<client::OwnedSpan>& spans) {
    absl::StatusOr<std::vector<client::FetchedSpan>> got = client_->GetSpans(kModel, Hashes(spans));
    if (!got.ok()) {
      ADD_FAILURE() << got.status();
      return 0;
    }
    int ok = 0;
    for (size_t i = 0; i < spans.size(); ++i) {
      ok += ((*got)[i].found && (*got)[i].payload == spans[i].payload) ? 1 : 0;
    }
    return ok;
  }

  // Node states of the running nodes.
  std::vector<v1::NodeStatus> Statuses() {
    std::vector<v1::NodeStatus> out;
    for (auto& n : nodes_) {
      if (!n->running()) continue;
      absl::StatusOr<v1::NodeStatus> s = client_->NodeStatus(n->address());
      if (s.ok()) out.push_back(*s);
    }
    return out;
  }
  int64_t TotalCopies() {
    int64_t total = 0;
    for (const auto& s : Statuses()) total += s.spans();
    return total;
  }

  std::string dir_;
  std::unique_ptr<EtcdProcess> etcd_;
  std::vector<std::unique_ptr<DaemonProcess>> nodes_;
  std::unique_ptr<client::ClusterClient> client_;
};

TEST_F(ClusterIntegrationTest, NodeLossRerouteReReplicationAndReconciliation) {
  StartCluster(3);
  const auto spans = Chain(40, 101);
  Put(spans);
  // R = 2: 80 copies over the 3 nodes, each holding some.
  ASSERT_TRUE(WaitFor([&] { return TotalCopies() == 80; }, absl::Seconds(10))) << TotalCopies();
  for (const auto& s : Statuses()) EXPECT_GT(s.spans(), 0) << s.node().node_id();

  // kill -9 n2: every acknowledged span is still readable at once (the next
  // replica answers; the client skips the dead node).
  KVR_ASSERT_OK(nodes_[1]->Kill());
  const absl::Time killed = absl::Now();
  EXPECT_EQ(CountReadable(spans), 40);
  EXPECT_LT(absl::Now() - killed, absl::Seconds(2));
  // The membership drops it within the lease TTL (2 s) plus a watch round trip.
  ASSERT_TRUE(WaitFor([&] { return LiveNodes() == 2; }, absl::Seconds(5)));
  EXPECT_LT(absl::Now() - killed, absl::Seconds(5));

  // Its copies are made again on the live nodes: 2 copies of every span.
  ASSERT_TRUE(WaitFor(
      [&] {
        if (TotalCopies() != 80) return false;
        for (const auto& s : Statuses()) {
          if (s.replication().debt_spans() != 0) return false;
        }
        return true;
      },
      absl::Seconds(20)))
      << "copies " << TotalCopies();
  int64_t replicated = 0;
  for (const auto& s : Statuses()) replicated += s.replication().replicated_spans();
  EXPECT_GT(replicated, 0);
  EXPECT_EQ(CountReadable(spans), 40);

  // A span deleted while n2 is down...
  KVR_ASSERT_OK_AND_ASSIGN(auto deleted, client_->DeleteSpans({spans[39].hash}));
  KVR_ASSERT_OK(deleted[0]);
  // ... stays deleted when n2 comes back with its old copy (reconciliation),
  // and n2 holds only spans placement gives it once the sweeps settle.
  KVR_ASSERT_OK(nodes_[1]->Start());
  ASSERT_TRUE(WaitFor([&] { return LiveNodes() == 3; }, absl::Seconds(10)));
  ASSERT_TRUE(WaitFor(
      [&] {
        if (TotalCopies() != 78) return false;
        for (const auto& s : Statuses()) {
          if (s.replication().misplaced_spans() != 0 || s.replication().debt_spans() != 0) {
            return false;
          }
        }
        return true;
      },
      absl::Seconds(20)))
      << "copies " << TotalCopies();
  std::vector<client::OwnedSpan> kept(spans.begin(), spans.begin() + 39);
  EXPECT_EQ(CountReadable(kept), 39);
  KVR_ASSERT_OK_AND_ASSIGN(auto gone, client_->GetSpans(kModel, {spans[39].hash}));
  EXPECT_FALSE(gone[0].found);
  EXPECT_EQ(gone[0].miss_reason, v1::MISS_REASON_DELETED)
      << client::MissReasonName(gone[0].miss_reason);
}

TEST_F(ClusterIntegrationTest, SpanOnDeadNodesSaysOwnerUnavailable) {
  StartCluster(3);
  const auto spans = Chain(6, 202);
  Put(spans);
  // Kill both owners of the last span: no live replica is left.
  const std::vector<std::string> order = client_->Order(spans[5].hash);
  ASSERT_EQ(order.size(), 3u);
  for (auto& n : nodes_) {
    KVR_ASSERT_OK_AND_ASSIGN(auto st, client_->NodeStatus(n->address()));
    if (st.node().node_id() == order[0] || st.node().node_id() == order[1]) {
      KVR_ASSERT_OK(n->Kill());
    }
  }
  KVR_ASSERT_OK_AND_ASSIGN(auto got, client_->GetSpans(kModel, {spans[5].hash}));
  EXPECT_FALSE(got[0].found);
  EXPECT_EQ(got[0].miss_reason, v1::MISS_REASON_OWNER_UNAVAILABLE)
      << client::MissReasonName(got[0].miss_reason);
  // A span never stored says so, even now.
  const Hash128 never = SpanHash(spans[5].hash, std::vector<uint32_t>(kTokens, 7));
  KVR_ASSERT_OK_AND_ASSIGN(auto none, client_->GetSpans(kModel, {never}));
  EXPECT_FALSE(none[0].found);
}

TEST_F(ClusterIntegrationTest, NodeAddMovesDataWhileReadsKeepHitting) {
  StartCluster(3);
  const auto spans = Chain(40, 303);
  Put(spans);
  ASSERT_TRUE(WaitFor([&] { return TotalCopies() == 80; }, absl::Seconds(10)));

  std::atomic<bool> stop{false};
  std::atomic<int> reads{0}, failed{0};
  std::thread reader([&] {
    client::ClusterClientOptions o;
    o.seeds = {nodes_[0]->address()};
    o.node.deadline_ms = 20000;
    o.refresh_interval = absl::Milliseconds(300);
    auto c = client::ClusterClient::Create(o);
    if (!c.ok()) {
      failed = 1;
      return;
    }
    size_t i = 0;
    while (!stop) {
      const auto& s = spans[i++ % spans.size()];
      auto got = (*c)->GetSpans(kModel, {s.hash});
      ++reads;
      if (!got.ok() || !(*got)[0].found || (*got)[0].payload != s.payload) ++failed;
    }
  });
  AddNode();  // n4
  ASSERT_TRUE(WaitFor([&] { return LiveNodes() == 4; }, absl::Seconds(10)));
  // The spans placement now gives n4 move there; the others drop their copies.
  const bool settled = WaitFor(
      [&] {
        const auto statuses = Statuses();
        if (statuses.size() != 4 || TotalCopies() != 80) return false;
        for (const auto& s : statuses) {
          if (s.replication().misplaced_spans() != 0 || s.replication().debt_spans() != 0) {
            return false;
          }
          if (s.node().node_id() == "n4" && s.primary_spans() == 0) return false;
        }
        return true;
      },
      absl::Seconds(20));
  stop = true;
  reader.join();
  ASSERT_TRUE(settled) << "copies " << TotalCopies();
  int64_t moved = 0;
  for (const auto& s : Statuses()) moved += s.replication().moved_spans();
  EXPECT_GT(moved, 0);
  EXPECT_GT(reads.load(), 0);
  EXPECT_EQ(failed.load(), 0) << "of " << reads.load() << " reads";
  EXPECT_EQ(CountReadable(spans), 40);
}

TEST_F(ClusterIntegrationTest, EtcdRestartDuringTrafficLosesNothing) {
  StartCluster(3);
  std::vector<std::vector<client::OwnedSpan>> chains;
  std::atomic<bool> stop{false};
  std::atomic<int> failed_puts{0};
  std::vector<std::vector<client::OwnedSpan>> acked;
  absl::Mutex mu;
  std::thread writer([&] {
    for (uint64_t seed = 1; !stop; ++seed) {
      auto chain = Chain(4, 4000 + seed);
      std::vector<client::SpanToPut> put;
      for (const auto& s : chain) {
        put.push_back(client::SpanToPut{s.hash, s.parent, kTokens, s.token_ids, s.payload, true});
      }
      if (client_->PutSpans(kModel, put).ok()) {
        absl::MutexLock lock(&mu);
        acked.push_back(std::move(chain));
      } else {
        ++failed_puts;
      }
    }
  });
  absl::SleepFor(absl::Milliseconds(500));
  KVR_ASSERT_OK(etcd_->Kill());
  absl::SleepFor(absl::Milliseconds(1500));  // within the lease TTL: nobody expires
  KVR_ASSERT_OK(etcd_->Start());
  absl::SleepFor(absl::Milliseconds(1000));
  stop = true;
  writer.join();
  EXPECT_EQ(failed_puts.load(), 0);
  ASSERT_GT(acked.size(), 2u);
  for (const auto& chain : acked) EXPECT_EQ(CountReadable(chain), 4);
  ASSERT_TRUE(WaitFor([&] { return LiveNodes() == 3; }, absl::Seconds(10)));
}

TEST_F(ClusterIntegrationTest, SpansPutWhileAnOwnerWasDownSurviveTheNextKill) {
  StartCluster(3);
  // n2 down (its lease still live): puts go to the next nodes in placement order.
  KVR_ASSERT_OK(nodes_[1]->Kill());
  const auto spans = Chain(24, 404);
  Put(spans);
  // n2 comes back; at once n1 dies: n3 holds every span, and reads that
  // land on n2 (which owns some of them but got no copy yet, and has no
  // earlier membership to go by) find them there.
  KVR_ASSERT_OK(nodes_[1]->Start());
  ASSERT_TRUE(WaitFor([&] { return LiveNodes() == 3; }, absl::Seconds(10)));
  KVR_ASSERT_OK(nodes_[0]->Kill());
  EXPECT_EQ(CountReadable(spans), 24);
  client::ClientOptions o;
  o.target = nodes_[1]->address();
  KVR_ASSERT_OK_AND_ASSIGN(auto n2, client::KvStoreClient::Create(o));
  KVR_ASSERT_OK_AND_ASSIGN(auto got, n2->GetSpans(kModel, Hashes(spans)));
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(got[i].found) << "span " << i << ": " << client::MissReasonName(got[i].miss_reason);
  }
}

}  // namespace
}  // namespace kvrecall
