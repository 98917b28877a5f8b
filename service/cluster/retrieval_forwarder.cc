#include "service/cluster/retrieval_forwarder.h"

#include <grpcpp/channel.h>
#include <chrono>
#include <set>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/types.h"
#include <grpcpp/client_context.h>

namespace kvrecall::cluster {
namespace {

bool ForwardFailed(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::UNAVAILABLE;
}

}  // namespace

RetrievalForwarder::RetrievalForwarder(std::unique_ptr<grpc::Service> inner,
                                       Membership* membership, PeerPool* peers)
    : owned_(std::move(inner)),
      inner_(dynamic_cast<v1::Retrieval::Service*>(owned_.get())),
      membership_(membership),
      peers_(peers) {}

std::optional<std::string> RetrievalForwarder::OwnerOf(const grpc::ServerContext& context,
                                                       absl::string_view context_id) const {
  if (context.client_metadata().count(kForwardedMetadata) > 0) return std::nullopt;
  absl::StatusOr<Hash128> id = Hash128::FromBytes(context_id);
  if (!id.ok()) return std::nullopt;  // the service says what is wrong with it
  const MembershipViewPtr view = membership_->view();
  const std::vector<std::string> owners = view->Owners(*id);
  if (owners.empty() || owners[0] == membership_->node_id()) return std::nullopt;
  const v1::NodeInfo* owner = view->Find(owners[0]);
  if (owner == nullptr) return std::nullopt;
  return owner->address();
}

std::unique_ptr<grpc::ClientContext> RetrievalForwarder::ForwardContext(
    const grpc::ServerContext& server) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  for (const auto& [key, value] : server.client_metadata()) {
    const std::string k(key.data(), key.size());
    if (k == "authorization" || (k.rfind("x-kvrecall-", 0) == 0 && k != kForwardedMetadata)) {
      ctx->AddMetadata(k, std::string(value.data(), value.size()));
    }
  }
  ctx->AddMetadata(kForwardedMetadata, membership_->node_id());
  const auto deadline = server.deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    ctx->set_deadline(deadline);
  } else {
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(10));
  }
  return ctx;
}

std::unique_ptr<v1::Retrieval::Stub> RetrievalForwarder::StubFor(const std::string& address) const {
  return v1::Retrieval::NewStub(peers_->ChannelFor(address));
}

template <typename Request, typename Response, typename Local, typename Remote>
grpc::Status RetrievalForwarder::Route(grpc::ServerContext* context, absl::string_view context_id,
                                       const Request* request, Response* response, Local local,
                                       Remote remote) {
  if (std::optional<std::string> owner = OwnerOf(*context, context_id); owner.has_value()) {
    auto ctx = ForwardContext(*context);
    grpc::Status s = (StubFor(*owner).get()->*remote)(ctx.get(), *request, response);
    if (!ForwardFailed(s)) return s;
    response->Clear();  // the owner is down: serve it here
  }
  return (inner_->*local)(context, request, response);
}

grpc::Status RetrievalForwarder::OpenContext(grpc::ServerContext* context,
                                             const v1::OpenContextRequest* request,
                                             v1::OpenContextResponse* response) {
  const std::string id = request->chain_size() > 0 ? request->chain(request->chain_size() - 1) : "";
  return Route(context, id, request, response, &v1::Retrieval::Service::OpenContext,
               &v1::Retrieval::Stub::OpenContext);
}

grpc::Status RetrievalForwarder::CloseContext(grpc::ServerContext* context,
                                              const v1::CloseContextRequest* request,
                                              v1::CloseContextResponse* response) {
  return Route(context, request->context(), request, response,
               &v1::Retrieval::Service::CloseContext, &v1::Retrieval::Stub::CloseContext);
}

grpc::Status RetrievalForwarder::AppendTokens(grpc::ServerContext* context,
                                              const v1::AppendTokensRequest* request,
                                              v1::AppendTokensResponse* response) {
  return Route(context, request->context(), request, response,
               &v1::Retrieval::Service::AppendTokens, &v1::Retrieval::Stub::AppendTokens);
}

grpc::Status RetrievalForwarder::BuildIndex(grpc::ServerContext* context,
                                            const v1::BuildIndexRequest* request,
                                            v1::Operation* response) {
  return Route(context, request->context(), request, response, &v1::Retrieval::Service::BuildIndex,
               &v1::Retrieval::Stub::BuildIndex);
}

