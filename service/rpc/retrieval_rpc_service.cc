#include "service/rpc/retrieval_rpc_service.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "service/rpc/grpc_status.h"
#include "service/rpc/proto_convert.h"

namespace kvrecall::rpc {
namespace {

using retrieval::RetrievalService;

absl::Time CallDeadline(const grpc::ServerContext& context) {
  const auto deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

// Converts a tensor of any dtype to f32, checking its shape against `want`
// (a -1 extent matches anything) and its byte size.
absl::StatusOr<std::vector<float>> TensorToFloats(const v1::Tensor& t, absl::string_view field,
                                                  const std::vector<int64_t>& want) {
  KVR_ASSIGN_OR_RETURN(DType dtype, DTypeFromProto(t.dtype(), absl::StrCat(field, ".dtype")));
  if (t.shape_size() != static_cast<int>(want.size())) {
    return absl::InvalidArgumentError(absl::StrCat(field, " must have ", want.size(),
                                                   " dimensions, has ", t.shape_size()));
  }
  // Elements counted against what the data can hold as the extents are
  // multiplied: a product that wrapped could match the bytes sent.
  const int64_t fits = static_cast<int64_t>(t.data().size() / DTypeSize(dtype));
  int64_t n = 1;
  bool too_big = false;
  for (int i = 0; i < t.shape_size(); ++i) {
    if (t.shape(i) < 0 || (want[i] >= 0 && t.shape(i) != want[i])) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".shape[", i, "] is ", t.shape(i),
                                                     ", expected ", want[i]));
    }
    if (t.shape(i) == 0) {
      n = 0;
    } else if (!too_big && n > fits / t.shape(i)) {
      too_big = true;
    } else if (!too_big) {
      n *= t.shape(i);
    }
  }
  if (too_big && n != 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".data is ", t.data().size(),
                                                   " bytes, fewer than its shape needs"));
  }
  if (static_cast<int64_t>(t.data().size()) != n * static_cast<int64_t>(DTypeSize(dtype))) {
    return absl::InvalidArgumentError(absl::StrCat(field, ".data is ", t.data().size(),
                                                   " bytes; its shape and dtype need ",
                                                   n * static_cast<int64_t>(DTypeSize(dtype))));
  }
  std::vector<float> out(static_cast<size_t>(n));
  ConvertToFloat(t.data().data(), dtype, out.size(), out.data());
  return out;
}

absl::StatusOr<Hash128> ContextFromProto(const std::string& bytes) {
  return HashFromProto(bytes, "context");
}

v1::OperationState StateToProto(retrieval::OperationState s) {
  switch (s) {
    case retrieval::OperationState::kPending:
      return v1::OPERATION_STATE_PENDING;
    case retrieval::OperationState::kRunning:
      return v1::OPERATION_STATE_RUNNING;
    case retrieval::OperationState::kDone:
      return v1::OPERATION_STATE_DONE;
    case retrieval::OperationState::kFailed:
      return v1::OPERATION_STATE_FAILED;
    case retrieval::OperationState::kCancelled:
      return v1::OPERATION_STATE_CANCELLED;
  }
  return v1::OPERATION_STATE_UNSPECIFIED;
}

void OperationToProto(const retrieval::OperationInfo& info, v1::Operation* out) {
  out->set_id(info.id);
  out->set_state(StateToProto(info.state));
  out->set_description(info.description);
  out->set_fraction(info.fraction);
  out->set_stage(info.stage);
  out->set_keys_indexed(info.keys_indexed);
  out->set_keys_total(info.keys_total);
  out->set_elapsed_ms(absl::ToInt64Milliseconds(info.elapsed));
  out->set_eta_ms(info.eta == absl::InfiniteDuration() ? -1 : absl::ToInt64Milliseconds(info.eta));
  out->set_error_code(static_cast<int32_t>(info.error.code()));
  out->set_error_message(std::string(info.error.message()));
}

