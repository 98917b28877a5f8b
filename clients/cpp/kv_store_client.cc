#include "clients/cpp/kv_store_client.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/checksum.h"
#include "common/status_macros.h"
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

namespace kvrecall::client {
namespace {

std::vector<absl::Status> ItemStatuses(
    const google::protobuf::RepeatedPtrField<v1::ItemStatus>& items) {
  std::vector<absl::Status> out;
  out.reserve(items.size());
  for (const auto& item : items) {
    out.emplace_back(static_cast<absl::StatusCode>(item.code()), item.message());
  }
  return out;
}

absl::StatusOr<Hash128> HashField(const std::string& bytes) {
  if (bytes.size() != 16) {
    return absl::InternalError(absl::StrCat("the server sent a ", bytes.size(), "-byte hash"));
  }
  return Hash128::FromBytes(bytes);
}

LookupResult ToLookupResult(const v1::LookupResponse& r) {
  LookupResult out;
  out.prefix_spans = r.prefix_spans();
  out.prefix_tokens = r.prefix_tokens();
  for (const auto& m : r.missing()) {
    SpanMissInfo miss;
    miss.index = m.index();
    if (auto h = HashField(m.hash()); h.ok()) miss.hash = *h;
    miss.reason = m.reason();
    out.missing.push_back(miss);
  }
  for (const auto& h : r.hashes()) {
    if (auto parsed = HashField(h); parsed.ok()) out.hashes.push_back(*parsed);
  }
  return out;
}

}  // namespace

absl::string_view MissReasonName(v1::MissReason reason) {
  switch (reason) {
    case v1::MISS_REASON_NEVER_STORED:
      return "never_stored";
    case v1::MISS_REASON_EVICTED:
      return "evicted";
    case v1::MISS_REASON_DELETED:
      return "deleted";
    case v1::MISS_REASON_MODEL_MISMATCH:
      return "model_mismatch";
    case v1::MISS_REASON_CHECKSUM_FAILURE:
      return "checksum_failure";
    case v1::MISS_REASON_OTHER_NAMESPACE:
      return "other_namespace";
    case v1::MISS_REASON_PARENT_MISSING:
      return "parent_missing";
    case v1::MISS_REASON_OWNER_UNAVAILABLE:
      return "owner_unavailable";
    default:
      return "none";
  }
}

absl::StatusOr<std::unique_ptr<KvStoreClient>> KvStoreClient::Create(
    const ClientOptions& options) {
  KVR_RETURN_IF_ERROR(RpcPolicy::Validate(options));
  return std::unique_ptr<KvStoreClient>(new KvStoreClient(options));
}

KvStoreClient::KvStoreClient(const ClientOptions& options)
    : options_(options), policy_(options), channel_(policy_.channel()) {
  kv_ = v1::KvStore::NewStub(channel_);
  admin_ = v1::Admin::NewStub(channel_);
}

std::unique_ptr<grpc::ClientContext> KvStoreClient::NewContext(absl::Time deadline) const {
  return policy_.NewContext(deadline);
}

absl::Status KvStoreClient::Retry(
    absl::Time deadline, const std::function<absl::Status(grpc::ClientContext*)>& attempt) {
  return policy_.Retry(deadline, attempt);
}

absl::StatusOr<v1::RegisterModelResponse> KvStoreClient::RegisterModel(
    const v1::ModelGeometry& model) {
  v1::RegisterModelRequest request;
  *request.mutable_model() = model;
  v1::RegisterModelResponse response;
  KVR_RETURN_IF_ERROR(Retry(absl::Now() + absl::Milliseconds(options_.deadline_ms),
                            [&](grpc::ClientContext* ctx) {
                              response.Clear();
                              return FromGrpcStatus(kv_->RegisterModel(ctx, request, &response));
                            }));
  return response;
}

absl::StatusOr<std::vector<v1::ModelGeometry>> KvStoreClient::ListModels() {
  v1::ListModelsResponse response;
  KVR_RETURN_IF_ERROR(Retry(absl::Now() + absl::Milliseconds(options_.deadline_ms),
                            [&](grpc::ClientContext* ctx) {
                              response.Clear();
                              return FromGrpcStatus(
                                  kv_->ListModels(ctx, v1::ListModelsRequest(), &response));
                            }));
  return std::vector<v1::ModelGeometry>(response.models().begin(), response.models().end());
}

absl::StatusOr<v1::ModelGeometry> KvStoreClient::GetModel(absl::string_view model_id) {
  KVR_ASSIGN_OR_RETURN(std::vector<v1::ModelGeometry> models, ListModels());
  for (auto& m : models) {
    if (m.model_id() == model_id) return std::move(m);
  }
  return absl::NotFoundError(absl::StrCat("model ", model_id, " is not registered"));
}

absl::StatusOr<std::vector<PutResult>> KvStoreClient::PutSpans(absl::string_view model_id,
                                                               absl::Span<const SpanToPut> spans,
                                                               const PutOptions& options) {
  if (spans.empty()) return std::vector<PutResult>();
  int64_t total_bytes = 0;
  std::vector<uint64_t> checksums;
  checksums.reserve(spans.size());
  for (const SpanToPut& s : spans) {
    total_bytes += static_cast<int64_t>(s.payload.size());
    checksums.push_back(Checksum64(s.payload));
  }
  const size_t chunk = static_cast<size_t>(options_.chunk_bytes);
  v1::PutSpansResponse response;
  KVR_RETURN_IF_ERROR(Retry(
      absl::Now() + absl::Milliseconds(options_.deadline_ms), [&](grpc::ClientContext* ctx) {
        response.Clear();
        auto writer = kv_->PutSpans(ctx, &response);
        v1::PutSpansRequest message;
        int64_t sent = 0;
        bool cancelled = false;
        bool half_closed = false;
        bool ok = true;
        for (size_t i = 0; i < spans.size() && ok && !cancelled; ++i) {
          const SpanToPut& s = spans[i];
          message.Clear();
          v1::PutSpanHeader* h = message.mutable_header();
          h->set_model_id(std::string(model_id));
          h->set_hash(s.hash.ToBytes());
          h->set_parent_hash(s.parent.ToBytes());
          h->set_num_tokens(s.num_tokens);
          h->mutable_token_ids()->Add(s.token_ids.begin(), s.token_ids.end());
          h->set_payload_bytes(static_cast<int64_t>(s.payload.size()));
          h->set_payload_checksum(checksums[i]);
          h->set_durable(s.durable);
          h->set_salt(options.salt);
          size_t offset = 0;
          do {
            const size_t len = std::min(chunk, s.payload.size() - offset);
            message.set_payload_chunk(s.payload.data() + offset, len);
            offset += len;
            const bool last = i + 1 == spans.size() && offset == s.payload.size();
            // The last message half-closes the stream in the same batch.
            ok = last ? writer->Write(message, grpc::WriteOptions().set_last_message())
                      : writer->Write(message);
            if (last) half_closed = ok;
            message.clear_header();
            sent += static_cast<int64_t>(len);
            if (ok && options.progress) {
              Progress p;
              p.stage = "put";
              p.done = sent;
              p.total = total_bytes;
              p.fraction = total_bytes == 0 ? 1.0 : static_cast<double>(sent) / total_bytes;
              if (!options.progress(p)) cancelled = true;
            }
          } while (ok && !cancelled && offset < s.payload.size());
        }
        if (cancelled) {
          ctx->TryCancel();
          writer->Finish().IgnoreError();  // the cancellation is the result
          return absl::CancelledError("PutSpans cancelled by the progress callback");
        }
        if (ok && !half_closed) writer->WritesDone();
        return FromGrpcStatus(writer->Finish());
      }));
  std::vector<PutResult> results;
  results.reserve(response.results_size());
  for (const auto& r : response.results()) {
    PutResult out;
    KVR_ASSIGN_OR_RETURN(out.hash, HashField(r.hash()));
    out.already_present = r.already_present();
    out.durable_tier = r.durable_tier();
    results.push_back(out);
  }
  return results;
}

absl::Status KvStoreClient::GetSpansStreaming(
    absl::string_view model_id, absl::Span<const Hash128> hashes, LayerRange layers,
    const std::function<absl::Status(FetchedSpan&&)>& on_span, const GetOptions& options) {
  v1::GetSpansRequest request;
  request.set_model_id(std::string(model_id));
  for (const Hash128& h : hashes) request.add_hashes(h.ToBytes());
  request.mutable_layers()->set_begin(layers.begin);
  request.mutable_layers()->set_end(layers.end);
  request.set_max_chunk_bytes(static_cast<int32_t>(options_.get_chunk_bytes));
  bool delivered_any = false;
  return Retry(
      absl::Now() + absl::Milliseconds(options_.deadline_ms),
      [&](grpc::ClientContext* ctx) -> absl::Status {
        if (delivered_any) {
          return absl::UnavailableError("the stream broke after spans were delivered");
        }
        auto reader = kv_->GetSpans(ctx, request);
        v1::GetSpansResponse message;
        FetchedSpan current;
        bool have_current = false;
        uint64_t expected_checksum = 0;
        int64_t received = 0;
        absl::Status callback_status;
        auto deliver = [&]() -> absl::Status {
          if (current.found && static_cast<int64_t>(current.payload.size()) != received) {
            return absl::InternalError("payload size mismatch");
          }
          if (current.found && options_.verify_checksums &&
              Checksum64(current.payload) != expected_checksum) {
            return absl::DataLossError(absl::StrCat("span ", current.hash.ToHex(),
                                                    ": payload checksum mismatch in transit"));
          }
          delivered_any = true;
          return on_span(std::move(current));
        };
        int64_t expected_bytes = 0;
        while (callback_status.ok() && reader->Read(&message)) {
          if (message.has_header()) {
            if (have_current) {
              if (received != expected_bytes) {
                callback_status = absl::InternalError("a span's payload ended early");
                break;
              }
              callback_status = deliver();
              if (!callback_status.ok()) break;
            }
            const v1::GetSpanHeader& h = message.header();
            current = FetchedSpan();
            have_current = true;
            current.index = h.index();
            if (auto hash = HashField(h.hash()); hash.ok()) current.hash = *hash;
            current.found = h.found();
            current.miss_reason = h.miss_reason();
            current.tier = h.tier();
            if (h.found()) {
              if (auto parent = HashField(h.parent_hash()); parent.ok()) current.parent = *parent;
            }
            current.num_tokens = h.num_tokens();
            current.token_ids.assign(h.token_ids().begin(), h.token_ids().end());
            current.dtype = h.dtype();
            current.shape.assign(h.shape().begin(), h.shape().end());
            current.layers = LayerRange{h.layers().begin(), h.layers().end()};
            expected_checksum = h.payload_checksum();
            expected_bytes = h.payload_bytes();
            received = 0;
            current.payload.reserve(static_cast<size_t>(expected_bytes));
          }
          if (!message.payload_chunk().empty()) {
            if (!have_current) {
              callback_status = absl::InternalError("payload before a span header");
              break;
            }
            const int64_t size = static_cast<int64_t>(message.payload_chunk().size());
            if (received + size > expected_bytes) {
              callback_status = absl::InternalError("a span's payload overran its size");
              break;
            }
            if (received == 0 && size == expected_bytes) {
              current.payload.swap(*message.mutable_payload_chunk());  // no copy
            } else {
              current.payload.append(message.payload_chunk());
            }
            received += size;
            if (options.progress) {
              Progress p;
              p.stage = "get";
              p.done = received;
              if (!options.progress(p)) {
                callback_status = absl::CancelledError("GetSpans cancelled by the progress callback");
              }
            }
          }
        }
        if (!callback_status.ok()) {
          ctx->TryCancel();
          reader->Finish().IgnoreError();  // the callback's error is the result
          return callback_status;
        }
        absl::Status status = FromGrpcStatus(reader->Finish());
        if (!status.ok()) return status;
        if (have_current) {
          if (received != expected_bytes) return absl::InternalError("a span's payload ended early");
          return deliver();
        }
        return absl::OkStatus();
      });
}

absl::StatusOr<std::vector<FetchedSpan>> KvStoreClient::GetSpans(absl::string_view model_id,
                                                                 absl::Span<const Hash128> hashes,
                                                                 LayerRange layers,
                                                                 const GetOptions& options) {
  std::vector<FetchedSpan> out;
  out.reserve(hashes.size());
  KVR_RETURN_IF_ERROR(GetSpansStreaming(
      model_id, hashes, layers,
      [&](FetchedSpan&& span) {
        out.push_back(std::move(span));
        return absl::OkStatus();
      },
      options));
  return out;
}

absl::StatusOr<LookupResult> KvStoreClient::Lookup(absl::string_view model_id,
                                                   absl::Span<const Hash128> hashes) {
  v1::LookupRequest request;
  request.set_model_id(std::string(model_id));
  for (const Hash128& h : hashes) request.add_hashes(h.ToBytes());
  v1::LookupResponse response;
  KVR_RETURN_IF_ERROR(Retry(absl::Now() + absl::Milliseconds(options_.deadline_ms),
                            [&](grpc::ClientContext* ctx) {
                              response.Clear();
                              return FromGrpcStatus(kv_->Lookup(ctx, request, &response));
                            }));
  return ToLookupResult(response);
}

absl::StatusOr<LookupResult> KvStoreClient::LookupTokens(absl::string_view model_id,
                                                         absl::Span<const uint32_t> token_ids,
                                                         absl::string_view salt,
                                                         bool include_partial_tail) {
  v1::LookupRequest request;
  request.set_model_id(std::string(model_id));
  request.mutable_tokens()->mutable_token_ids()->Add(token_ids.begin(), token_ids.end());
  request.mutable_tokens()->set_salt(std::string(salt));
  request.mutable_tokens()->set_include_partial_tail(include_partial_tail);
  v1::LookupResponse response;
  KVR_RETURN_IF_ERROR(Retry(absl::Now() + absl::Milliseconds(options_.deadline_ms),
                            [&](grpc::ClientContext* ctx) {
                              response.Clear();
                              return FromGrpcStatus(kv_->Lookup(ctx, request, &response));
                            }));
  return ToLookupResult(response);
}

absl::StatusOr<std::vector<absl::Status>> KvStoreClient::DeleteSpans(
    absl::Span<const Hash128> hashes) {
  v1::DeleteSpansRequest request;
  for (const Hash128& h : hashes) request.add_hashes(h.ToBytes());
  v1::DeleteSpansResponse response;
  KVR_RETURN_IF_ERROR(Retry(absl::Now() + absl::Milliseconds(options_.deadline_ms),
                            [&](grpc::ClientContext* ctx) {
                              response.Clear();
                              return FromGrpcStatus(kv_->DeleteSpans(ctx, request, &response));
                            }));
  return ItemStatuses(response.results());
}

absl::StatusOr<std::vector<absl::Status>> KvStoreClient::PinSpans(
    absl::Span<const Hash128> hashes, absl::Duration ttl) {
  v1::PinSpansRequest request;
  for (const Hash128& h : hashes) request.add_hashes(h.ToBytes());
  if (ttl != absl::InfiniteDuration()) {
    request.set_ttl_ms(std::max<int64_t>(1, absl::ToInt64Milliseconds(ttl)));
  }
  v1::PinSpansResponse response;
  KVR_RETURN_IF_ERROR(Retry(absl::Now() + absl::Milliseconds(options_.deadline_ms),
                            [&](grpc::ClientContext* ctx) {
                              response.Clear();
                              return FromGrpcStatus(kv_->PinSpans(ctx, request, &response));
                            }));
  return ItemStatuses(response.results());
}

absl::StatusOr<std::vector<absl::Status>> KvStoreClient::UnpinSpans(
    absl::Span<const Hash128> hashes) {
  v1::UnpinSpansRequest request;
  for (const Hash128& h : hashes) request.add_hashes(h.ToBytes());
  v1::UnpinSpansResponse response;
  KVR_RETURN_IF_ERROR(Retry(absl::Now() + absl::Milliseconds(options_.deadline_ms),
                            [&](grpc::ClientContext* ctx) {
                              response.Clear();
                              return FromGrpcStatus(kv_->UnpinSpans(ctx, request, &response));
                            }));
  return ItemStatuses(response.results());
}

absl::StatusOr<v1::StatsResponse> KvStoreClient::Stats() {
  v1::StatsResponse response;
  KVR_RETURN_IF_ERROR(Retry(absl::Now() + absl::Milliseconds(options_.deadline_ms),
                            [&](grpc::ClientContext* ctx) {
                              response.Clear();
                              return FromGrpcStatus(admin_->Stats(ctx, v1::StatsRequest(), &response));
                            }));
  return response;
}

absl::StatusOr<v1::GetConfigResponse> KvStoreClient::GetConfig() {
  v1::GetConfigResponse response;
  KVR_RETURN_IF_ERROR(Retry(absl::Now() + absl::Milliseconds(options_.deadline_ms),
                            [&](grpc::ClientContext* ctx) {
                              response.Clear();
                              return FromGrpcStatus(
                                  admin_->GetConfig(ctx, v1::GetConfigRequest(), &response));
                            }));
  return response;
}

absl::Status KvStoreClient::CheckCompatibility() {
  KVR_ASSIGN_OR_RETURN(v1::GetConfigResponse config, GetConfig());
  if (config.api_version() != "kvrecall.v1" || config.span_hash_version() != "kvrecall.span.v1") {
    return absl::FailedPreconditionError(absl::StrCat(
        "the daemon serves API ", config.api_version(), " with span hash ",
        config.span_hash_version(), "; this client implements kvrecall.v1 / kvrecall.span.v1"));
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::client
