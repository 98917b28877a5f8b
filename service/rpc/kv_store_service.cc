#include "service/rpc/kv_store_service.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/checksum.h"
#include "common/span_hash.h"
#include "common/status_macros.h"
#include "service/rpc/grpc_status.h"
#include "service/rpc/proto_convert.h"
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

// A span being assembled from a PutSpans stream.
struct PendingSpan {
  int index = -1;
  store::StoredSpan span;
  std::string salt;
  int64_t received = 0;
};

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
      readers_(std::make_unique<ThreadPool>(std::max(1, options.read_threads))) {}

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

grpc::Status KvStoreServiceImpl::PutSpans(grpc::ServerContext* context,
                                          grpc::ServerReader<v1::PutSpansRequest>* reader,
                                          v1::PutSpansResponse* response) {
  RpcScope scope(put_spans_metrics_);
  if (!scope.admitted()) return scope.Finish(RpcScope::Rejected());
  absl::StatusOr<std::string> tenant = auth_->Authenticate(*context);
  if (!tenant.ok()) return scope.Finish(ToGrpcStatus(tenant.status()));
  absl::Status status = DoPutSpans(context, *tenant, reader, response);
  put_spans_metrics_->AddPayloadBytes(response->payload_bytes());
  return scope.Finish(ToGrpcStatus(status));
}