void ArtifactInfoToProto(const retrieval::ArtifactInfo& info, v1::ArtifactInfo* out) {
  out->set_model_id(info.model_id);
  out->set_kind(info.kind);
  out->set_version(info.version);
  out->set_bytes(info.bytes);
  out->set_description(info.description);
  out->set_created_unix_us(absl::ToUnixMicros(info.created));
  out->set_shared(info.shared);
}

// Fills the shared fields of Search and Attend requests.
template <typename Req>
absl::Status FillRetrieveRequest(const std::string& tenant, absl::Time deadline, const Req& r,
                                 const store::ModelGeometry& m, std::vector<float>* queries,
                                 retrieval::RetrieveRequest* out) {
  KVR_ASSIGN_OR_RETURN(out->context, ContextFromProto(r.context()));
  out->tenant = tenant;
  out->layer = r.layer();
  if (!r.has_queries()) return absl::InvalidArgumentError("queries: required");
  KVR_ASSIGN_OR_RETURN(*queries, TensorToFloats(r.queries(), "queries",
                                                {m.num_q_heads, m.head_dim}));
  out->queries = *queries;
  out->k = r.k();
  out->budget = r.budget();
  out->index.kind = r.index().kind().empty() ? "roar" : r.index().kind();
  out->index.build_params = r.index().build_params();
  out->index.effort = r.index().effort();
  out->index.knobs = r.index().knobs();
  for (const auto& e : r.exclude()) out->exclude.push_back({e.begin(), e.end()});
  out->gqa_mode = r.gqa_mode() == v1::GQA_MODE_UNION ? retrieval::GqaMode::kUnion
                                                     : retrieval::GqaMode::kPerHead;
  out->deadline = deadline;
  return absl::OkStatus();
}

void StatsToProto(const retrieval::RetrieveStats& s, int64_t server_us, v1::RetrievalStats* out) {
  out->set_keys_scanned(s.keys_scanned);
  out->set_context_tokens(s.context_tokens);
  out->set_search_us(s.search_us);
  out->set_attend_us(s.attend_us);
  out->set_server_us(server_us);
}

}  // namespace

RetrievalRpcService::RetrievalRpcService(std::unique_ptr<retrieval::RetrievalService> retrieval,
                                         const TenantAuthenticator* auth, RpcMetrics* metrics,
                                         const RetrievalRpcOptions& options)
    : retrieval_(std::move(retrieval)), auth_(auth), options_(options) {
  static constexpr const char* kNames[kNumMethods] = {
      "OpenContext", "CloseContext", "AppendTokens", "AddQueries", "BuildIndex",
      "GetOperation", "WaitOperation", "CancelOperation", "ListIndexes", "DeleteIndex",
      "Search", "Attend", "BatchAttend", "BatchAttend.request", "PutArtifact", "GetArtifact",
      "ListArtifacts", "GatherKv"};
  for (int i = 0; i < kNumMethods; ++i) {
    method_metrics_[i] = metrics->Register(absl::StrCat("kvrecall.v1.Retrieval/", kNames[i]));
  }
}

// Times the call under its method name and authenticates the caller's tenant.
#define KVR_RPC_PROLOGUE(method)                                                         \
  RpcScope scope(method_metrics_[method]);                                               \
  if (!scope.admitted()) return scope.Finish(RpcScope::Rejected());                      \
  absl::StatusOr<Principal> principal = auth_->AuthenticatePrincipal(*context);          \
  if (!principal.ok()) return scope.Finish(ToGrpcStatus(principal.status()));            \
  const std::string* const tenant = &principal->tenant

