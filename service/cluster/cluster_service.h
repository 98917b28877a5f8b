#pragma once

// ClusterServiceImpl: kvrecall.v1.Cluster (docs/cluster.md): the membership
// for clients that cannot reach etcd, each node's status for
// `kvrecall cluster status`, and ForgetNode for operators.
//
// Thread-safe.

#include <functional>

#include "kvrecall/v1/cluster.grpc.pb.h"
#include "service/cluster/membership.h"
#include "service/rpc/rpc_metrics.h"
#include "service/rpc/tenant_auth.h"

namespace kvrecall::cluster {

class ClusterServiceImpl final : public v1::Cluster::Service {
 public:
  // Nothing is owned; everything must outlive the service. `status` gives
  // this node's NodeStatus.
  ClusterServiceImpl(Membership* membership, const rpc::TenantAuthenticator* auth,
                     rpc::RpcMetrics* metrics, std::function<v1::NodeStatus()> status);

  grpc::Status GetMembership(grpc::ServerContext* context, const v1::GetMembershipRequest* request,
                             v1::Membership* response) override;
  grpc::Status WatchMembership(grpc::ServerContext* context,
                               const v1::GetMembershipRequest* request,
                               grpc::ServerWriter<v1::Membership>* writer) override;
  grpc::Status GetNodeStatus(grpc::ServerContext* context, const v1::GetNodeStatusRequest* request,
                             v1::NodeStatus* response) override;
  grpc::Status ForgetNode(grpc::ServerContext* context, const v1::ForgetNodeRequest* request,
                          v1::ForgetNodeResponse* response) override;

 private:
  Membership* const membership_;
  const rpc::TenantAuthenticator* const auth_;
  const std::function<v1::NodeStatus()> status_;
  rpc::RpcMethodMetrics* const get_membership_metrics_;
  rpc::RpcMethodMetrics* const watch_membership_metrics_;
  rpc::RpcMethodMetrics* const node_status_metrics_;
  rpc::RpcMethodMetrics* const forget_node_metrics_;
};

}  // namespace kvrecall::cluster
