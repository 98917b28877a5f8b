#pragma once

// ClusterNode: everything that makes a kvrecalld a node of a cluster
// (docs/cluster.md), assembled for the daemon:
//
//   KVR_ASSIGN_OR_RETURN(auto node, ClusterNode::Create(cluster_options));  // reads etcd
//   server = Server::Create(options, node->WrapStoreOpener(&TieredStore::Open),
//                           node->WrapServices(additional_services));
//   KVR_RETURN_IF_ERROR(node->Join());      // registers in etcd, starts replication
//   ... serve ...
//   node->Leave();                          // clients and peers stop routing here
//   server->Shutdown(grace);
//   node->Stop();                           // before the server (and its store) goes
//
// The store opener wraps the node's store in a ClusterStore; the services
// add kvrecall.v1.Cluster and kvrecall.v1.ClusterPeer and put the Retrieval
// service behind a RetrievalForwarder.
//
// Thread-safe.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "service/cluster/cluster_store.h"
#include "service/cluster/membership.h"
#include "service/cluster/peers.h"
#include "service/cluster/replicator.h"
#include "service/rpc/server.h"

namespace kvrecall::cluster {

struct ClusterOptions {
  MembershipOptions membership;
  PeerOptions peers;
  ReplicatorOptions replicator;
  ClusterStoreOptions store;
  // Largest span the peer service accepts (the daemon's --max_span_bytes).
  int64_t max_span_bytes = int64_t{256} << 20;
};

class ClusterNode {
 public:
  // Creates the membership and reads the cluster from etcd (Membership::Start).
  static absl::StatusOr<std::unique_ptr<ClusterNode>> Create(const ClusterOptions& options);
  ~ClusterNode();

  // An opener that opens the local store with `inner` and wraps it.
  rpc::StoreOpener WrapStoreOpener(rpc::StoreOpener inner);
  // `services` with Retrieval behind the forwarder, plus Cluster and ClusterPeer.
  std::vector<rpc::ServiceFactory> WrapServices(std::vector<rpc::ServiceFactory> services);
  // Adds this node's status to Admin.Stats (ServerOptions::stats_extension).
  void FillStats(v1::StatsResponse* response) const;

  // Registers the node in etcd and starts background replication.
  // REQUIRES: the server was created (the store is open).
  absl::Status Join();
  void Leave();
  // Stops replication and the membership watch.
  void Stop();

  Membership* membership() const { return membership_.get(); }
  ClusterStore* store() const { return store_; }
  Replicator* replicator() const { return replicator_.get(); }
  v1::NodeStatus Status() const;

 private:
  explicit ClusterNode(const ClusterOptions& options) : options_(options) {}

  const ClusterOptions options_;
  std::unique_ptr<Membership> membership_;
  std::unique_ptr<PeerPool> peers_;
  ClusterStore* store_ = nullptr;  // owned by the server
  std::unique_ptr<Replicator> replicator_;
};

}  // namespace kvrecall::cluster