grpc::Status RetrievalRpcService::OpenContext(grpc::ServerContext* context,
                                              const v1::OpenContextRequest* request,
                                              v1::OpenContextResponse* response) {
  KVR_RPC_PROLOGUE(kOpenContext);
  auto run = [&]() -> absl::Status {
    std::vector<Hash128> chain;
    for (int i = 0; i < request->chain_size(); ++i) {
      KVR_ASSIGN_OR_RETURN(Hash128 h,
                           HashFromProto(request->chain(i), absl::StrCat("chain[", i, "]")));
      chain.push_back(h);
    }
    KVR_ASSIGN_OR_RETURN(auto reply, retrieval_->OpenContext(*tenant, request->model_id(), chain,
                                                             CallDeadline(*context)));
    response->set_context(reply.context.ToBytes());
    response->set_num_tokens(reply.num_tokens);
    response->set_num_spans(reply.num_spans);
    response->set_newly_opened(reply.newly_opened);
    return absl::OkStatus();
  };
  return scope.Finish(ToGrpcStatus(run()));
}

grpc::Status RetrievalRpcService::CloseContext(grpc::ServerContext* context,
                                               const v1::CloseContextRequest* request,
                                               v1::CloseContextResponse* response) {
  KVR_RPC_PROLOGUE(kCloseContext);
  auto run = [&]() -> absl::Status {
    KVR_ASSIGN_OR_RETURN(Hash128 id, ContextFromProto(request->context()));
    return retrieval_->CloseContext(*tenant, id);
  };
  return scope.Finish(ToGrpcStatus(run()));
}

grpc::Status RetrievalRpcService::AppendTokens(grpc::ServerContext* context,
                                               const v1::AppendTokensRequest* request,
                                               v1::AppendTokensResponse* response) {
  KVR_RPC_PROLOGUE(kAppendTokens);
  auto run = [&]() -> absl::Status {
    KVR_ASSIGN_OR_RETURN(Hash128 id, ContextFromProto(request->context()));
    KVR_ASSIGN_OR_RETURN(store::ModelGeometry m,
                         retrieval_->ContextModel(*tenant, id, CallDeadline(*context)));
    retrieval::AppendBatch batch;
    batch.layer_begin = request->layers().begin();
    batch.layer_end = request->layers().end();
    if (batch.layer_begin == 0 && batch.layer_end == 0) batch.layer_end = m.num_layers;
    const int32_t layers = batch.layer_end - batch.layer_begin;
    for (const auto* t : {&request->keys(), &request->values()}) {
      const char* name = t == &request->keys() ? "keys" : "values";
      KVR_ASSIGN_OR_RETURN(DType dtype, DTypeFromProto(t->dtype(), absl::StrCat(name, ".dtype")));
      if (dtype != m.dtype) {
        return absl::InvalidArgumentError(absl::StrCat(name, " are ", DTypeName(dtype), "; model ",
                                                       m.model_id, " stores ", DTypeName(m.dtype)));
      }
      if (t->shape_size() != 4 || t->shape(0) != layers || t->shape(1) != m.num_kv_heads ||
          t->shape(3) != m.head_dim || t->shape(2) <= 0 ||
          t->shape(2) > std::numeric_limits<int32_t>::max()) {
        return absl::InvalidArgumentError(absl::StrCat(name, " must be [", layers, ", ",
                                                       m.num_kv_heads, ", num_tokens, ",
                                                       m.head_dim, "]"));
      }
    }
    batch.num_tokens = static_cast<int32_t>(request->keys().shape(2));
    if (request->values().shape(2) != batch.num_tokens) {
      return absl::InvalidArgumentError("keys and values hold different token counts");
    }
    batch.keys = request->keys().data();
    batch.values = request->values().data();
    std::vector<float> queries;
    if (request->has_queries() && !request->queries().data().empty()) {
      KVR_ASSIGN_OR_RETURN(queries, TensorToFloats(request->queries(), "queries",
                                                   {layers, batch.num_tokens, m.num_q_heads,
                                                    m.head_dim}));
      batch.queries = queries;
    }
    if (request->has_expected_position()) {
      if (request->expected_position() < 0) {
        return absl::InvalidArgumentError("expected_position must not be negative");
      }
      batch.expected_position = request->expected_position();
    }
    Hash128 appended_to = id;
    KVR_ASSIGN_OR_RETURN(int64_t first,
                         retrieval_->AppendTokens(*tenant, id, batch, &appended_to));
    response->set_first_position(first);
    response->set_context(appended_to.ToBytes());
    return absl::OkStatus();
  };
  return scope.Finish(ToGrpcStatus(run()));
}

