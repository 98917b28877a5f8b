#pragma once

// PeerServiceImpl: kvrecall.v1.ClusterPeer, the node-to-node service of a
// cluster (docs/cluster.md), over this node's local store only: it never
// asks other nodes, so peers cannot bounce a call between them. Calls carry
// the tenant explicitly, so they are refused (UNAUTHENTICATED) without the
// cluster's peer token whenever one is configured.
//
// Thread-safe.

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "kvrecall/v1/cluster.grpc.pb.h"
#include "service/rpc/rpc_metrics.h"
#include "service/store/tiered_store.h"

namespace kvrecall::cluster {

struct PeerServiceOptions {
  // The secret every call must carry in x-kvrecall-peer-token; empty: none
  // (a cluster without a tenants file).
  std::string peer_token;
  // Largest span payload accepted, bytes.
  int64_t max_span_bytes = int64_t{256} << 20;
  // Payload bytes per FetchSpans message.
  int64_t chunk_bytes = int64_t{1} << 20;
  // Makes sure a model is registered locally (from the cluster's registry)
  // before a replica of it is stored; may be empty.
  std::function<absl::Status(absl::string_view model_id)> ensure_model;
};

class PeerServiceImpl final : public v1::ClusterPeer::Service {
 public:
  // `local` and `metrics` are not owned and must outlive the service.
  PeerServiceImpl(store::TieredStore* local, rpc::RpcMetrics* metrics,
                  const PeerServiceOptions& options);

  grpc::Status StoreSpans(grpc::ServerContext* context,
                          grpc::ServerReader<v1::StoreSpansRequest>* reader,
                          v1::StoreSpansResponse* response) override;
  grpc::Status FetchSpans(grpc::ServerContext* context, const v1::FetchSpansRequest* request,
                          grpc::ServerWriter<v1::FetchSpansResponse>* writer) override;
  grpc::Status ProbeSpans(grpc::ServerContext* context, const v1::ProbeSpansRequest* request,
                          v1::ProbeSpansResponse* response) override;
  grpc::Status SpanOp(grpc::ServerContext* context, const v1::SpanOpRequest* request,
                      v1::SpanOpResponse* response) override;
  grpc::Status CatalogWrite(grpc::ServerContext* context, const v1::CatalogWriteRequest* request,
                            v1::CatalogWriteResponse* response) override;
  grpc::Status CatalogRead(grpc::ServerContext* context, const v1::CatalogReadRequest* request,
                           v1::CatalogReadResponse* response) override;

 private:
  absl::Status CheckPeer(const grpc::ServerContext& context) const;
  absl::Status DoStoreSpans(grpc::ServerReader<v1::StoreSpansRequest>* reader,
                            v1::StoreSpansResponse* response);
  absl::Status DoFetchSpans(const v1::FetchSpansRequest& request,
                            grpc::ServerWriter<v1::FetchSpansResponse>* writer);
  absl::Status DoProbeSpans(const v1::ProbeSpansRequest& request, v1::ProbeSpansResponse* response);
  absl::Status DoSpanOp(const v1::SpanOpRequest& request, v1::SpanOpResponse* response);

  store::TieredStore* const local_;
  const PeerServiceOptions options_;
  rpc::RpcMethodMetrics* const store_metrics_;
  rpc::RpcMethodMetrics* const fetch_metrics_;
  rpc::RpcMethodMetrics* const probe_metrics_;
  rpc::RpcMethodMetrics* const span_op_metrics_;
  rpc::RpcMethodMetrics* const catalog_write_metrics_;
  rpc::RpcMethodMetrics* const catalog_read_metrics_;
};

}  // namespace kvrecall::cluster
