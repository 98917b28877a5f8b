#include "service/cluster/cluster_service.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "service/rpc/grpc_status.h"

namespace kvrecall::cluster {

ClusterServiceImpl::ClusterServiceImpl(Membership* membership,
                                       const rpc::TenantAuthenticator* auth,
                                       rpc::RpcMetrics* metrics,
                                       std::function<v1::NodeStatus()> status)
    : membership_(membership),
      auth_(auth),
      status_(std::move(status)),
      get_membership_metrics_(metrics->Register("kvrecall.v1.Cluster/GetMembership")),
      watch_membership_metrics_(metrics->Register("kvrecall.v1.Cluster/WatchMembership")),
      node_status_metrics_(metrics->Register("kvrecall.v1.Cluster/GetNodeStatus")),
      forget_node_metrics_(metrics->Register("kvrecall.v1.Cluster/ForgetNode")) {}

grpc::Status ClusterServiceImpl::GetMembership(grpc::ServerContext* context,
                                               const v1::GetMembershipRequest* request,
                                               v1::Membership* response) {
  rpc::RpcScope scope(get_membership_metrics_);
  if (!scope.admitted()) return scope.Finish(rpc::RpcScope::Rejected());
  absl::StatusOr<std::string> tenant = auth_->Authenticate(*context);
  if (!tenant.ok()) return scope.Finish(rpc::ToGrpcStatus(tenant.status()));
  *response = membership_->view()->ToProto(membership_->node_id());
  return scope.Finish(grpc::Status::OK);
}

grpc::Status ClusterServiceImpl::WatchMembership(grpc::ServerContext* context,
                                                 const v1::GetMembershipRequest* request,
                                                 grpc::ServerWriter<v1::Membership>* writer) {
  rpc::RpcScope scope(watch_membership_metrics_);
  if (!scope.admitted()) return scope.Finish(rpc::RpcScope::Rejected());
  absl::StatusOr<std::string> tenant = auth_->Authenticate(*context);
  if (!tenant.ok()) return scope.Finish(rpc::ToGrpcStatus(tenant.status()));
  MembershipViewPtr view = membership_->view();
  int64_t sent_revision = -1;
  // Ends with the call, or when the server drains (clients watch again elsewhere).
  while (!context->IsCancelled() && !watch_membership_metrics_->gate()->draining()) {
    if (view->revision != sent_revision) {
      if (!writer->Write(view->ToProto(membership_->node_id()))) break;
      sent_revision = view->revision;
    }
    view = membership_->WaitForChange(view->revision, absl::Milliseconds(250));
  }
  return scope.Finish(grpc::Status::OK);
}

grpc::Status ClusterServiceImpl::GetNodeStatus(grpc::ServerContext* context,
                                               const v1::GetNodeStatusRequest* request,
                                               v1::NodeStatus* response) {
  rpc::RpcScope scope(node_status_metrics_);
  if (!scope.admitted()) return scope.Finish(rpc::RpcScope::Rejected());
  absl::StatusOr<std::string> tenant = auth_->Authenticate(*context);
  if (!tenant.ok()) return scope.Finish(rpc::ToGrpcStatus(tenant.status()));
  *response = status_();
  return scope.Finish(grpc::Status::OK);
}

grpc::Status ClusterServiceImpl::ForgetNode(grpc::ServerContext* context,
                                            const v1::ForgetNodeRequest* request,
                                            v1::ForgetNodeResponse* response) {
  rpc::RpcScope scope(forget_node_metrics_);
  if (!scope.admitted()) return scope.Finish(rpc::RpcScope::Rejected());
  absl::StatusOr<rpc::Principal> caller = auth_->AuthenticatePrincipal(*context);
  if (!caller.ok()) return scope.Finish(rpc::ToGrpcStatus(caller.status()));
  if (auth_->enabled() && !caller->admin) {
    return scope.Finish(rpc::ToGrpcStatus(absl::PermissionDeniedError(
        "Cluster.ForgetNode needs the admin role (the 'admin' option of the tenants file)")));
  }
  return scope.Finish(rpc::ToGrpcStatus(membership_->Forget(request->node_id())));
}

}  // namespace kvrecall::cluster