grpc::Status RetrievalRpcService::AddQueries(grpc::ServerContext* context,
                                             grpc::ServerReader<v1::AddQueriesRequest>* reader,
                                             v1::AddQueriesResponse* response) {
  KVR_RPC_PROLOGUE(kAddQueries);
  auto run = [&]() -> absl::Status {
    v1::AddQueriesRequest msg;
    Hash128 id;
    bool have_id = false;
    store::ModelGeometry m;
    int64_t stored = 0;
    while (reader->Read(&msg)) {
      if (!msg.context().empty()) {
        KVR_ASSIGN_OR_RETURN(Hash128 h, ContextFromProto(msg.context()));
        if (!have_id || h != id) {
          KVR_ASSIGN_OR_RETURN(m, retrieval_->ContextModel(*tenant, h, CallDeadline(*context)));
        }
        id = h;
        have_id = true;
      }
      if (!have_id) return absl::InvalidArgumentError("the first message must name the context");
      KVR_ASSIGN_OR_RETURN(std::vector<float> q,
                           TensorToFloats(msg.queries(), "queries", {-1, m.num_q_heads, m.head_dim}));
      const int64_t n = msg.queries().shape(0);
      KVR_RETURN_IF_ERROR(
          retrieval_->AddQueries(*tenant, id, msg.layer(), msg.first_position(), n, q));
      stored += n;
    }
    if (!have_id) return absl::InvalidArgumentError("empty stream: no queries");
    response->set_queries_stored(stored);
    return absl::OkStatus();
  };
  return scope.Finish(ToGrpcStatus(run()));
}

grpc::Status RetrievalRpcService::BuildIndex(grpc::ServerContext* context,
                                             const v1::BuildIndexRequest* request,
                                             v1::Operation* response) {
  KVR_RPC_PROLOGUE(kBuildIndex);
  auto run = [&]() -> absl::Status {
    retrieval::BuildIndexRequest req;
    req.tenant = *tenant;
    KVR_ASSIGN_OR_RETURN(req.context, ContextFromProto(request->context()));
    req.layers.assign(request->layers().begin(), request->layers().end());
    req.kv_heads.assign(request->kv_heads().begin(), request->kv_heads().end());
    req.kind = request->kind();
    req.params = request->params();
    KVR_ASSIGN_OR_RETURN(std::string op, retrieval_->BuildIndex(req));
    KVR_ASSIGN_OR_RETURN(retrieval::OperationInfo info, retrieval_->GetOperation(*tenant, op));
    OperationToProto(info, response);
    return absl::OkStatus();
  };
  return scope.Finish(ToGrpcStatus(run()));
}

grpc::Status RetrievalRpcService::GetOperation(grpc::ServerContext* context,
                                               const v1::GetOperationRequest* request,
                                               v1::Operation* response) {
  KVR_RPC_PROLOGUE(kGetOperation);
  auto info = retrieval_->GetOperation(*tenant, request->id());
  if (info.ok()) OperationToProto(*info, response);
  return scope.Finish(ToGrpcStatus(info.status()));
}

grpc::Status RetrievalRpcService::WaitOperation(grpc::ServerContext* context,
                                                const v1::WaitOperationRequest* request,
                                                v1::Operation* response) {
  KVR_RPC_PROLOGUE(kWaitOperation);
  absl::Time deadline = CallDeadline(*context);
  if (request->timeout_ms() > 0) {
    deadline = std::min(deadline, absl::Now() + absl::Milliseconds(request->timeout_ms()));
  }
  // Leave a little of the call's deadline to send the answer.
  if (deadline != absl::InfiniteFuture()) deadline -= absl::Milliseconds(20);
  auto info = retrieval_->WaitOperation(*tenant, request->id(), deadline);
  if (info.ok()) OperationToProto(*info, response);
  return scope.Finish(ToGrpcStatus(info.status()));
}

