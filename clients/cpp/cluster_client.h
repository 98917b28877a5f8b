#pragma once

// ClusterClient: the C++ client of a kvrecalld cluster (docs/cluster.md).
// It learns the membership from any of its seeds (kvrecall.v1.Cluster), and
// sends each call to the node that owns the data by the cluster's placement
// (rendezvous hashing, service/cluster/placement.h, the same function the
// nodes and the Python client use):
//
//   PutSpans   runs of consecutive spans with the same first owner, in chain
//              order, each to that owner (which stores the R copies).
//   GetSpans   hashes grouped by first owner, one call per owner.
//   Lookup     to the owner of the chain's first span.
//
// A node that does not answer (killed, restarting) is skipped: the call goes
// to the next node in placement order at once (any node serves any call, by
// forwarding), and the membership is read again, so clients stop routing to a
// dead node within its lease TTL. Misses keep their reasons across nodes.
//
//   ClusterClientOptions o;
//   o.seeds = {"127.0.0.1:7878", "127.0.0.1:7879"};
//   KVR_ASSIGN_OR_RETURN(auto cluster, ClusterClient::Create(o));
//   KVR_RETURN_IF_ERROR(cluster->PutSpans(model_id, spans).status());
//
// Thread-safe.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/rpc_policy.h"
#include "kvrecall/v1/cluster.grpc.pb.h"

namespace kvrecall::client {

struct ClusterClientOptions {
  ClusterClientOptions() { node.max_attempts = 1; }
  // host:port of nodes to learn the membership from (at least one).
  std::vector<std::string> seeds;
  // Options of the connection to each node (target is ignored; deadline,
  // token, TLS and chunking apply to every node). Attempts per node default
  // to 1 here: a node that does not answer is replaced by the next one.
  ClientOptions node;
  // The membership is read again after this long, and at once after a
  // node failed a call. Default 2 s.
  absl::Duration refresh_interval = absl::Seconds(2);
};

class ClusterClient {
 public:
  // Reads the membership from the first seed that answers. INVALID_ARGUMENT
  // without seeds; UNAVAILABLE when no seed answers; FAILED_PRECONDITION when
  // the cluster uses another placement function than this client.
  static absl::StatusOr<std::unique_ptr<ClusterClient>> Create(ClusterClientOptions options);

  // The membership as last read; Refresh() reads it again from any live node.
  v1::Membership membership() const ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Refresh() ABSL_LOCKS_EXCLUDED(mu_);
  // Live node ids in placement order for `key`.
  std::vector<std::string> Order(const Hash128& key) ABSL_LOCKS_EXCLUDED(mu_);
  // The state of one node (Cluster.GetNodeStatus).
  absl::StatusOr<v1::NodeStatus> NodeStatus(const std::string& address);
  // Forgets a node that is down for good (Cluster.ForgetNode; admins only).
  absl::Status ForgetNode(const std::string& node_id);
  // The client of the node at `address` (made on first use).
  absl::StatusOr<KvStoreClient*> NodeClient(const std::string& address) ABSL_LOCKS_EXCLUDED(mu_);

  absl::StatusOr<v1::RegisterModelResponse> RegisterModel(const v1::ModelGeometry& model);
  absl::StatusOr<std::vector<PutResult>> PutSpans(absl::string_view model_id,
                                                  absl::Span<const SpanToPut> spans,
                                                  const PutOptions& options = {});
  absl::StatusOr<std::vector<FetchedSpan>> GetSpans(absl::string_view model_id,
                                                    absl::Span<const Hash128> hashes,
                                                    LayerRange layers = {});
  absl::StatusOr<LookupResult> Lookup(absl::string_view model_id,
                                      absl::Span<const Hash128> hashes);
  absl::StatusOr<std::vector<absl::Status>> DeleteSpans(absl::Span<const Hash128> hashes);

 private:
  struct Node {
    std::unique_ptr<RpcPolicy> policy;
    std::unique_ptr<KvStoreClient> client;
    std::unique_ptr<v1::Cluster::Stub> cluster;
  };
  explicit ClusterClient(ClusterClientOptions options) : options_(std::move(options)) {}
  absl::StatusOr<Node*> NodeAt(const std::string& address) ABSL_LOCKS_EXCLUDED(mu_);
  // Refreshes when the interval passed.
  void MaybeRefresh() ABSL_LOCKS_EXCLUDED(mu_);
  // Addresses of the live nodes in placement order for `key` (every live
  // node, then the seeds as a last resort).
  std::vector<std::string> Addresses(const Hash128& key) ABSL_LOCKS_EXCLUDED(mu_);
  // Runs `call` on the nodes for `key` in order until one answers (a status
  // other than UNAVAILABLE / DEADLINE_EXCEEDED).
  absl::Status OnOwner(const Hash128& key,
                       const std::function<absl::Status(KvStoreClient*)>& call);

  const ClusterClientOptions options_;
  mutable absl::Mutex mu_;
  v1::Membership membership_ ABSL_GUARDED_BY(mu_);
  absl::Time read_at_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::flat_hash_map<std::string, std::unique_ptr<Node>> nodes_ ABSL_GUARDED_BY(mu_);
};

// Whether a status says the node, not the request, failed (another node may
// take the call).
bool IsNodeFailure(const absl::Status& status);

}  // namespace kvrecall::client
