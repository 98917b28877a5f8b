#include "service/rpc/kv_store_service.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/checksum.h"
#include "common/span_hash.h"
#include "common/status_macros.h"
#include "service/rpc/grpc_status.h"
#include "service/rpc/proto_convert.h"
#include "service/rpc/put_stream.h"
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/proto_buffer_reader.h>

namespace kvrecall::rpc {
namespace {

constexpr int64_t kMaxTtlMs = int64_t{30} * 24 * 3600 * 1000;  // 30 days
constexpr int64_t kMessageHeadroomBytes = int64_t{64} << 10;

// Parses every hash of a repeated bytes field; INVALID_ARGUMENT naming the
// first bad one. Nothing is done with any of them on failure.
absl::StatusOr<std::vector<Hash128>> ParseHashes(
    const google::protobuf::RepeatedPtrField<std::string>& hashes, absl::string_view field) {
  std::vector<Hash128> out;
  out.reserve(hashes.size());
  for (int i = 0; i < hashes.size(); ++i) {
    KVR_ASSIGN_OR_RETURN(Hash128 h, HashFromProto(hashes[i], absl::StrCat(field, "[", i, "]")));
    out.push_back(h);
  }
  return out;
}

}  // namespace

KvStoreServiceImpl::KvStoreServiceImpl(store::TieredStore* store, const TenantAuthenticator* auth,
                                       RpcMetrics* metrics, const KvStoreServiceOptions& options)
    : store_(store),
      auth_(auth),
      options_(options),
      register_model_metrics_(metrics->Register("kvrecall.v1.KvStore/RegisterModel")),
      list_models_metrics_(metrics->Register("kvrecall.v1.KvStore/ListModels")),
      put_spans_metrics_(metrics->Register("kvrecall.v1.KvStore/PutSpans")),
      get_spans_metrics_(metrics->Register("kvrecall.v1.KvStore/GetSpans")),
      lookup_metrics_(metrics->Register("kvrecall.v1.KvStore/Lookup")),
      delete_spans_metrics_(metrics->Register("kvrecall.v1.KvStore/DeleteSpans")),
      pin_spans_metrics_(metrics->Register("kvrecall.v1.KvStore/PinSpans")),
      unpin_spans_metrics_(metrics->Register("kvrecall.v1.KvStore/UnpinSpans")),
      store_workers_(std::make_unique<ThreadPool>(std::max(1, options.store_threads))) {}

// --- RegisterModel / ListModels ---

grpc::Status KvStoreServiceImpl::RegisterModel(grpc::ServerContext* context,
                                               const v1::RegisterModelRequest* request,
                                               v1::RegisterModelResponse* response) {
  RpcScope scope(register_model_metrics_);
  if (!scope.admitted()) return scope.Finish(RpcScope::Rejected());
  absl::StatusOr<std::string> tenant = auth_->Authenticate(*context);
  if (!tenant.ok()) return scope.Finish(ToGrpcStatus(tenant.status()));
  return scope.Finish(ToGrpcStatus(DoRegisterModel(*request, response)));
}

absl::Status KvStoreServiceImpl::DoRegisterModel(const v1::RegisterModelRequest& request,
                                                 v1::RegisterModelResponse* response) {
  if (!request.has_model()) return absl::InvalidArgumentError("model: required");
  KVR_ASSIGN_OR_RETURN(store::ModelGeometry geometry, GeometryFromProto(request.model()));
  absl::StatusOr<store::ModelGeometry> existing = store_->GetModel(geometry.model_id);
  if (existing.ok()) {
    if (!SameGeometry(*existing, geometry)) {
      return absl::AlreadyExistsError(absl::StrCat(
          "model ", geometry.model_id,
          " is registered with a different geometry; register the new one under another id"));
    }
    response->set_already_registered(true);
  } else if (existing.status().code() != absl::StatusCode::kNotFound) {
    return existing.status();
  } else {
    KVR_RETURN_IF_ERROR(store_->RegisterModel(geometry));
  }
  *response->mutable_model() = GeometryToProto(geometry);
  return absl::OkStatus();
}

grpc::Status KvStoreServiceImpl::ListModels(grpc::ServerContext* context,
                                            const v1::ListModelsRequest* request,
                                            v1::ListModelsResponse* response) {
  RpcScope scope(list_models_metrics_);
  if (!scope.admitted()) return scope.Finish(RpcScope::Rejected());
  absl::StatusOr<std::string> tenant = auth_->Authenticate(*context);
  if (!tenant.ok()) return scope.Finish(ToGrpcStatus(tenant.status()));
  std::vector<store::ModelGeometry> models = store_->ListModels();
  std::sort(models.begin(), models.end(),
            [](const auto& a, const auto& b) { return a.model_id < b.model_id; });
  for (const auto& m : models) *response->add_models() = GeometryToProto(m);
  return scope.Finish(grpc::Status::OK);
}

// --- PutSpans ---

// Receives one PutSpans stream. Reactions parse and assemble (PutStream);
// every completed span is stored on a store thread, which then asks for the
// next message. One read or one store call is outstanding at a time, and each
// hands over to the next through gRPC or the pool, so the members need no
// lock. Thread-compatible.
class PutSpansReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  PutSpansReactor(KvStoreServiceImpl* service, grpc::CallbackServerContext* context,
                  grpc::ByteBuffer* response)
      : service_(service), response_(response), scope_(service->put_spans_metrics_) {
    if (!scope_.admitted()) {
      Finish(scope_.Finish(RpcScope::Rejected()));
      return;
    }
    absl::StatusOr<std::string> tenant = service->auth_->Authenticate(*context);
    if (!tenant.ok()) {
      Finish(scope_.Finish(ToGrpcStatus(tenant.status())));
      return;
    }
    InflightLimiter* limiter = service->options_.limiter;
    if (limiter != nullptr) {
      const absl::Status admitted = limiter->EnterStream();
      if (!admitted.ok()) {
        Finish(scope_.Finish(ToGrpcStatus(admitted)));
        return;
      }
      entered_ = true;
    }
    stream_.emplace(service->store_, *std::move(tenant), service->options_.max_span_bytes,
                    service->options_.require_token_ids, limiter);
    StartRead(&message_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed, or the call was cancelled
      FinishWith(cancelled_.load(std::memory_order_relaxed) ? stream_->Cancelled()
                                                            : stream_->End());
      return;
    }
    bool complete = false;
    absl::Status status = stream_->Consume(message_, &complete);
    message_.Clear();
    if (!status.ok()) {
      FinishWith(status);
      return;
    }
    if (!complete) {
      StartRead(&message_);
      return;
    }
    service_->store_workers_->Schedule([this] {
      absl::Status stored = stream_->StoreComplete();
      if (!stored.ok()) {
        FinishWith(stored);
        return;
      }
      StartRead(&message_);
    });
  }