grpc::Status RetrievalRpcService::CancelOperation(grpc::ServerContext* context,
                                                  const v1::CancelOperationRequest* request,
                                                  v1::Operation* response) {
  KVR_RPC_PROLOGUE(kCancelOperation);
  absl::Status s = retrieval_->CancelOperation(*tenant, request->id());
  if (s.ok()) {
    auto info = retrieval_->GetOperation(*tenant, request->id());
    if (info.ok()) OperationToProto(*info, response);
    s = info.status();
  }
  return scope.Finish(ToGrpcStatus(s));
}

grpc::Status RetrievalRpcService::ListIndexes(grpc::ServerContext* context,
                                              const v1::ListIndexesRequest* request,
                                              v1::ListIndexesResponse* response) {
  KVR_RPC_PROLOGUE(kListIndexes);
  auto run = [&]() -> absl::Status {
    Hash128 id;
    if (!request->context().empty()) {
      KVR_ASSIGN_OR_RETURN(id, ContextFromProto(request->context()));
    }
    KVR_ASSIGN_OR_RETURN(auto list, retrieval_->ListIndexes(*tenant, id));
    for (const auto& info : list) {
      v1::IndexInfo* out = response->add_indexes();
      out->set_context(info.context.ToBytes());
      out->set_layer(info.layer);
      out->set_kv_head(info.kv_head);
      out->set_kind(info.kind);
      out->set_params(info.params);
      out->set_num_keys(info.num_keys);
      out->set_bytes(info.index_bytes);
      out->set_loaded(info.loaded);
    }
    return absl::OkStatus();
  };
  return scope.Finish(ToGrpcStatus(run()));
}

grpc::Status RetrievalRpcService::DeleteIndex(grpc::ServerContext* context,
                                              const v1::DeleteIndexRequest* request,
                                              v1::DeleteIndexResponse* response) {
  KVR_RPC_PROLOGUE(kDeleteIndex);
  auto run = [&]() -> absl::Status {
    KVR_ASSIGN_OR_RETURN(Hash128 id, ContextFromProto(request->context()));
    if (request->kind().empty()) return absl::InvalidArgumentError("kind: required");
    return retrieval_->DeleteIndex(*tenant, id, request->kind(), request->params());
  };
  return scope.Finish(ToGrpcStatus(run()));
}

grpc::Status RetrievalRpcService::Search(grpc::ServerContext* context,
                                         const v1::SearchRequest* request,
                                         v1::SearchResponse* response) {
  KVR_RPC_PROLOGUE(kSearch);
  const absl::Time start = absl::Now();
  auto run = [&]() -> absl::Status {
    const absl::Time deadline = CallDeadline(*context);
    KVR_ASSIGN_OR_RETURN(Hash128 id, ContextFromProto(request->context()));
    KVR_ASSIGN_OR_RETURN(store::ModelGeometry m, retrieval_->ContextModel(*tenant, id, deadline));
    std::vector<float> queries;
    retrieval::RetrieveRequest req;
    KVR_RETURN_IF_ERROR(FillRetrieveRequest(*tenant, deadline, *request, m, &queries, &req));
    KVR_ASSIGN_OR_RETURN(retrieval::SearchReply reply, retrieval_->Search(req));
    for (size_t h = 0; h < reply.ids.size(); ++h) {
      v1::HeadPositions* head = response->add_heads();
      head->mutable_positions()->Add(reply.ids[h].begin(), reply.ids[h].end());
      head->mutable_scores()->Add(reply.scores[h].begin(), reply.scores[h].end());
    }
    StatsToProto(reply.stats, absl::ToInt64Microseconds(absl::Now() - start),
                 response->mutable_stats());
    return absl::OkStatus();
  };
  return scope.Finish(ToGrpcStatus(run()));
}

