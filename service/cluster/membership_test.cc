// EtcdClient and Membership against a real etcd on loopback ports.
#include "service/cluster/membership.h"

#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/cluster/etcd_client.h"
#include "tests/testing/etcd_process.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::cluster {
namespace {

using ::kvrecall::testing::EtcdProcess;
using ::kvrecall::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

class EtcdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!EtcdProcess::Available()) {
      if (std::getenv("KVRECALL_REQUIRE_ETCD") != nullptr) FAIL() << "etcd is not installed";
      GTEST_SKIP() << "etcd is not installed (apt-get install etcd-server)";
    }
    etcd_ = std::make_unique<EtcdProcess>(kvrecall::testing::MakeTempDir("etcd"));
    KVR_ASSERT_OK(etcd_->Start());
  }

  MembershipOptions Options(const std::string& node) {
    MembershipOptions o;
    o.etcd_endpoints = {etcd_->endpoint()};
    o.cluster_name = "test";
    o.node_id = node;
    o.advertise = absl::StrCat("127.0.0.1:", 7000 + node.back());
    o.lease_ttl_s = 2;
    return o;
  }

  // Waits until `m` sees exactly `live` nodes live.
  static MembershipViewPtr AwaitLive(Membership* m, std::vector<std::string> live,
                                     absl::Duration timeout = absl::Seconds(15)) {
    const absl::Time deadline = absl::Now() + timeout;
    MembershipViewPtr v = m->view();
    while (v->live_ids != live && absl::Now() < deadline) {
      v = m->WaitForChange(v->revision, deadline - absl::Now());
    }
    return v;
  }

  std::unique_ptr<EtcdProcess> etcd_;
};

TEST_F(EtcdTest, KeysLeasesAndTransactions) {
  KVR_ASSERT_OK_AND_ASSIGN(auto etcd, EtcdClient::Create({{etcd_->endpoint()}}));
  KVR_ASSERT_OK(etcd->Put("/t/a", "1").status());
  KVR_ASSERT_OK(etcd->Put("/t/b", "2").status());
  KVR_ASSERT_OK(etcd->Put("/u", "3").status());
  KVR_ASSERT_OK_AND_ASSIGN(auto listed, etcd->GetPrefix("/t/"));
  ASSERT_EQ(listed.first.size(), 2u);
  EXPECT_EQ(listed.first[0].value, "1");
  EXPECT_GT(listed.second, 0);
  EtcdKeyValue existing;
  KVR_ASSERT_OK_AND_ASSIGN(bool created, etcd->PutIfAbsent("/t/a", "9", 0, &existing));
  EXPECT_FALSE(created);
  EXPECT_EQ(existing.value, "1");
  KVR_ASSERT_OK_AND_ASSIGN(created, etcd->PutIfAbsent("/t/c", "9", 0, &existing));
  EXPECT_TRUE(created);

  KVR_ASSERT_OK_AND_ASSIGN(int64_t lease, etcd->GrantLease(absl::Seconds(2)));
  KVR_ASSERT_OK(etcd->Put("/t/leased", "x", lease).status());
  KVR_ASSERT_OK_AND_ASSIGN(absl::Duration ttl, etcd->KeepAliveOnce(lease));
  EXPECT_EQ(ttl, absl::Seconds(2));
  KVR_ASSERT_OK(etcd->RevokeLease(lease));
  KVR_ASSERT_OK_AND_ASSIGN(auto gone, etcd->Get("/t/leased"));
  EXPECT_FALSE(gone.has_value());
  EXPECT_THAT(etcd->KeepAliveOnce(lease).status(), StatusIs(absl::StatusCode::kNotFound));
  KVR_ASSERT_OK_AND_ASSIGN(int64_t deleted, etcd->Delete("/u"));
  EXPECT_EQ(deleted, 1);
}