grpc::Status RetrievalForwarder::DeleteIndex(grpc::ServerContext* context,
                                             const v1::DeleteIndexRequest* request,
                                             v1::DeleteIndexResponse* response) {
  return Route(context, request->context(), request, response,
               &v1::Retrieval::Service::DeleteIndex, &v1::Retrieval::Stub::DeleteIndex);
}

grpc::Status RetrievalForwarder::Search(grpc::ServerContext* context,
                                        const v1::SearchRequest* request,
                                        v1::SearchResponse* response) {
  return Route(context, request->context(), request, response, &v1::Retrieval::Service::Search,
               &v1::Retrieval::Stub::Search);
}

grpc::Status RetrievalForwarder::Attend(grpc::ServerContext* context,
                                        const v1::AttendRequest* request,
                                        v1::AttendResponse* response) {
  return Route(context, request->context(), request, response, &v1::Retrieval::Service::Attend,
               &v1::Retrieval::Stub::Attend);
}

// --- operations: where their context lives ---

template <typename Request, typename Local, typename Remote>
grpc::Status RetrievalForwarder::FindOperation(grpc::ServerContext* context,
                                               const Request* request, v1::Operation* response,
                                               Local local, Remote remote) {
  grpc::Status here = (inner_->*local)(context, request, response);
  if (here.error_code() != grpc::StatusCode::NOT_FOUND ||
      context->client_metadata().count(kForwardedMetadata) > 0) {
    return here;
  }
  const MembershipViewPtr view = membership_->view();
  for (const v1::NodeInfo& n : view->nodes) {
    if (!n.live() || n.node_id() == membership_->node_id()) continue;
    auto ctx = ForwardContext(*context);
    v1::Operation op;
    grpc::Status s = (StubFor(n.address()).get()->*remote)(ctx.get(), *request, &op);
    if (s.error_code() == grpc::StatusCode::NOT_FOUND || ForwardFailed(s)) continue;
    if (s.ok()) *response = std::move(op);
    return s;
  }
  return here;
}

grpc::Status RetrievalForwarder::GetOperation(grpc::ServerContext* context,
                                              const v1::GetOperationRequest* request,
                                              v1::Operation* response) {
  return FindOperation(context, request, response, &v1::Retrieval::Service::GetOperation,
                       &v1::Retrieval::Stub::GetOperation);
}

grpc::Status RetrievalForwarder::WaitOperation(grpc::ServerContext* context,
                                               const v1::WaitOperationRequest* request,
                                               v1::Operation* response) {
  // Waiting here on an operation that runs elsewhere would wait for nothing:
  // find where it runs first (a GetOperation), then wait there.
  if (context->client_metadata().count(kForwardedMetadata) == 0) {
    v1::GetOperationRequest get;
    get.set_id(request->id());
    v1::Operation probe;
    grpc::Status here = inner_->GetOperation(context, &get, &probe);
    if (here.error_code() == grpc::StatusCode::NOT_FOUND) {
      const MembershipViewPtr view = membership_->view();
      for (const v1::NodeInfo& n : view->nodes) {
        if (!n.live() || n.node_id() == membership_->node_id()) continue;
        auto ctx = ForwardContext(*context);
        v1::Operation op;
        grpc::Status s = StubFor(n.address())->WaitOperation(ctx.get(), *request, &op);
        if (s.error_code() == grpc::StatusCode::NOT_FOUND || ForwardFailed(s)) continue;
        if (s.ok()) *response = std::move(op);
        return s;
      }
    }
  }
  return inner_->WaitOperation(context, request, response);
}

grpc::Status RetrievalForwarder::CancelOperation(grpc::ServerContext* context,
                                                 const v1::CancelOperationRequest* request,
                                                 v1::Operation* response) {
  return FindOperation(context, request, response, &v1::Retrieval::Service::CancelOperation,
                       &v1::Retrieval::Stub::CancelOperation);
}

grpc::Status RetrievalForwarder::ListIndexes(grpc::ServerContext* context,
                                             const v1::ListIndexesRequest* request,
                                             v1::ListIndexesResponse* response) {
  if (!request->context().empty()) {
    return Route(context, request->context(), request, response,
                 &v1::Retrieval::Service::ListIndexes, &v1::Retrieval::Stub::ListIndexes);
  }
  grpc::Status here = inner_->ListIndexes(context, request, response);
  if (!here.ok() || context->client_metadata().count(kForwardedMetadata) > 0) return here;
  // Every node lists what it holds (owners and replicas); keep one row per index.
  std::set<std::tuple<std::string, int32_t, int32_t, std::string, std::string>> seen;
  auto key = [](const v1::IndexInfo& i) {
    return std::make_tuple(i.context(), i.layer(), i.kv_head(), i.kind(), i.params());
  };
  for (const v1::IndexInfo& i : response->indexes()) seen.insert(key(i));
  const MembershipViewPtr view = membership_->view();
  for (const v1::NodeInfo& n : view->nodes) {
    if (!n.live() || n.node_id() == membership_->node_id()) continue;
    auto ctx = ForwardContext(*context);
    v1::ListIndexesResponse other;
    if (!StubFor(n.address())->ListIndexes(ctx.get(), *request, &other).ok()) continue;
    for (const v1::IndexInfo& i : other.indexes()) {
      if (seen.insert(key(i)).second) *response->add_indexes() = i;
    }
  }
  return here;
}