absl::Status RetrievalRpcService::DoAttend(const std::string& tenant, absl::Time deadline,
                                           const v1::AttendRequest& request,
                                           v1::AttendResponse* response) {
  const absl::Time start = absl::Now();
  response->set_request_id(request.request_id());
  KVR_ASSIGN_OR_RETURN(Hash128 id, ContextFromProto(request.context()));
  KVR_ASSIGN_OR_RETURN(store::ModelGeometry m, retrieval_->ContextModel(tenant, id, deadline));
  std::vector<float> queries;
  retrieval::RetrieveRequest req;
  KVR_RETURN_IF_ERROR(FillRetrieveRequest(tenant, deadline, request, m, &queries, &req));
  if (request.positions_size() > 0) {
    if (!request.index().kind().empty() || request.index().effort() != 0 ||
        request.gqa_mode() != v1::GQA_MODE_PER_HEAD) {
      return absl::InvalidArgumentError(
          "attend by positions takes no index selector or gqa_mode");
    }
    for (const auto& list : request.positions()) {
      req.positions.emplace_back(list.positions().begin(), list.positions().end());
    }
  }
  req.select_k = request.select_k();
  KVR_ASSIGN_OR_RETURN(retrieval::AttendReply reply, retrieval_->Attend(req));
  v1::Tensor* out = response->mutable_out();
  out->set_dtype(v1::DTYPE_F32);
  out->add_shape(m.num_q_heads);
  out->add_shape(m.head_dim);
  out->set_data(reinterpret_cast<const char*>(reply.state.out.data()),
                reply.state.out.size() * sizeof(float));
  response->mutable_lse_natural()->Add(reply.state.lse.begin(), reply.state.lse.end());
  if (!request.omit_positions() && request.positions_size() == 0) {
    for (const auto& ids : reply.ids) {
      response->add_heads()->mutable_positions()->Add(ids.begin(), ids.end());
    }
  }
  StatsToProto(reply.stats, absl::ToInt64Microseconds(absl::Now() - start),
               response->mutable_stats());
  return absl::OkStatus();
}

grpc::Status RetrievalRpcService::Attend(grpc::ServerContext* context,
                                         const v1::AttendRequest* request,
                                         v1::AttendResponse* response) {
  KVR_RPC_PROLOGUE(kAttend);
  return scope.Finish(ToGrpcStatus(DoAttend(*tenant, CallDeadline(*context), *request, response)));
}

grpc::Status RetrievalRpcService::BatchAttend(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<v1::AttendResponse, v1::AttendRequest>* stream) {
  KVR_RPC_PROLOGUE(kBatchAttend);
  RpcMethodMetrics* per_request = method_metrics_[kBatchAttendRequest];
  v1::AttendRequest request;
  while (stream->Read(&request)) {
    RpcScope one(per_request);
    v1::AttendResponse response;
    const absl::Status s = DoAttend(*tenant, CallDeadline(*context), request, &response);
    if (!s.ok()) {
      response.Clear();
      response.set_request_id(request.request_id());
      response.set_error_code(static_cast<int32_t>(s.code()));
      response.set_error_message(std::string(s.message()));
    }
    (void)one.Finish(ToGrpcStatus(s));  // per-request metrics only
    if (!stream->Write(response)) {
      return scope.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
    }
  }
  return scope.Finish(grpc::Status::OK);
}