TEST_F(EtcdTest, UnreachableEtcdIsUnavailableAndBadEndpointsInvalid) {
  EXPECT_THAT(EtcdClient::Create({}).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(EtcdClient::Create({{"https://127.0.0.1:1"}}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("TLS")));
  EtcdOptions o;
  o.endpoints = {absl::StrCat("127.0.0.1:", kvrecall::testing::PickFreePort()),
                 etcd_->endpoint()};
  o.call_timeout = absl::Seconds(1);
  KVR_ASSERT_OK_AND_ASSIGN(auto etcd, EtcdClient::Create(o));
  KVR_EXPECT_OK(etcd->Put("/x", "y").status());  // moves on to the endpoint that answers
  EXPECT_EQ(etcd->current_endpoint(), etcd_->endpoint());
  KVR_ASSERT_OK(etcd_->Kill());
  EXPECT_THAT(etcd->Get("/x").status(), StatusIs(absl::StatusCode::kUnavailable));
}

TEST_F(EtcdTest, WatchDeliversChangesUntilCancelled) {
  KVR_ASSERT_OK_AND_ASSIGN(auto etcd, EtcdClient::Create({{etcd_->endpoint()}}));
  EtcdWatchHandle handle;
  std::atomic<int> puts{0}, deletes{0};
  absl::Notification watching;
  std::thread watcher([&] {
    absl::Status st = etcd->Watch("/w/", 0, [&](const std::vector<EtcdEvent>& events, int64_t) {
      if (!watching.HasBeenNotified()) watching.Notify();
      for (const auto& e : events) (e.deleted ? deletes : puts)++;
      return true;
    }, &handle);
    EXPECT_TRUE(st.ok()) << st;
  });
  watching.WaitForNotificationWithTimeout(absl::Seconds(5));  // progress notify or first event
  KVR_ASSERT_OK(etcd->Put("/w/1", "a").status());
  KVR_ASSERT_OK(etcd->Put("/x/1", "a").status());  // outside the prefix
  KVR_ASSERT_OK(etcd->Delete("/w/1").status());
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while ((puts < 1 || deletes < 1) && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));  // waiting on etcd's asynchronous delivery
  }
  handle.Cancel();
  watcher.join();
  EXPECT_EQ(puts.load(), 1);
  EXPECT_EQ(deletes.load(), 1);
}