// --- streams ---

grpc::Status RetrievalForwarder::AddQueries(grpc::ServerContext* context,
                                            grpc::ServerReader<v1::AddQueriesRequest>* reader,
                                            v1::AddQueriesResponse* response) {
  auto it = context->client_metadata().find(kContextMetadata);
  std::optional<std::string> owner;
  if (it != context->client_metadata().end()) {
    absl::StatusOr<Hash128> id =
        Hash128::FromHex(absl::string_view(it->second.data(), it->second.size()));
    if (id.ok()) owner = OwnerOf(*context, id->ToBytes());
  }
  if (!owner.has_value()) return inner_->AddQueries(context, reader, response);
  auto ctx = ForwardContext(*context);
  auto writer = StubFor(*owner)->AddQueries(ctx.get(), response);
  v1::AddQueriesRequest message;
  bool ok = true;
  while (ok && reader->Read(&message)) ok = writer->Write(message);
  if (ok) writer->WritesDone();
  return writer->Finish();
}

grpc::Status RetrievalForwarder::BatchAttend(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<v1::AttendResponse, v1::AttendRequest>* stream) {
  auto it = context->client_metadata().find(kContextMetadata);
  std::optional<std::string> owner;
  if (it != context->client_metadata().end()) {
    absl::StatusOr<Hash128> id =
        Hash128::FromHex(absl::string_view(it->second.data(), it->second.size()));
    if (id.ok()) owner = OwnerOf(*context, id->ToBytes());
  }
  if (!owner.has_value()) return inner_->BatchAttend(context, stream);
  auto ctx = ForwardContext(*context);
  auto remote = StubFor(*owner)->BatchAttend(ctx.get());
  std::thread pump([&] {
    v1::AttendRequest request;
    bool ok = true;
    while (ok && stream->Read(&request)) ok = remote->Write(request);
    if (ok) {
      remote->WritesDone();
    } else {
      ctx->TryCancel();
    }
  });
  v1::AttendResponse response;
  while (remote->Read(&response)) {
    if (!stream->Write(response)) {
      ctx->TryCancel();
      break;
    }
  }
  grpc::Status status = remote->Finish();
  pump.join();
  return status;
}

grpc::Status RetrievalForwarder::GatherKv(grpc::ServerContext* context,
                                          const v1::GatherKvRequest* request,
                                          grpc::ServerWriter<v1::GatherKvResponse>* writer) {
  std::optional<std::string> owner = OwnerOf(*context, request->context());
  if (!owner.has_value()) return inner_->GatherKv(context, request, writer);
  auto ctx = ForwardContext(*context);
  auto reader = StubFor(*owner)->GatherKv(ctx.get(), *request);
  v1::GatherKvResponse message;
  bool any = false;
  while (reader->Read(&message)) {
    any = true;
    if (!writer->Write(message)) {
      ctx->TryCancel();
      break;
    }
  }
  grpc::Status s = reader->Finish();
  if (!any && ForwardFailed(s)) return inner_->GatherKv(context, request, writer);
  return s;
}

// --- artifacts: every node holds every artifact ---

grpc::Status RetrievalForwarder::PutArtifact(grpc::ServerContext* context,
                                             grpc::ServerReader<v1::PutArtifactRequest>* reader,
                                             v1::ArtifactInfo* response) {
  return inner_->PutArtifact(context, reader, response);
}

grpc::Status RetrievalForwarder::GetArtifact(grpc::ServerContext* context,
                                             const v1::GetArtifactRequest* request,
                                             grpc::ServerWriter<v1::GetArtifactResponse>* writer) {
  return inner_->GetArtifact(context, request, writer);
}

grpc::Status RetrievalForwarder::ListArtifacts(grpc::ServerContext* context,
                                               const v1::ListArtifactsRequest* request,
                                               v1::ListArtifactsResponse* response) {
  return inner_->ListArtifacts(context, request, response);
}

}  // namespace kvrecall::cluster
