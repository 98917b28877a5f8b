#pragma once

// Membership: one kvrecalld's view of its cluster, kept in etcd
// (docs/cluster.md). Under /kvrecall/<cluster>/ etcd holds
//
//   config              the cluster's replication factor and lease TTL (set
//                       once, by the first node)
//   nodes/<node_id>     a live node's NodeInfo, attached to its lease: it
//                       disappears when the node stops renewing it
//   members/<node_id>   every node that ever joined (no lease): a node that is
//                       down is known, so misses can say it holds the span
//   models/<model_id>   the registered model geometries, cluster-wide
//
// Start() reads all of it and watches the prefix (a thread); Join()
// registers this node with a lease that a second thread keeps alive,
// re-registering after a lease loss (etcd down longer than the TTL). While
// etcd is unreachable the last view stays in force: the data path goes on.
//
// Thread-safe.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/types.h"
#include "kvrecall/v1/cluster.pb.h"
#include "kvrecall/v1/kv_store.pb.h"
#include "service/cluster/etcd_client.h"

namespace kvrecall::cluster {

struct MembershipOptions {
  // --etcd_endpoints: host:port of etcd, at least one.
  std::vector<std::string> etcd_endpoints;
  // --cluster_name: keys live under /kvrecall/<cluster_name>/. Default "default".
  std::string cluster_name = "default";
  // --node_id: this node's id (ValidateNodeId). Required.
  std::string node_id;
  // --advertise: host:port clients and peers dial to reach this node. Required.
  std::string advertise;
  // --replication_factor: R for a new cluster; 0 adopts the cluster's.
  // A node asking for another R than the cluster's refuses to start.
  int32_t replication_factor = 0;
  // --lease_ttl_s: the lease of this node; a dead node leaves the membership
  // within it. Default 10 s; range 2..300 (a new cluster stores it).
  int64_t lease_ttl_s = 10;
  // This host's identity (the Linux boot id), published for clients.
  std::string host_id;
  // etcd call deadline.
  absl::Duration etcd_timeout = absl::Seconds(3);
};

// An immutable snapshot of the membership.
struct MembershipView {
  std::string cluster;
  int64_t revision = 0;
  int32_t replication_factor = 2;
  int64_t lease_ttl_s = 10;
  std::vector<v1::NodeInfo> nodes;     // every known node, by node id
  std::vector<std::string> live_ids;   // live node ids, sorted
  std::vector<std::string> known_ids;  // every known node id, sorted

  // NodeInfo of `node_id`, null when unknown.
  const v1::NodeInfo* Find(absl::string_view node_id) const;
  bool IsLive(absl::string_view node_id) const;
  // The owners of `key` among the live nodes (at most R).
  std::vector<std::string> Owners(const Hash128& key) const;
  // Every live node in placement order for `key`.
  std::vector<std::string> Order(const Hash128& key) const;
  // The owners of `key` had every known node been live.
  std::vector<std::string> OwnersIfAllLive(const Hash128& key) const;
  // The view as the Cluster service returns it.
  v1::Membership ToProto(absl::string_view self) const;
};
using MembershipViewPtr = std::shared_ptr<const MembershipView>;

class Membership {
 public:
  // INVALID_ARGUMENT for bad options. Does not contact etcd.
  static absl::StatusOr<std::unique_ptr<Membership>> Create(const MembershipOptions& options);
  // Leaves (revoking the lease) if joined, and stops the threads.
  ~Membership();

  const MembershipOptions& options() const { return options_; }
  const std::string& node_id() const { return options_.node_id; }

  // Reads the cluster's config (creating it for a new cluster), its members
  // and models, and starts watching. FAILED_PRECONDITION when this node asks
  // for another replication factor than the cluster's; UNAVAILABLE when
  // etcd cannot be reached.
  absl::Status Start();
  // Registers this node (lease, nodes/ and members/ keys) and keeps the lease
  // alive. REQUIRES: Start() succeeded.
  absl::Status Join();
  // Revokes the lease (peers and clients stop routing here at once) and
  // stops renewing it. Idempotent.
  void Leave();
  // Stops the watch. Idempotent; the destructor calls it.
  void Stop();

