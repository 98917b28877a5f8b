#pragma once

// RetrievalRpcService: the kvrecall.v1.Retrieval service over the in-process
// RetrievalService (service/retrieval). Authenticates the caller's tenant,
// converts tensors and validates shapes, and delegates; nothing else.
//
// Uses gRPC's synchronous API: calls run on server threads and may block
// (promotion of spans from disk, waits on operations).

#include <array>
#include <memory>

#include "absl/status/statusor.h"
#include "kvrecall/v1/retrieval.grpc.pb.h"
#include "service/retrieval/retrieval_service.h"
#include "service/rpc/rpc_metrics.h"
#include "service/rpc/server.h"
#include "service/rpc/tenant_auth.h"

namespace kvrecall::rpc {

struct RetrievalRpcOptions {
  // Largest artifact PutArtifact accepts, bytes. Default 1 GiB.
  int64_t max_artifact_bytes = int64_t{1} << 30;
  // Chunk size of GetArtifact, bytes. Default 1 MiB.
  int64_t artifact_chunk_bytes = int64_t{1} << 20;
  // Where PutArtifact's buffered bytes are counted; may be null. Not owned.
  InflightLimiter* limiter = nullptr;
};

// Thread-safe.
class RetrievalRpcService final : public v1::Retrieval::Service {
 public:
  // `auth` and `metrics` are not owned and must outlive the service.
  RetrievalRpcService(std::unique_ptr<retrieval::RetrievalService> retrieval,
                      const TenantAuthenticator* auth, RpcMetrics* metrics,
                      const RetrievalRpcOptions& options);

  retrieval::RetrievalService* retrieval() const { return retrieval_.get(); }

  grpc::Status OpenContext(grpc::ServerContext* context, const v1::OpenContextRequest* request,
                           v1::OpenContextResponse* response) override;
  grpc::Status CloseContext(grpc::ServerContext* context, const v1::CloseContextRequest* request,
                            v1::CloseContextResponse* response) override;
  grpc::Status AppendTokens(grpc::ServerContext* context, const v1::AppendTokensRequest* request,
                            v1::AppendTokensResponse* response) override;
  grpc::Status AddQueries(grpc::ServerContext* context,
                          grpc::ServerReader<v1::AddQueriesRequest>* reader,
                          v1::AddQueriesResponse* response) override;
  grpc::Status BuildIndex(grpc::ServerContext* context, const v1::BuildIndexRequest* request,
                          v1::Operation* response) override;
  grpc::Status GetOperation(grpc::ServerContext* context, const v1::GetOperationRequest* request,
                            v1::Operation* response) override;
  grpc::Status WaitOperation(grpc::ServerContext* context, const v1::WaitOperationRequest* request,
                             v1::Operation* response) override;
  grpc::Status CancelOperation(grpc::ServerContext* context,
                               const v1::CancelOperationRequest* request,
                               v1::Operation* response) override;
  grpc::Status ListIndexes(grpc::ServerContext* context, const v1::ListIndexesRequest* request,
                           v1::ListIndexesResponse* response) override;
  grpc::Status DeleteIndex(grpc::ServerContext* context, const v1::DeleteIndexRequest* request,
                           v1::DeleteIndexResponse* response) override;
  grpc::Status Search(grpc::ServerContext* context, const v1::SearchRequest* request,
                      v1::SearchResponse* response) override;
  grpc::Status Attend(grpc::ServerContext* context, const v1::AttendRequest* request,
                      v1::AttendResponse* response) override;
  grpc::Status BatchAttend(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<v1::AttendResponse, v1::AttendRequest>* stream) override;
  grpc::Status GatherKv(grpc::ServerContext* context, const v1::GatherKvRequest* request,
                        grpc::ServerWriter<v1::GatherKvResponse>* writer) override;
  grpc::Status PutArtifact(grpc::ServerContext* context,
                           grpc::ServerReader<v1::PutArtifactRequest>* reader,
                           v1::ArtifactInfo* response) override;
  grpc::Status GetArtifact(grpc::ServerContext* context, const v1::GetArtifactRequest* request,
                           grpc::ServerWriter<v1::GetArtifactResponse>* writer) override;
  grpc::Status ListArtifacts(grpc::ServerContext* context,
                             const v1::ListArtifactsRequest* request,
                             v1::ListArtifactsResponse* response) override;

 private:
  absl::Status DoAttend(const std::string& tenant, absl::Time deadline,
                        const v1::AttendRequest& request, v1::AttendResponse* response);

  // The methods, for their metrics (registered once, at construction).
  enum Method {
    kOpenContext, kCloseContext, kAppendTokens, kAddQueries, kBuildIndex, kGetOperation,
    kWaitOperation, kCancelOperation, kListIndexes, kDeleteIndex, kSearch, kAttend,
    kBatchAttend, kBatchAttendRequest, kPutArtifact, kGetArtifact, kListArtifacts, kGatherKv,
    kNumMethods
  };

  std::unique_ptr<retrieval::RetrievalService> retrieval_;
  const TenantAuthenticator* const auth_;
  const RetrievalRpcOptions options_;
  std::array<RpcMethodMetrics*, kNumMethods> method_metrics_{};
};

// A Server additional-service factory building the Retrieval service over
// the server's store.
ServiceFactory RetrievalServiceFactory(const retrieval::RetrievalOptions& retrieval_options,
                                       const RetrievalRpcOptions& rpc_options);

}  // namespace kvrecall::rpc