  void OnCancel() override { cancelled_.store(true, std::memory_order_relaxed); }
  void OnDone() override {
    stream_.reset();  // releases the buffered payload's in-flight bytes
    if (entered_) service_->options_.limiter->ExitStream();
    delete this;
  }

 private:
  void FinishWith(const absl::Status& status) {
    service_->put_spans_metrics_->AddPayloadBytes(stream_->response().payload_bytes());
    if (status.ok()) {
      const std::string bytes = stream_->response().SerializeAsString();
      grpc::Slice slice(bytes);
      *response_ = grpc::ByteBuffer(&slice, 1);
    }
    Finish(scope_.Finish(ToGrpcStatus(status)));
  }

  KvStoreServiceImpl* const service_;
  grpc::ByteBuffer* const response_;
  RpcScope scope_;
  std::optional<PutStream> stream_;
  grpc::ByteBuffer message_;
  std::atomic<bool> cancelled_{false};
  bool entered_ = false;  // holds a place in the limiter's streams
};

grpc::ServerReadReactor<grpc::ByteBuffer>* KvStoreServiceImpl::PutSpans(
    grpc::CallbackServerContext* context, grpc::ByteBuffer* response) {
  return new PutSpansReactor(this, context, response);
}

// --- GetSpans ---

namespace {

// Appends the key and length of field 2 (payload_chunk, length-delimited) of
// GetSpansResponse: the bytes that precede a chunk's payload on the wire.
void AppendChunkPrefix(size_t len, std::string* out) {
  out->push_back(static_cast<char>((2 << 3) | 2));
  uint64_t v = len;
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

// A slice of a stored span's payload that keeps the span alive until gRPC
// has sent it (no copy).
grpc::Slice PayloadSlice(const store::StoredSpanPtr& span, size_t offset, size_t len) {
  auto* holder = new store::StoredSpanPtr(span);
  return grpc::Slice(const_cast<char*>(span->payload.data()) + offset, len,
                     [](void* p) { delete static_cast<store::StoredSpanPtr*>(p); }, holder);
}

}  // namespace

// Streams the spans of one GetSpans call. Store reads run on the service's
// reader pool; reactions only start the next write. At most one write or one
// read is outstanding at a time, and each hands over to the next through
// gRPC or the pool, so the members need no lock. Thread-compatible.
class GetSpansReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  GetSpansReactor(KvStoreServiceImpl* service, grpc::CallbackServerContext* context,
                  const grpc::ByteBuffer* raw_request)
      : service_(service), context_(context), scope_(service->get_spans_metrics_) {
    if (!scope_.admitted()) {
      Finish(scope_.Finish(RpcScope::Rejected()));
      return;
    }
    const absl::Status status = Prepare(raw_request);
    if (!status.ok()) {
      Finish(scope_.Finish(ToGrpcStatus(status)));
      return;
    }
    if (InflightLimiter* limiter = service_->options_.limiter; limiter != nullptr) {
      const absl::Status admitted = limiter->EnterStream();
      if (!admitted.ok()) {
        Finish(scope_.Finish(ToGrpcStatus(admitted)));
        return;
      }
      entered_ = true;
    }
    service_->store_workers_->Schedule([this] { LoadNext(); });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      FinishWith(absl::CancelledError("the client went away"));
      return;
    }
    sent_bytes_ += pending_payload_.front();
    pending_payload_.pop_front();
    pending_.pop_front();
    if (!pending_.empty()) {
      WriteNext();
    } else if (next_ == hashes_.size()) {
      FinishWith(absl::OkStatus());  // nothing left to read: no hop to a reader
    } else {
      service_->store_workers_->Schedule([this] { LoadNext(); });
    }
  }

  void OnCancel() override { cancelled_.store(true, std::memory_order_relaxed); }
  void OnDone() override {
    if (entered_) service_->options_.limiter->ExitStream();
    delete this;
  }

 private:
  absl::Status Prepare(const grpc::ByteBuffer* raw_request) {
    KVR_ASSIGN_OR_RETURN(tenant_, service_->auth_->Authenticate(*context_));
    grpc::ByteBuffer copy(*raw_request);
    if (!grpc::SerializationTraits<v1::GetSpansRequest>::Deserialize(&copy, &request_).ok()) {
      return absl::InvalidArgumentError("malformed GetSpansRequest");
    }
    if (request_.model_id().empty()) return absl::InvalidArgumentError("model_id: required");
    absl::StatusOr<store::ModelGeometry> model = service_->store_->GetModel(request_.model_id());
    if (!model.ok()) {
      if (model.status().code() == absl::StatusCode::kNotFound) {
        return absl::NotFoundError(absl::StrCat("unknown model ", request_.model_id()));
      }
      return model.status();
    }
    model_ = *std::move(model);
    if (request_.hashes_size() == 0) return absl::InvalidArgumentError("hashes: at least one");
    KVR_ASSIGN_OR_RETURN(hashes_, ParseHashes(request_.hashes(), "hashes"));
    layer_begin_ = 0;
    layer_end_ = model_.num_layers;
    if (request_.has_layers() && (request_.layers().begin() != 0 || request_.layers().end() != 0)) {
      layer_begin_ = request_.layers().begin();
      layer_end_ = request_.layers().end();
      if (layer_begin_ < 0 || layer_begin_ >= layer_end_ || layer_end_ > model_.num_layers) {
        return absl::InvalidArgumentError(absl::StrCat(
            "layers: [", layer_begin_, ", ", layer_end_, ") is not a non-empty range in [0, ",
            model_.num_layers, ") of model ", model_.model_id));
      }
    }
    const KvStoreServiceOptions& o = service_->options_;
    chunk_bytes_ = request_.max_chunk_bytes() > 0 ? request_.max_chunk_bytes() : o.get_chunk_bytes;
    chunk_bytes_ = std::max<int64_t>(
        1, std::min(chunk_bytes_, o.max_message_bytes - kMessageHeadroomBytes));
    return absl::OkStatus();
  }

  // On a reader thread: reads the next span and starts writing it, or ends
  // the call. Touches no member after StartWrite()/Finish().
  void LoadNext() {
    if (cancelled_.load(std::memory_order_relaxed)) {
      FinishWith(absl::CancelledError("the call was cancelled"));
      return;
    }
    if (next_ == hashes_.size()) {
      FinishWith(absl::OkStatus());
      return;
    }
    const size_t i = next_++;
    absl::Status status = BuildMessages(i);
    if (!status.ok()) {
      FinishWith(status);
      return;
    }
    WriteNext();
  }

  // Writes pending_.front(); the call's last message goes out together with
  // the final status (one batch, no further reaction).
  void WriteNext() {
    if (pending_.size() == 1 && next_ == hashes_.size()) {
      sent_bytes_ += pending_payload_.front();
      service_->get_spans_metrics_->AddPayloadBytes(sent_bytes_);
      StartWriteAndFinish(&pending_.front(), grpc::WriteOptions(),
                          scope_.Finish(grpc::Status::OK));
      return;
    }
    StartWrite(&pending_.front());
  }

  absl::Status BuildMessages(size_t i) {
    v1::GetSpansResponse head;
    v1::GetSpanHeader* header = head.mutable_header();
    header->set_index(static_cast<int32_t>(i));
    header->set_hash(request_.hashes(static_cast<int>(i)));
    store::GetResult got = service_->store_->Get(store::SpanKey{tenant_, hashes_[i]}, model_.model_id);
    if (!got.error.ok()) return got.error;
    if (got.span == nullptr) {
      header->set_found(false);
      header->set_miss_reason(MissReasonToProto(
          got.miss == store::MissReason::kNone ? store::MissReason::kNeverStored : got.miss));
      grpc::Slice slice(head.SerializeAsString());
      pending_.emplace_back(&slice, 1);
      pending_payload_.push_back(0);
      return absl::OkStatus();
    }
    const store::StoredSpan& span = *got.span;
    const int64_t n = span.meta.num_tokens;
    const int64_t begin = model_.PayloadOffset(n, layer_begin_, 0, 0, 0);
    const int64_t end = layer_end_ == model_.num_layers
                            ? static_cast<int64_t>(span.payload.size())
                            : model_.PayloadOffset(n, layer_end_, 0, 0, 0);
    if (end > static_cast<int64_t>(span.payload.size()) || begin > end) {
      return absl::InternalError(absl::StrCat("stored span ", hashes_[i].ToHex(), " has ",
                                              span.payload.size(),
                                              " payload bytes, fewer than its geometry needs"));
    }
    const bool all_layers = layer_begin_ == 0 && layer_end_ == model_.num_layers;
    const absl::string_view slice(span.payload.data() + begin, end - begin);
    header->set_found(true);
    header->set_tier(TierToProto(got.tier));
    header->set_parent_hash(span.meta.parent.ToBytes());
    header->set_num_tokens(span.meta.num_tokens);
    header->mutable_token_ids()->Add(span.meta.token_ids.begin(), span.meta.token_ids.end());
    header->set_dtype(DTypeToProto(model_.dtype));
    for (int64_t d : {int64_t{layer_end_ - layer_begin_}, int64_t{2},
                      int64_t{model_.num_kv_heads}, n, int64_t{model_.head_dim}}) {
      header->add_shape(d);
    }
    header->set_payload_bytes(static_cast<int64_t>(slice.size()));
    header->set_payload_checksum(all_layers ? span.meta.payload_checksum : Checksum64(slice));
    header->mutable_layers()->set_begin(layer_begin_);
    header->mutable_layers()->set_end(layer_end_);

    // Message k: [header, first message only][field-2 key + length][payload slice].
    size_t offset = static_cast<size_t>(begin);
    bool first = true;
    do {
      const size_t len = std::min<size_t>(chunk_bytes_, static_cast<size_t>(end) - offset);
      std::string prefix = first ? head.SerializeAsString() : std::string();
      AppendChunkPrefix(len, &prefix);
      grpc::Slice parts[2] = {grpc::Slice(prefix), PayloadSlice(got.span, offset, len)};
      pending_.emplace_back(parts, 2);
      pending_payload_.push_back(static_cast<int64_t>(len));
      offset += len;
      first = false;
    } while (offset < static_cast<size_t>(end));
    return absl::OkStatus();
  }

  void FinishWith(const absl::Status& status) {
    service_->get_spans_metrics_->AddPayloadBytes(sent_bytes_);
    Finish(scope_.Finish(ToGrpcStatus(status)));
  }

  KvStoreServiceImpl* const service_;
  grpc::CallbackServerContext* const context_;
  RpcScope scope_;
  std::string tenant_;
  v1::GetSpansRequest request_;
  store::ModelGeometry model_;
  std::vector<Hash128> hashes_;
  int32_t layer_begin_ = 0;
  int32_t layer_end_ = 0;
  int64_t chunk_bytes_ = 0;
  size_t next_ = 0;
  std::deque<grpc::ByteBuffer> pending_;  // messages of the current span still to write
  std::deque<int64_t> pending_payload_;   // payload bytes in each of them
  int64_t sent_bytes_ = 0;
  std::atomic<bool> cancelled_{false};
  bool entered_ = false;  // holds a place in the limiter's streams
};