absl::Status KvStoreServiceImpl::DoPutSpans(grpc::ServerContext* context,
                                            const std::string& tenant,
                                            grpc::ServerReader<v1::PutSpansRequest>* reader,
                                            v1::PutSpansResponse* response) {
  absl::flat_hash_map<std::string, store::ModelGeometry> models;  // cache for this stream
  PendingSpan pending;
  bool in_span = false;
  int num_headers = 0;
  int64_t payload_bytes = 0;
  v1::PutSpansRequest request;

  // Errors name the span and say what of the stream is already stored.
  auto fail = [&](int index, const absl::Status& status) {
    const int stored = response->results_size();
    return absl::Status(
        status.code(),
        absl::StrCat("span ", index, " of the stream: ", status.message(),
                     stored == 0 ? std::string(" (no span of this stream is stored)")
                                 : absl::StrCat(" (spans 0..", stored - 1,
                                                " of this stream are stored)")));
  };

  while (reader->Read(&request)) {
    if (request.has_header()) {
      const int index = num_headers++;
      if (in_span) {
        return fail(pending.index,
                    absl::InvalidArgumentError(absl::StrCat(
                        "a new header arrived after ", pending.received, " of ",
                        pending.span.meta.payload_bytes, " payload bytes; nothing of it is stored")));
      }
      const v1::PutSpanHeader& h = request.header();
      if (h.model_id().empty()) {
        return fail(index, absl::InvalidArgumentError("header.model_id: required"));
      }
      auto it = models.find(h.model_id());
      if (it == models.end()) {
        absl::StatusOr<store::ModelGeometry> g = store_->GetModel(h.model_id());
        if (!g.ok()) {
          if (g.status().code() == absl::StatusCode::kNotFound) {
            return fail(index, absl::NotFoundError(absl::StrCat(
                                   "unknown model ", h.model_id(), " (RegisterModel first)")));
          }
          return fail(index, g.status());
        }
        it = models.emplace(h.model_id(), *std::move(g)).first;
      }
      const store::ModelGeometry& geometry = it->second;
      pending = PendingSpan();
      pending.index = index;
      store::StoredSpan& span = pending.span;
      span.key.tenant = tenant;
      absl::StatusOr<Hash128> hash = HashFromProto(h.hash(), "header.hash");
      if (!hash.ok()) return fail(index, hash.status());
      span.key.hash = *hash;
      absl::StatusOr<Hash128> parent = HashFromProto(h.parent_hash(), "header.parent_hash");
      if (!parent.ok()) return fail(index, parent.status());
      span.meta.parent = *parent;
      if (h.num_tokens() < 1 || h.num_tokens() > geometry.block_tokens) {
        return fail(index, absl::InvalidArgumentError(absl::StrCat(
                               "header.num_tokens=", h.num_tokens(), " must be in 1..",
                               geometry.block_tokens, " (block_tokens of ", geometry.model_id,
                               ")")));
      }
      span.meta.model_id = geometry.model_id;
      span.meta.num_tokens = h.num_tokens();
      if (h.token_ids_size() > 0) {
        if (h.token_ids_size() != h.num_tokens()) {
          return fail(index, absl::InvalidArgumentError(
                                 absl::StrCat("header.token_ids has ", h.token_ids_size(),
                                              " ids, num_tokens is ", h.num_tokens())));
        }
        span.meta.token_ids.assign(h.token_ids().begin(), h.token_ids().end());
        const Hash128 expected = SpanHash(span.meta.parent, span.meta.token_ids);
        if (expected != span.key.hash) {
          return fail(index, absl::InvalidArgumentError(absl::StrCat(
                                 "header.hash ", span.key.hash.ToHex(),
                                 " is not the span hash of its token ids under its parent (",
                                 expected.ToHex(), "); see docs/hashing.md")));
        }
      }
      const int64_t expected_bytes = geometry.SpanPayloadBytes(h.num_tokens());
      if (h.payload_bytes() != expected_bytes) {
        return fail(index,
                    absl::InvalidArgumentError(absl::StrCat(
                        "header.payload_bytes=", h.payload_bytes(), " does not match the geometry of ",
                        geometry.model_id, ": ", geometry.num_layers, " layers x 2 x ",
                        geometry.num_kv_heads, " kv heads x ", h.num_tokens(), " tokens x ",
                        geometry.head_dim, " x ", DTypeSize(geometry.dtype), " bytes = ",
                        expected_bytes)));
      }
      if (h.payload_bytes() > options_.max_span_bytes) {
        return fail(index, absl::ResourceExhaustedError(
                               absl::StrCat("span payload of ", h.payload_bytes(),
                                            " bytes exceeds --max_span_bytes=",
                                            options_.max_span_bytes)));
      }
      span.meta.payload_bytes = h.payload_bytes();
      span.meta.payload_checksum = h.payload_checksum();
      span.meta.durable = h.durable();
      pending.salt = h.salt();
      in_span = true;
    } else if (!in_span) {
      return fail(num_headers, absl::InvalidArgumentError(
                                   "a payload chunk arrived without a span header"));
    }

    std::string* chunk = request.mutable_payload_chunk();
    if (!chunk->empty()) {
      store::StoredSpan& span = pending.span;
      const int64_t size = static_cast<int64_t>(chunk->size());
      if (pending.received + size > span.meta.payload_bytes) {
        return fail(pending.index, absl::InvalidArgumentError(absl::StrCat(
                                       "payload chunks overrun the declared payload_bytes=",
                                       span.meta.payload_bytes, "; nothing of it is stored")));
      }
      if (pending.received == 0 && size == span.meta.payload_bytes) {
        span.payload.swap(*chunk);  // the whole payload in one message: no copy
      } else {
        if (pending.received == 0) span.payload.reserve(span.meta.payload_bytes);
        span.payload.append(*chunk);
      }
      pending.received += size;
      payload_bytes += size;
      response->set_payload_bytes(payload_bytes);
    }

    if (in_span && pending.received == pending.span.meta.payload_bytes) {
      in_span = false;
      const Hash128 hash = pending.span.key.hash;
      const bool durable = pending.span.meta.durable;
      store::PutOptions put_options;
      put_options.salt = pending.salt;
      absl::StatusOr<store::PutOutcome> outcome =
          store_->Put(std::move(pending.span), put_options);
      if (!outcome.ok()) return fail(pending.index, outcome.status());
      v1::PutSpanResult* result = response->add_results();
      result->set_index(pending.index);
      result->set_hash(hash.ToBytes());
      result->set_already_present(outcome->already_present);
      if (durable) result->set_durable_tier(TierToProto(outcome->durable_tier));
    }
  }

  if (context->IsCancelled()) {
    return absl::CancelledError(
        absl::StrCat("the stream was cancelled; ", response->results_size(),
                     " complete spans are stored, nothing of an unfinished one"));
  }
  if (in_span) {
    return fail(pending.index,
                absl::InvalidArgumentError(absl::StrCat(
                    "the stream ended after ", pending.received, " of ",
                    pending.span.meta.payload_bytes, " payload bytes; nothing of it is stored")));
  }
  if (num_headers == 0) {
    return absl::InvalidArgumentError("empty PutSpans stream: no span header");
  }
  return absl::OkStatus();
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
    service_->readers_->Schedule([this] { LoadNext(); });
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
      service_->readers_->Schedule([this] { LoadNext(); });
    }
  }

  void OnCancel() override { cancelled_.store(true, std::memory_order_relaxed); }
  void OnDone() override { delete this; }

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