grpc::Status RetrievalRpcService::GatherKv(grpc::ServerContext* context,
                                           const v1::GatherKvRequest* request,
                                           grpc::ServerWriter<v1::GatherKvResponse>* writer) {
  KVR_RPC_PROLOGUE(kGatherKv);
  auto run = [&]() -> absl::Status {
    const absl::Time deadline = CallDeadline(*context);
    KVR_ASSIGN_OR_RETURN(Hash128 id, ContextFromProto(request->context()));
    KVR_ASSIGN_OR_RETURN(store::ModelGeometry m, retrieval_->ContextModel(*tenant, id, deadline));
    int32_t begin = request->layers().begin(), end = request->layers().end();
    if (begin == 0 && end == 0) end = m.num_layers;
    if (begin < 0 || end > m.num_layers || begin >= end) {
      return absl::InvalidArgumentError(absl::StrCat("layers [", begin, ", ", end,
                                                     ") is not a range within [0, ",
                                                     m.num_layers, ")"));
    }
    if (request->max_message_bytes() < 0) {
      return absl::InvalidArgumentError("max_message_bytes must not be negative");
    }
    std::vector<std::vector<int64_t>> lists;
    for (const auto& head : request->kv_heads()) {
      lists.emplace_back(head.positions().begin(), head.positions().end());
    }
    const int64_t row_bytes = static_cast<int64_t>(m.head_dim) * DTypeSize(m.dtype);
    const int64_t max_bytes =
        request->max_message_bytes() > 0 ? request->max_message_bytes() : int64_t{4} << 20;
    // Rows per message: keys and values of a row together, at least one row.
    const int64_t rows_per_message = std::max<int64_t>(1, max_bytes / (2 * row_bytes));
    v1::GatherKvResponse msg;
    for (int32_t layer = begin; layer < end; ++layer) {
      KVR_ASSIGN_OR_RETURN(retrieval::GatherKvReply rows,
                           retrieval_->GatherKv(*tenant, id, layer, lists, deadline));
      int64_t first = 0;
      do {
        const int64_t n = std::min(rows_per_message, rows.rows - first);
        msg.Clear();
        msg.set_layer(layer);
        msg.set_first_row(first);
        for (auto [tensor, bytes] : {std::pair{msg.mutable_keys(), &rows.keys},
                                     std::pair{msg.mutable_values(), &rows.values}}) {
          tensor->set_dtype(DTypeToProto(m.dtype));
          tensor->add_shape(n);
          tensor->add_shape(m.head_dim);
          tensor->set_data(bytes->data() + first * row_bytes, static_cast<size_t>(n * row_bytes));
        }
        if (!writer->Write(msg)) return absl::CancelledError("the client went away");
        first += n;
      } while (first < rows.rows);
    }
    return absl::OkStatus();
  };
  return scope.Finish(ToGrpcStatus(run()));
}

grpc::Status RetrievalRpcService::PutArtifact(grpc::ServerContext* context,
                                              grpc::ServerReader<v1::PutArtifactRequest>* reader,
                                              v1::ArtifactInfo* response) {
  KVR_RPC_PROLOGUE(kPutArtifact);
  auto run = [&]() -> absl::Status {
    v1::PutArtifactRequest msg;
    std::string model, kind, description, bytes;
    InflightBytes held;
    bool first = true;
    bool shared = false;
    while (reader->Read(&msg)) {
      if (first) {
        model = msg.model_id();
        kind = msg.kind();
        description = msg.description();
        shared = msg.shared();
        if (model.empty() || kind.empty()) {
          return absl::InvalidArgumentError("the first message must set model_id and kind");
        }
        if (shared && !principal->admin) {
          return absl::PermissionDeniedError(
              "only admins write artifacts to the shared namespace (the 'admin' option of the "
              "tenants file); leave shared unset to store it in your own");
        }
        first = false;
      }
      if (static_cast<int64_t>(bytes.size() + msg.chunk().size()) > options_.max_artifact_bytes) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "artifact larger than max_artifact_bytes = ", options_.max_artifact_bytes));
      }
      // The buffered artifact counts against the daemon's in-flight bytes.
      if (options_.limiter != nullptr) {
        KVR_RETURN_IF_ERROR(options_.limiter->Grow(&held, static_cast<int64_t>(msg.chunk().size())));
      }
      bytes += msg.chunk();
    }
    if (first) return absl::InvalidArgumentError("empty stream: no artifact");
    KVR_ASSIGN_OR_RETURN(int64_t version, retrieval_->PutArtifact(*tenant, shared, model, kind,
                                                                  bytes, description));
    KVR_ASSIGN_OR_RETURN(auto stored,
                         retrieval_->GetArtifact(*tenant, shared, model, kind, version));
    ArtifactInfoToProto(stored.first, response);
    return absl::OkStatus();
  };
  return scope.Finish(ToGrpcStatus(run()));
}