grpc::ServerWriteReactor<grpc::ByteBuffer>* KvStoreServiceImpl::GetSpans(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  return new GetSpansReactor(this, context, request);
}

// --- Lookup ---

grpc::Status KvStoreServiceImpl::Lookup(grpc::ServerContext* context,
                                        const v1::LookupRequest* request,
                                        v1::LookupResponse* response) {
  RpcScope scope(lookup_metrics_);
  if (!scope.admitted()) return scope.Finish(RpcScope::Rejected());
  absl::StatusOr<std::string> tenant = auth_->Authenticate(*context);
  if (!tenant.ok()) return scope.Finish(ToGrpcStatus(tenant.status()));
  return scope.Finish(ToGrpcStatus(DoLookup(*tenant, *request, response)));
}

absl::Status KvStoreServiceImpl::DoLookup(const std::string& tenant,
                                          const v1::LookupRequest& request,
                                          v1::LookupResponse* response) {
  if (request.model_id().empty()) return absl::InvalidArgumentError("model_id: required");
  absl::StatusOr<store::ModelGeometry> model = store_->GetModel(request.model_id());
  if (!model.ok()) {
    if (model.status().code() == absl::StatusCode::kNotFound) {
      return absl::NotFoundError(absl::StrCat("unknown model ", request.model_id()));
    }
    return model.status();
  }
  const bool by_tokens = request.has_tokens() && request.tokens().token_ids_size() > 0;
  if (by_tokens && request.hashes_size() > 0) {
    return absl::InvalidArgumentError("give either hashes or tokens, not both");
  }
  std::vector<Hash128> chain;
  if (by_tokens) {
    const auto& t = request.tokens();
    std::vector<uint32_t> ids(t.token_ids().begin(), t.token_ids().end());
    chain = ChainSpanHashes(model->model_id, t.salt(), ids,
                            static_cast<uint32_t>(model->block_tokens), t.include_partial_tail());
    for (const Hash128& h : chain) response->add_hashes(h.ToBytes());
  } else {
    KVR_ASSIGN_OR_RETURN(chain, ParseHashes(request.hashes(), "hashes"));
  }
  store::LookupResult result = store_->Lookup(tenant, model->model_id, chain);
  response->set_prefix_spans(result.prefix_spans);
  response->set_prefix_tokens(result.prefix_tokens);
  for (size_t i = 0; i < result.missing.size(); ++i) {
    const size_t index = static_cast<size_t>(result.prefix_spans) + i;
    if (index >= chain.size()) break;
    v1::SpanMiss* miss = response->add_missing();
    miss->set_index(static_cast<int32_t>(index));
    miss->set_hash(chain[index].ToBytes());
    miss->set_reason(MissReasonToProto(result.missing[i]));
  }
  return absl::OkStatus();
}

