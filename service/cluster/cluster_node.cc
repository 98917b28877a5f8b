#include "service/cluster/cluster_node.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "service/cluster/cluster_service.h"
#include "service/cluster/peer_service.h"
#include "service/cluster/retrieval_forwarder.h"

namespace kvrecall::cluster {

absl::StatusOr<std::unique_ptr<ClusterNode>> ClusterNode::Create(const ClusterOptions& options) {
  std::unique_ptr<ClusterNode> node(new ClusterNode(options));
  KVR_ASSIGN_OR_RETURN(node->membership_, Membership::Create(options.membership));
  KVR_ASSIGN_OR_RETURN(node->peers_, PeerPool::Create(options.peers));
  return node;
}

ClusterNode::~ClusterNode() { Stop(); }

rpc::StoreOpener ClusterNode::WrapStoreOpener(rpc::StoreOpener inner) {
  return [this, inner = std::move(inner)](const store::TieredStoreOptions& o)
             -> absl::StatusOr<std::unique_ptr<store::TieredStore>> {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<store::TieredStore> local, inner(o));
    auto wrapped = std::make_unique<ClusterStore>(std::move(local), membership_.get(),
                                                  peers_.get(), o.metrics, options_.store);
    store_ = wrapped.get();
    ClusterStore* store = store_;
    membership_->SetModelListener([store](const v1::ModelGeometry& m) {
      absl::Status st = store->RegisterLocally(m);
      if (!st.ok()) KVR_LOG(WARNING) << "cluster: registering model " << m.model_id() << ": " << st;
    });
    // Reads the cluster (models included) now that they have somewhere to go.
    KVR_RETURN_IF_ERROR(membership_->Start());
    replicator_ = std::make_unique<Replicator>(store_, membership_.get(), peers_.get(), o.metrics,
                                               options_.replicator);
    return std::unique_ptr<store::TieredStore>(std::move(wrapped));
  };
}

std::vector<rpc::ServiceFactory> ClusterNode::WrapServices(
    std::vector<rpc::ServiceFactory> services) {
  std::vector<rpc::ServiceFactory> out;
  for (rpc::ServiceFactory& f : services) {
    out.push_back([this, f = std::move(f)](const rpc::ServiceContext& ctx)
                      -> absl::StatusOr<std::unique_ptr<grpc::Service>> {
      KVR_ASSIGN_OR_RETURN(std::unique_ptr<grpc::Service> service, f(ctx));
      if (dynamic_cast<v1::Retrieval::Service*>(service.get()) == nullptr) return service;
      return std::unique_ptr<grpc::Service>(
          new RetrievalForwarder(std::move(service), membership_.get(), peers_.get()));
    });
  }
  out.push_back([this](const rpc::ServiceContext& ctx)
                    -> absl::StatusOr<std::unique_ptr<grpc::Service>> {
    return std::unique_ptr<grpc::Service>(new ClusterServiceImpl(
        membership_.get(), ctx.auth, ctx.rpc_metrics, [this] { return Status(); }));
  });
  out.push_back([this](const rpc::ServiceContext& ctx)
                    -> absl::StatusOr<std::unique_ptr<grpc::Service>> {
    if (store_ == nullptr) return absl::InternalError("the cluster store was not opened");
    PeerServiceOptions o;
    o.peer_token = options_.peers.peer_token;
    o.max_span_bytes = options_.max_span_bytes;
    o.chunk_bytes = options_.peers.chunk_bytes;
    ClusterStore* store = store_;
    o.ensure_model = [store](absl::string_view model_id) { return store->EnsureModel(model_id); };
    return std::unique_ptr<grpc::Service>(new PeerServiceImpl(store_->local(), ctx.rpc_metrics, o));
  });
  return out;
}

absl::Status ClusterNode::Join() {
  if (store_ == nullptr) return absl::FailedPreconditionError("the cluster store was not opened");
  KVR_RETURN_IF_ERROR(membership_->Join());
  replicator_->Start();
  return absl::OkStatus();
}

void ClusterNode::Leave() {
  if (membership_ != nullptr) membership_->Leave();
}

void ClusterNode::Stop() {
  if (replicator_ != nullptr) replicator_->Stop();
  if (membership_ != nullptr) membership_->Stop();
}

v1::NodeStatus ClusterNode::Status() const {
  v1::NodeStatus s;
  *s.mutable_node() = membership_->self_info();
  s.set_etcd_connected(membership_->etcd_connected());
  s.set_lease_ttl_left_s(-1);
  if (s.etcd_connected() && s.node().lease_id() != 0) {
    absl::StatusOr<absl::Duration> left = membership_->LeaseTimeLeft();
    if (left.ok()) s.set_lease_ttl_left_s(absl::ToInt64Seconds(*left));
  }
  const MembershipViewPtr view = membership_->view();
  s.set_live_nodes(static_cast<int32_t>(view->live_ids.size()));
  if (store_ != nullptr) {
    int64_t spans = 0, bytes = 0, primary = 0;
    for (const store::SpanListing& l : store_->local()->ListSpans()) {
      ++spans;
      bytes += l.payload_bytes;
      const std::vector<std::string> owners = view->Owners(l.key.hash);
      if (!owners.empty() && owners[0] == membership_->node_id()) ++primary;
    }
    s.set_spans(spans);
    s.set_bytes(bytes);
    s.set_primary_spans(primary);
  }
  if (replicator_ != nullptr) *s.mutable_replication() = replicator_->Stats();
  return s;
}

void ClusterNode::FillStats(v1::StatsResponse* response) const {
  *response->mutable_cluster() = Status();
}

}  // namespace kvrecall::cluster
