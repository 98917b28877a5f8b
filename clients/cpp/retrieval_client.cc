#include "clients/cpp/retrieval_client.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"

namespace kvrecall::client {
namespace {

void SetF32Tensor(absl::Span<const float> values, std::vector<int64_t> shape, v1::Tensor* t) {
  t->set_dtype(v1::DTYPE_F32);
  for (int64_t s : shape) t->add_shape(s);
  t->set_data(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
}

template <typename Req>
void FillRetrieve(const Hash128& context, int32_t layer, absl::Span<const float> queries,
                  int32_t num_q_heads, const RetrieveOptions& o, Req* r) {
  r->set_context(context.ToBytes());
  r->set_layer(layer);
  const int64_t d = num_q_heads > 0 ? static_cast<int64_t>(queries.size()) / num_q_heads : 0;
  SetF32Tensor(queries, {num_q_heads, d}, r->mutable_queries());
  r->set_k(o.k);
  r->set_budget(o.budget);
  r->mutable_index()->set_kind(o.kind);
  r->mutable_index()->set_build_params(o.build_params);
  r->mutable_index()->set_effort(o.effort);
  r->mutable_index()->set_knobs(o.knobs);
  for (const auto& [b, e] : o.exclude) {
    v1::PositionRange* pr = r->add_exclude();
    pr->set_begin(b);
    pr->set_end(e);
  }
  r->set_gqa_mode(o.union_per_group ? v1::GQA_MODE_UNION : v1::GQA_MODE_PER_HEAD);
}

}  // namespace

v1::AttendRequest MakeAttendRequest(const Hash128& context, int32_t layer,
                                    absl::Span<const float> queries, int32_t num_q_heads,
                                    const RetrieveOptions& options) {
  v1::AttendRequest r;
  FillRetrieve(context, layer, queries, num_q_heads, options, &r);
  r.set_omit_positions(options.omit_positions);
  if (!options.positions.empty()) {  // attend by positions: no index selector
    r.clear_index();
    for (const auto& list : options.positions) {
      r.add_positions()->mutable_positions()->Add(list.begin(), list.end());
    }
  }
  r.set_select_k(options.select_k);
  return r;
}

absl::StatusOr<AttendResult> ToAttendResult(const v1::AttendResponse& response) {
  if (response.error_code() != 0) {
    return absl::Status(static_cast<absl::StatusCode>(response.error_code()),
                        response.error_message());
  }
  AttendResult out;
  const v1::Tensor& t = response.out();
  if (t.dtype() != v1::DTYPE_F32 || t.data().size() % sizeof(float) != 0) {
    return absl::InternalError("the server sent a malformed attention output");
  }
  out.out.resize(t.data().size() / sizeof(float));
  std::memcpy(out.out.data(), t.data().data(), t.data().size());
  out.lse.assign(response.lse_natural().begin(), response.lse_natural().end());
  for (const auto& h : response.heads()) {
    out.positions.emplace_back(h.positions().begin(), h.positions().end());
  }
  out.stats = response.stats();
  return out;
}

AttendStream::~AttendStream() {
  if (!finished_ && context_ != nullptr) context_->TryCancel();
}

bool AttendStream::Send(const v1::AttendRequest& request) { return stream_->Write(request); }

absl::StatusOr<v1::AttendResponse> AttendStream::Receive() {
  v1::AttendResponse response;
  if (!stream_->Read(&response)) {
    absl::Status s = Finish();
    return s.ok() ? absl::OutOfRangeError("the stream ended") : s;
  }
  return response;
}

absl::Status AttendStream::Finish() {
  if (finished_) return absl::OkStatus();
  finished_ = true;
  stream_->WritesDone();
  return FromGrpcStatus(stream_->Finish());
}

absl::StatusOr<std::unique_ptr<RetrievalClient>> RetrievalClient::Create(
    const ClientOptions& options) {
  KVR_RETURN_IF_ERROR(RpcPolicy::Validate(options));
  return std::unique_ptr<RetrievalClient>(new RetrievalClient(options));
}

RetrievalClient::RetrievalClient(const ClientOptions& options)
    : policy_(options),
      max_message_bytes_(options.max_message_bytes),
      stub_(v1::Retrieval::NewStub(policy_.channel())) {}

// Runs one unary call with the policy's deadline and retries.
#define KVR_UNARY(method, request, response)                                    \
  KVR_RETURN_IF_ERROR(policy_.Retry(policy_.CallDeadline(),                     \
                                    [&](grpc::ClientContext* ctx) {             \
                                      (response).Clear();                       \
                                      return FromGrpcStatus(                    \
                                          stub_->method(ctx, request, &(response))); \
                                    }))

absl::StatusOr<v1::OpenContextResponse> RetrievalClient::OpenContext(
    absl::string_view model_id, absl::Span<const Hash128> chain) {
  v1::OpenContextRequest request;
  request.set_model_id(std::string(model_id));
  for (const Hash128& h : chain) request.add_chain(h.ToBytes());
  v1::OpenContextResponse response;
  KVR_UNARY(OpenContext, request, response);
  return response;
}

absl::Status RetrievalClient::CloseContext(const Hash128& context) {
  v1::CloseContextRequest request;
  request.set_context(context.ToBytes());
  v1::CloseContextResponse response;
  KVR_UNARY(CloseContext, request, response);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> RetrievalClient::AppendTokens(const v1::AppendTokensRequest& request) {
  v1::AppendTokensResponse response;
  KVR_UNARY(AppendTokens, request, response);
  return response.first_position();
}

absl::StatusOr<int64_t> RetrievalClient::AddQueries(const Hash128& context, int32_t layer,
                                                    int64_t first_position, int32_t num_q_heads,
                                                    int32_t head_dim,
                                                    absl::Span<const float> queries) {
  const int64_t row = static_cast<int64_t>(num_q_heads) * head_dim;
  if (row <= 0 || queries.size() % row != 0) {
    return absl::InvalidArgumentError(absl::StrCat("queries must be [n, ", num_q_heads, ", ",
                                                   head_dim, "] f32"));
  }
  const int64_t n = static_cast<int64_t>(queries.size()) / row;
  // Rows per message: stay 64 KiB under the message limit.
  const int64_t per_message = std::max<int64_t>(
      1, (policy_.options().max_message_bytes - (int64_t{64} << 10)) / (row * 4));
  v1::AddQueriesResponse response;
  KVR_RETURN_IF_ERROR(policy_.Retry(policy_.CallDeadline(), [&](grpc::ClientContext* ctx) {
    response.Clear();
    auto writer = stub_->AddQueries(ctx, &response);
    for (int64_t begin = 0; begin < n; begin += per_message) {
      const int64_t count = std::min(per_message, n - begin);
      v1::AddQueriesRequest msg;
      msg.set_context(context.ToBytes());
      msg.set_layer(layer);
      msg.set_first_position(first_position + begin);
      SetF32Tensor(queries.subspan(begin * row, count * row), {count, num_q_heads, head_dim},
                   msg.mutable_queries());
      if (!writer->Write(msg)) break;
    }
    writer->WritesDone();
    return FromGrpcStatus(writer->Finish());
  }));
  return response.queries_stored();
}

absl::StatusOr<v1::Operation> RetrievalClient::BuildIndex(const Hash128& context,
                                                          absl::string_view kind,
                                                          absl::string_view params,
                                                          absl::Span<const int32_t> layers,
                                                          absl::Span<const int32_t> kv_heads) {
  v1::BuildIndexRequest request;
  request.set_context(context.ToBytes());
  request.set_kind(std::string(kind));
  request.set_params(std::string(params));
  for (int32_t l : layers) request.add_layers(l);
  for (int32_t h : kv_heads) request.add_kv_heads(h);
  v1::Operation response;
  KVR_UNARY(BuildIndex, request, response);
  return response;
}

absl::StatusOr<v1::Operation> RetrievalClient::GetOperation(absl::string_view id) {
  v1::GetOperationRequest request;
  request.set_id(std::string(id));
  v1::Operation response;
  KVR_UNARY(GetOperation, request, response);
  return response;
}

absl::StatusOr<v1::Operation> RetrievalClient::WaitOperation(absl::string_view id,
                                                             absl::Duration timeout,
                                                             const ProgressCallback& progress) {
  const absl::Time until = absl::Now() + timeout;
  v1::Operation op;
  while (true) {
    v1::WaitOperationRequest request;
    request.set_id(std::string(id));
    request.set_timeout_ms(
        std::max<int64_t>(1, std::min<int64_t>(1000, absl::ToInt64Milliseconds(until - absl::Now()))));
    KVR_RETURN_IF_ERROR(policy_.Retry(policy_.CallDeadline(), [&](grpc::ClientContext* ctx) {
      op.Clear();
      return FromGrpcStatus(stub_->WaitOperation(ctx, request, &op));
    }));
    const bool ended = op.state() == v1::OPERATION_STATE_DONE ||
                       op.state() == v1::OPERATION_STATE_FAILED ||
                       op.state() == v1::OPERATION_STATE_CANCELLED;
    if (progress) {
      Progress p;
      p.stage = op.stage();
      p.done = op.keys_indexed();
      p.total = op.keys_total();
      p.fraction = op.fraction();
      if (!progress(p) && !ended) {
        KVR_ASSIGN_OR_RETURN(op, CancelOperation(id));
      }
    }
    if (ended || absl::Now() >= until) return op;
  }
}

absl::StatusOr<v1::Operation> RetrievalClient::CancelOperation(absl::string_view id) {
  v1::CancelOperationRequest request;
  request.set_id(std::string(id));
  v1::Operation response;
  KVR_UNARY(CancelOperation, request, response);
  return response;
}

absl::StatusOr<std::vector<v1::IndexInfo>> RetrievalClient::ListIndexes(const Hash128& context) {
  v1::ListIndexesRequest request;
  if (!context.IsZero()) request.set_context(context.ToBytes());
  v1::ListIndexesResponse response;
  KVR_UNARY(ListIndexes, request, response);
  return std::vector<v1::IndexInfo>(response.indexes().begin(), response.indexes().end());
}

absl::Status RetrievalClient::DeleteIndex(const Hash128& context, absl::string_view kind,
                                          absl::string_view params) {
  v1::DeleteIndexRequest request;
  request.set_context(context.ToBytes());
  request.set_kind(std::string(kind));
  request.set_params(std::string(params));
  v1::DeleteIndexResponse response;
  KVR_UNARY(DeleteIndex, request, response);
  return absl::OkStatus();
}

absl::StatusOr<v1::SearchResponse> RetrievalClient::Search(const Hash128& context, int32_t layer,
                                                           absl::Span<const float> queries,
                                                           int32_t num_q_heads,
                                                           const RetrieveOptions& options) {
  v1::SearchRequest request;
  FillRetrieve(context, layer, queries, num_q_heads, options, &request);
  v1::SearchResponse response;
  KVR_UNARY(Search, request, response);
  return response;
}

absl::StatusOr<AttendResult> RetrievalClient::Attend(const Hash128& context, int32_t layer,
                                                     absl::Span<const float> queries,
                                                     int32_t num_q_heads,
                                                     const RetrieveOptions& options) {
  const v1::AttendRequest request =
      MakeAttendRequest(context, layer, queries, num_q_heads, options);
  v1::AttendResponse response;
  KVR_UNARY(Attend, request, response);
  return ToAttendResult(response);
}

absl::StatusOr<std::unique_ptr<AttendStream>> RetrievalClient::OpenAttendStream(
    absl::Duration lifetime) {
  std::unique_ptr<AttendStream> s(new AttendStream());
  s->context_ = policy_.NewContext(absl::Now() + lifetime);
  s->stream_ = stub_->BatchAttend(s->context_.get());
  if (s->stream_ == nullptr) return absl::UnavailableError("could not open a BatchAttend stream");
  return s;
}

absl::StatusOr<v1::ArtifactInfo> RetrievalClient::PutArtifact(absl::string_view model_id,
                                                              absl::string_view kind,
                                                              absl::string_view bytes,
                                                              absl::string_view description) {
  const size_t chunk = static_cast<size_t>(policy_.options().chunk_bytes);
  v1::ArtifactInfo response;
  KVR_RETURN_IF_ERROR(policy_.Retry(policy_.CallDeadline(), [&](grpc::ClientContext* ctx) {
    response.Clear();
    auto writer = stub_->PutArtifact(ctx, &response);
    size_t offset = 0;
    bool first = true;
    while (first || offset < bytes.size()) {
      v1::PutArtifactRequest msg;
      if (first) {
        msg.set_model_id(std::string(model_id));
        msg.set_kind(std::string(kind));
        msg.set_description(std::string(description));
        first = false;
      }
      const size_t n = std::min(chunk, bytes.size() - offset);
      msg.set_chunk(std::string(bytes.substr(offset, n)));
      offset += n;
      if (!writer->Write(msg)) break;
    }
    writer->WritesDone();
    return FromGrpcStatus(writer->Finish());
  }));
  return response;
}

absl::StatusOr<std::pair<v1::ArtifactInfo, std::string>> RetrievalClient::GetArtifact(
    absl::string_view model_id, absl::string_view kind, int64_t version) {
  v1::GetArtifactRequest request;
  request.set_model_id(std::string(model_id));
  request.set_kind(std::string(kind));
  request.set_version(version);
  std::pair<v1::ArtifactInfo, std::string> out;
  KVR_RETURN_IF_ERROR(policy_.Retry(policy_.CallDeadline(), [&](grpc::ClientContext* ctx) {
    out = {};
    auto reader = stub_->GetArtifact(ctx, request);
    v1::GetArtifactResponse msg;
    while (reader->Read(&msg)) {
      if (msg.has_info()) out.first = msg.info();
      out.second += msg.chunk();
    }
    return FromGrpcStatus(reader->Finish());
  }));
  if (static_cast<int64_t>(out.second.size()) != out.first.bytes()) {
    return absl::DataLossError(absl::StrCat("artifact arrived with ", out.second.size(),
                                            " bytes, its info says ", out.first.bytes()));
  }
  return out;
}

absl::StatusOr<std::vector<v1::ArtifactInfo>> RetrievalClient::ListArtifacts(
    absl::string_view model_id) {
  v1::ListArtifactsRequest request;
  request.set_model_id(std::string(model_id));
  v1::ListArtifactsResponse response;
  KVR_UNARY(ListArtifacts, request, response);
  return std::vector<v1::ArtifactInfo>(response.artifacts().begin(), response.artifacts().end());
}

absl::Status RetrievalClient::GatherKv(
    const Hash128& context, int32_t layer_begin, int32_t layer_end,
    const std::vector<std::vector<int64_t>>& kv_head_positions,
    const std::function<absl::Status(const v1::GatherKvResponse&)>& on_rows) {
  v1::GatherKvRequest request;
  request.set_context(context.ToBytes());
  request.mutable_layers()->set_begin(layer_begin);
  request.mutable_layers()->set_end(layer_end);
  for (const auto& list : kv_head_positions) {
    request.add_kv_heads()->mutable_positions()->Add(list.begin(), list.end());
  }
  // Messages well under the receive limit (a row is never split).
  request.set_max_message_bytes(std::max<int64_t>(64 << 10, max_message_bytes_ / 2));
  // No retries once rows were delivered: the callback has consumed them.
  bool delivered = false;
  return policy_.Retry(policy_.CallDeadline(), [&](grpc::ClientContext* ctx) -> absl::Status {
    if (delivered) return absl::AbortedError("GatherKv broke off after delivering rows");
    auto reader = stub_->GatherKv(ctx, request);
    v1::GatherKvResponse msg;
    while (reader->Read(&msg)) {
      delivered = true;
      absl::Status s = on_rows(msg);
      if (!s.ok()) {
        ctx->TryCancel();
        reader->Finish().ok();  // the callback's status is what matters
        return s;
      }
    }
    return FromGrpcStatus(reader->Finish());
  });
}

#undef KVR_UNARY

}  // namespace kvrecall::client