// --- DeleteSpans / PinSpans / UnpinSpans ---

namespace {

// Runs `op` on each hash after validating all of them; fills ItemStatus rows.
template <typename Response, typename Op>
absl::Status ForEachSpan(const google::protobuf::RepeatedPtrField<std::string>& raw,
                         Response* response, int* succeeded, Op op) {
  if (raw.empty()) return absl::InvalidArgumentError("hashes: at least one");
  KVR_ASSIGN_OR_RETURN(std::vector<Hash128> hashes, ParseHashes(raw, "hashes"));
  for (size_t i = 0; i < hashes.size(); ++i) {
    const absl::Status s = op(hashes[i]);
    v1::ItemStatus* item = response->add_results();
    item->set_index(static_cast<int32_t>(i));
    item->set_hash(raw[static_cast<int>(i)]);
    item->set_code(static_cast<int32_t>(s.code()));
    item->set_message(std::string(s.message()));
    if (s.ok()) ++*succeeded;
  }
  return absl::OkStatus();
}

}  // namespace

grpc::Status KvStoreServiceImpl::DeleteSpans(grpc::ServerContext* context,
                                             const v1::DeleteSpansRequest* request,
                                             v1::DeleteSpansResponse* response) {
  RpcScope scope(delete_spans_metrics_);
  if (!scope.admitted()) return scope.Finish(RpcScope::Rejected());
  absl::StatusOr<std::string> tenant = auth_->Authenticate(*context);
  if (!tenant.ok()) return scope.Finish(ToGrpcStatus(tenant.status()));
  int deleted = 0;
  absl::Status status = ForEachSpan(request->hashes(), response, &deleted, [&](const Hash128& h) {
    return store_->Delete(store::SpanKey{*tenant, h});
  });
  response->set_deleted(deleted);
  return scope.Finish(ToGrpcStatus(status));
}