TEST_F(EtcdTest, NodesJoinLeaveAndExpire) {
  KVR_ASSERT_OK_AND_ASSIGN(auto a, Membership::Create(Options("n1")));
  KVR_ASSERT_OK_AND_ASSIGN(auto b, Membership::Create(Options("n2")));
  KVR_ASSERT_OK(a->Start());
  KVR_ASSERT_OK(a->Join());
  KVR_ASSERT_OK(b->Start());
  KVR_ASSERT_OK(b->Join());
  MembershipViewPtr v = AwaitLive(a.get(), {"n1", "n2"});
  EXPECT_THAT(v->live_ids, ElementsAre("n1", "n2"));
  EXPECT_EQ(v->replication_factor, 2);
  ASSERT_NE(v->Find("n2"), nullptr);
  EXPECT_EQ(v->Find("n2")->address(), Options("n2").advertise);
  EXPECT_FALSE(v->Find("n2")->host_id().empty());

  // A graceful leave is seen at once; the node stays a known member.
  b->Leave();
  v = AwaitLive(a.get(), {"n1"}, absl::Seconds(5));
  EXPECT_THAT(v->live_ids, ElementsAre("n1"));
  EXPECT_THAT(v->known_ids, ElementsAre("n1", "n2"));
  EXPECT_FALSE(v->IsLive("n2"));
  b.reset();

  // A node that stops renewing (a crash) leaves within its lease TTL.
  KVR_ASSERT_OK_AND_ASSIGN(auto c, Membership::Create(Options("n3")));
  KVR_ASSERT_OK(c->Start());
  KVR_ASSERT_OK(c->Join());
  AwaitLive(a.get(), {"n1", "n3"});
  c->Stop();  // stops the keep-alive without revoking: the lease expires
  const absl::Time stopped = absl::Now();
  v = AwaitLive(a.get(), {"n1"}, absl::Seconds(10));
  EXPECT_THAT(v->live_ids, ElementsAre("n1"));
  EXPECT_LT(absl::Now() - stopped, absl::Seconds(6));  // TTL 2 s plus etcd's expiry check
  c.reset();

  // Forgetting a dead member; a live one is refused.
  EXPECT_THAT(a->Forget("n1"), StatusIs(absl::StatusCode::kFailedPrecondition));
  KVR_ASSERT_OK(a->Forget("n2"));
  EXPECT_THAT(a->Forget("n2"), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(EtcdTest, ReplicationFactorIsTheClustersAndModelsAreShared) {
  MembershipOptions o = Options("n1");
  o.replication_factor = 3;
  KVR_ASSERT_OK_AND_ASSIGN(auto a, Membership::Create(o));
  KVR_ASSERT_OK(a->Start());
  EXPECT_EQ(a->view()->replication_factor, 3);
  MembershipOptions other = Options("n2");
  other.replication_factor = 2;
  KVR_ASSERT_OK_AND_ASSIGN(auto b, Membership::Create(other));
  EXPECT_THAT(b->Start(), StatusIs(absl::StatusCode::kFailedPrecondition,
                                   HasSubstr("replication factor 3")));
  other.replication_factor = 0;  // adopts the cluster's
  KVR_ASSERT_OK_AND_ASSIGN(auto c, Membership::Create(other));
  std::atomic<int> models_seen{0};
  c->SetModelListener([&](const v1::ModelGeometry&) { ++models_seen; });
  KVR_ASSERT_OK(c->Start());
  EXPECT_EQ(c->view()->replication_factor, 3);

  v1::ModelGeometry m;
  m.set_model_id("m");
  m.set_num_layers(2);
  m.set_num_q_heads(2);
  m.set_num_kv_heads(1);
  m.set_head_dim(8);
  m.set_dtype(v1::DTYPE_F16);
  KVR_ASSERT_OK(a->PublishModel(m));
  KVR_ASSERT_OK(a->PublishModel(m));  // idempotent
  v1::ModelGeometry different = m;
  different.set_num_layers(3);
  EXPECT_THAT(a->PublishModel(different), StatusIs(absl::StatusCode::kAlreadyExists));
  KVR_ASSERT_OK_AND_ASSIGN(v1::ModelGeometry fetched, c->FetchModel("m"));
  EXPECT_EQ(fetched.num_layers(), 2);
  EXPECT_THAT(c->FetchModel("nope").status(), StatusIs(absl::StatusCode::kNotFound));
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (models_seen == 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));  // the watch delivers asynchronously
  }
  EXPECT_EQ(models_seen.load(), 1);
}

// etcd restarting (same data) keeps the lease and the view; the watch and
// the keep-alive reconnect by themselves.
TEST_F(EtcdTest, MembershipSurvivesAnEtcdRestart) {
  KVR_ASSERT_OK_AND_ASSIGN(auto a, Membership::Create(Options("n1")));
  KVR_ASSERT_OK(a->Start());
  KVR_ASSERT_OK(a->Join());
  const int64_t lease = a->lease_id();
  KVR_ASSERT_OK(etcd_->Stop());
  absl::SleepFor(absl::Milliseconds(500));  // etcd is down for a while
  EXPECT_THAT(a->view()->live_ids, ElementsAre("n1"));  // the last view stays in force
  KVR_ASSERT_OK(etcd_->Start());
  KVR_ASSERT_OK_AND_ASSIGN(auto b, Membership::Create(Options("n2")));
  KVR_ASSERT_OK(b->Start());
  KVR_ASSERT_OK(b->Join());
  MembershipViewPtr v = AwaitLive(a.get(), {"n1", "n2"});
  EXPECT_THAT(v->live_ids, ElementsAre("n1", "n2"));
  // A few TTLs later n1 is still live: its keep-alive found etcd again.
  absl::SleepFor(absl::Seconds(3));
  v = b->view();
  EXPECT_THAT(v->live_ids, ElementsAre("n1", "n2"));
  EXPECT_TRUE(a->etcd_connected());
  EXPECT_NE(a->lease_id(), 0);
  (void)lease;
}

}  // namespace
}  // namespace kvrecall::cluster
