#pragma once

// RetrievalForwarder: kvrecall.v1.Retrieval on a cluster node
// (docs/cluster.md). A context lives on the first live owner of its id (the
// hash of its last span): its open state, appended tokens, training queries
// and loaded indexes are there. A call naming a context this node does not
// own is forwarded to the owner with the caller's metadata (the owner
// authenticates it); the owner's answer is returned as is. Everything else,
// and calls already forwarded once, go to the node's own Retrieval service.
//
//   unary calls with a context   forwarded by the context (OpenContext: the
//                                chain's last span)
//   GatherKv                     forwarded by its request's context
//   AddQueries, BatchAttend      client streams: forwarded when the call
//                                carries the metadata x-kvrecall-context
//                                (32 hex digits), as the routing clients send;
//                                without it they are served here
//   Get/Wait/CancelOperation     here, else asked of every other live node
//                                (operations run where their context is)
//   ListIndexes without context  merged from every live node
//   artifacts                    here (every node keeps every artifact)
//
// When the owner cannot be reached the call is served here (the membership
// changes within the lease TTL and the context reopens on its new owner).
//
// Thread-safe.

#include <memory>
#include <optional>
#include <string>

#include "kvrecall/v1/retrieval.grpc.pb.h"
#include "service/cluster/membership.h"
#include "service/cluster/peers.h"

namespace kvrecall::cluster {

// Metadata of forwarded calls (loop prevention) and of routed client streams.
inline constexpr char kForwardedMetadata[] = "x-kvrecall-forwarded";
inline constexpr char kContextMetadata[] = "x-kvrecall-context";

class RetrievalForwarder final : public v1::Retrieval::Service {
 public:
  // Owns `inner` (the node's own Retrieval service). `membership` and
  // `peers` must outlive it.
  RetrievalForwarder(std::unique_ptr<grpc::Service> inner, Membership* membership,
                     PeerPool* peers);

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
  // The address of the context's owner when the call must go there; nullopt
  // to serve it here.
  std::optional<std::string> OwnerOf(const grpc::ServerContext& context,
                                     absl::string_view context_id) const;
  // A client context for forwarding `server`'s call: its metadata, deadline
  // and the forwarded mark.
  std::unique_ptr<grpc::ClientContext> ForwardContext(const grpc::ServerContext& server) const;
  std::unique_ptr<v1::Retrieval::Stub> StubFor(const std::string& address) const;
  template <typename Request, typename Response, typename Local, typename Remote>
  grpc::Status Route(grpc::ServerContext* context, absl::string_view context_id,
                     const Request* request, Response* response, Local local, Remote remote);
  template <typename Request, typename Local, typename Remote>
  grpc::Status FindOperation(grpc::ServerContext* context, const Request* request,
                             v1::Operation* response, Local local, Remote remote);

  std::unique_ptr<grpc::Service> owned_;
  v1::Retrieval::Service* const inner_;
  Membership* const membership_;
  PeerPool* const peers_;
};

}  // namespace kvrecall::cluster