  // The current view (never null after Start()).
  MembershipViewPtr view() const ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks until the view's revision is above `revision` or `timeout` passes;
  // returns the view then.
  MembershipViewPtr WaitForChange(int64_t revision, absl::Duration timeout) const
      ABSL_LOCKS_EXCLUDED(mu_);
  // Called (on the watch thread) after every membership change.
  void AddListener(std::function<void(const MembershipViewPtr&)> listener)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Called (on the watch thread, and by Start() for each existing one) for
  // every model registered in the cluster.
  void SetModelListener(std::function<void(const v1::ModelGeometry&)> listener)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Registers a model cluster-wide: creates models/<id>, or checks that the
  // existing geometry is the same (ALREADY_EXISTS otherwise). UNAVAILABLE
  // when etcd cannot be reached.
  absl::Status PublishModel(const v1::ModelGeometry& model);
  // The cluster's geometry of `model_id` read from etcd; NOT_FOUND when absent.
  absl::StatusOr<v1::ModelGeometry> FetchModel(absl::string_view model_id);
  // Removes a known member that is down (ForgetNode).
  absl::Status Forget(absl::string_view node_id);

  // This node's lease id (0 before Join) and the time left on it.
  int64_t lease_id() const ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<absl::Duration> LeaseTimeLeft();
  // Whether the last etcd call of the keep-alive or the watch succeeded.
  bool etcd_connected() const ABSL_LOCKS_EXCLUDED(mu_);
  // This node's NodeInfo as registered.
  v1::NodeInfo self_info() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  explicit Membership(const MembershipOptions& options, std::unique_ptr<EtcdClient> etcd);

  std::string Key(absl::string_view suffix) const;
  absl::Status EnsureConfig();
  // Grants a lease and writes nodes/ and members/ for this node.
  absl::Status Register() ABSL_LOCKS_EXCLUDED(mu_);
  // Reads the whole prefix into a fresh state (after start or a compaction).
  absl::Status Resync() ABSL_LOCKS_EXCLUDED(mu_);
  // Applies watched events; returns false to stop.
  bool Apply(const std::vector<EtcdEvent>& events, int64_t revision) ABSL_LOCKS_EXCLUDED(mu_);
  void PublishView() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WatchLoop();
  void KeepAliveLoop();

  const MembershipOptions options_;
  std::unique_ptr<EtcdClient> etcd_;
  EtcdWatchHandle watch_handle_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, v1::NodeInfo> live_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, v1::NodeInfo> members_ ABSL_GUARDED_BY(mu_);
  int64_t revision_ ABSL_GUARDED_BY(mu_) = 0;
  int32_t replication_factor_ ABSL_GUARDED_BY(mu_) = 2;
  int64_t lease_ttl_s_ ABSL_GUARDED_BY(mu_) = 10;
  MembershipViewPtr view_ ABSL_GUARDED_BY(mu_);
  std::vector<std::function<void(const MembershipViewPtr&)>> listeners_ ABSL_GUARDED_BY(mu_);
  std::function<void(const v1::ModelGeometry&)> model_listener_ ABSL_GUARDED_BY(mu_);
  v1::NodeInfo self_ ABSL_GUARDED_BY(mu_);
  int64_t lease_ ABSL_GUARDED_BY(mu_) = 0;
  bool joined_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool leaving_ ABSL_GUARDED_BY(mu_) = false;
  bool etcd_ok_ ABSL_GUARDED_BY(mu_) = false;

  std::thread watcher_;
  std::thread keeper_;
};

// The Linux boot id (/proc/sys/kernel/random/boot_id), or the hostname when
// it cannot be read: two processes with the same value share a machine.
std::string LocalHostId();

}  // namespace kvrecall::cluster