grpc::Status RetrievalRpcService::GetArtifact(grpc::ServerContext* context,
                                              const v1::GetArtifactRequest* request,
                                              grpc::ServerWriter<v1::GetArtifactResponse>* writer) {
  KVR_RPC_PROLOGUE(kGetArtifact);
  auto run = [&]() -> absl::Status {
    KVR_ASSIGN_OR_RETURN(auto got,
                         retrieval_->GetArtifact(*tenant, request->shared(), request->model_id(),
                                                 request->kind(), request->version()));
    v1::GetArtifactResponse msg;
    ArtifactInfoToProto(got.first, msg.mutable_info());
    const std::string& bytes = got.second;
    size_t offset = 0;
    do {
      const size_t n = std::min<size_t>(options_.artifact_chunk_bytes, bytes.size() - offset);
      msg.set_chunk(bytes.substr(offset, n));
      if (!writer->Write(msg)) return absl::CancelledError("the client went away");
      msg.clear_info();
      offset += n;
    } while (offset < bytes.size());
    return absl::OkStatus();
  };
  return scope.Finish(ToGrpcStatus(run()));
}

grpc::Status RetrievalRpcService::ListArtifacts(grpc::ServerContext* context,
                                                const v1::ListArtifactsRequest* request,
                                                v1::ListArtifactsResponse* response) {
  KVR_RPC_PROLOGUE(kListArtifacts);
  auto list = retrieval_->ListArtifacts(*tenant, request->model_id());
  if (list.ok()) {
    for (const auto& info : *list) ArtifactInfoToProto(info, response->add_artifacts());
  }
  return scope.Finish(ToGrpcStatus(list.status()));
}

#undef KVR_RPC_PROLOGUE

ServiceFactory RetrievalServiceFactory(const retrieval::RetrievalOptions& retrieval_options,
                                       const RetrievalRpcOptions& rpc_options) {
  return [retrieval_options, rpc_options](
             const ServiceContext& ctx) -> absl::StatusOr<std::unique_ptr<grpc::Service>> {
    retrieval::RetrievalOptions options = retrieval_options;
    RetrievalRpcOptions rpc = rpc_options;
    if (ctx.options != nullptr) {  // the daemon's flags (docs/config.md)
      options.concurrent_builds = ctx.options->index_build_threads;
      options.context_idle_ttl = absl::Seconds(ctx.options->context_idle_s);
      options.persist_indexes = ctx.options->persist_indexes;
      options.max_queued_builds = ctx.options->max_queued_builds;
      options.max_context_query_bytes = ctx.options->max_context_query_bytes;
      options.tenant_contexts = ctx.options->tenant_contexts;
      options.tenant_builds = ctx.options->tenant_builds;
      rpc.max_artifact_bytes = ctx.options->max_artifact_bytes;
    }
    options.metrics = ctx.metrics;
    if (rpc.limiter == nullptr) rpc.limiter = ctx.limiter;
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<retrieval::RetrievalService> service,
                         retrieval::RetrievalService::Create(ctx.store, options));
    return std::unique_ptr<grpc::Service>(std::make_unique<RetrievalRpcService>(
        std::move(service), ctx.auth, ctx.rpc_metrics, rpc));
  };
}

}  // namespace kvrecall::rpc