grpc::Status KvStoreServiceImpl::PinSpans(grpc::ServerContext* context,
                                          const v1::PinSpansRequest* request,
                                          v1::PinSpansResponse* response) {
  RpcScope scope(pin_spans_metrics_);
  if (!scope.admitted()) return scope.Finish(RpcScope::Rejected());
  absl::StatusOr<std::string> tenant = auth_->Authenticate(*context);
  if (!tenant.ok()) return scope.Finish(ToGrpcStatus(tenant.status()));
  if (request->ttl_ms() < 0 || request->ttl_ms() > kMaxTtlMs) {
    return scope.Finish(ToGrpcStatus(absl::InvalidArgumentError(
        absl::StrCat("ttl_ms=", request->ttl_ms(), " must be in 0..", kMaxTtlMs,
                     " (0: until unpinned)"))));
  }
  const absl::Duration ttl = request->ttl_ms() == 0 ? absl::InfiniteDuration()
                                                    : absl::Milliseconds(request->ttl_ms());
  int pinned = 0;
  absl::Status status = ForEachSpan(request->hashes(), response, &pinned, [&](const Hash128& h) {
    return store_->Pin(store::SpanKey{*tenant, h}, ttl);
  });
  response->set_pinned(pinned);
  return scope.Finish(ToGrpcStatus(status));
}

grpc::Status KvStoreServiceImpl::UnpinSpans(grpc::ServerContext* context,
                                            const v1::UnpinSpansRequest* request,
                                            v1::UnpinSpansResponse* response) {
  RpcScope scope(unpin_spans_metrics_);
  if (!scope.admitted()) return scope.Finish(RpcScope::Rejected());
  absl::StatusOr<std::string> tenant = auth_->Authenticate(*context);
  if (!tenant.ok()) return scope.Finish(ToGrpcStatus(tenant.status()));
  int unpinned = 0;
  absl::Status status = ForEachSpan(request->hashes(), response, &unpinned, [&](const Hash128& h) {
    return store_->Unpin(store::SpanKey{*tenant, h});
  });
  response->set_unpinned(unpinned);
  return scope.Finish(ToGrpcStatus(status));
}

}  // namespace kvrecall::rpc
