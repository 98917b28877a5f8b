#include "service/cluster/peer_service.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/checksum.h"
#include "common/status_macros.h"
#include "service/cluster/peers.h"
#include "service/rpc/grpc_status.h"
#include "service/rpc/proto_convert.h"

namespace kvrecall::cluster {
namespace {

// Constant-time comparison of the peer token.
bool SameSecret(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

absl::StatusOr<std::vector<Hash128>> ParseHashes(
    const google::protobuf::RepeatedPtrField<std::string>& raw) {
  std::vector<Hash128> out;
  out.reserve(raw.size());
  for (int i = 0; i < raw.size(); ++i) {
    KVR_ASSIGN_OR_RETURN(Hash128 h, rpc::HashFromProto(raw[i], absl::StrCat("hashes[", i, "]")));
    out.push_back(h);
  }
  return out;
}

}  // namespace

PeerServiceImpl::PeerServiceImpl(store::TieredStore* local, rpc::RpcMetrics* metrics,
                                 const PeerServiceOptions& options)
    : local_(local),
      options_(options),
      store_metrics_(metrics->Register("kvrecall.v1.ClusterPeer/StoreSpans")),
      fetch_metrics_(metrics->Register("kvrecall.v1.ClusterPeer/FetchSpans")),
      probe_metrics_(metrics->Register("kvrecall.v1.ClusterPeer/ProbeSpans")),
      span_op_metrics_(metrics->Register("kvrecall.v1.ClusterPeer/SpanOp")),
      catalog_write_metrics_(metrics->Register("kvrecall.v1.ClusterPeer/CatalogWrite")),
      catalog_read_metrics_(metrics->Register("kvrecall.v1.ClusterPeer/CatalogRead")) {}

absl::Status PeerServiceImpl::CheckPeer(const grpc::ServerContext& context) const {
  if (options_.peer_token.empty()) return absl::OkStatus();
  const auto& md = context.client_metadata();
  auto it = md.find(kPeerTokenMetadata);
  if (it == md.end() ||
      !SameSecret(absl::string_view(it->second.data(), it->second.size()), options_.peer_token)) {
    return absl::UnauthenticatedError(
        "kvrecall.v1.ClusterPeer is for the nodes of this cluster: the peer token is missing or "
        "wrong (--cluster_token_file)");
  }
  return absl::OkStatus();
}

// --- StoreSpans ---

grpc::Status PeerServiceImpl::StoreSpans(grpc::ServerContext* context,
                                         grpc::ServerReader<v1::StoreSpansRequest>* reader,
                                         v1::StoreSpansResponse* response) {
  rpc::RpcScope scope(store_metrics_);
  if (!scope.admitted()) return scope.Finish(rpc::RpcScope::Rejected());
  if (absl::Status st = CheckPeer(*context); !st.ok()) return scope.Finish(rpc::ToGrpcStatus(st));
  return scope.Finish(rpc::ToGrpcStatus(DoStoreSpans(reader, response)));
}

absl::Status PeerServiceImpl::DoStoreSpans(grpc::ServerReader<v1::StoreSpansRequest>* reader,
                                           v1::StoreSpansResponse* response) {
  v1::StoreSpansRequest message;
  v1::PeerSpanHeader header;
  std::string payload;
  bool have = false;
  int64_t received = 0;
  auto store = [&]() -> absl::Status {
    if (!have) return absl::OkStatus();
    const v1::PutSpanHeader& h = header.span();
    if (static_cast<int64_t>(payload.size()) != h.payload_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat("span ", response->already_present_size(),
                                                     ": the stream ended inside its payload"));
    }
    if (options_.ensure_model) KVR_RETURN_IF_ERROR(options_.ensure_model(h.model_id()));
    KVR_ASSIGN_OR_RETURN(store::StoredSpan span,
                         SpanFromProto(header.tenant(), h, std::move(payload)));
    store::PutOptions put;
    put.parent_checked = true;
    KVR_ASSIGN_OR_RETURN(store::PutOutcome outcome, local_->Put(std::move(span), put));
    response->add_already_present(outcome.already_present);
    response->add_durable_tiers(rpc::TierToProto(outcome.durable_tier));
    store_metrics_->AddPayloadBytes(h.payload_bytes());
    payload.clear();
    have = false;
    return absl::OkStatus();
  };
  while (reader->Read(&message)) {
    if (message.has_header()) {
      KVR_RETURN_IF_ERROR(store());
      header = std::move(*message.mutable_header());
      const int64_t bytes = header.span().payload_bytes();
      if (bytes < 0 || bytes > options_.max_span_bytes) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "span of ", bytes, " bytes; at most ", options_.max_span_bytes, " (--max_span_bytes)"));
      }
      payload.reserve(static_cast<size_t>(bytes));
      have = true;
      received = 0;
    }
    if (!message.payload_chunk().empty()) {
      if (!have) return absl::InvalidArgumentError("payload before a span header");
      received += static_cast<int64_t>(message.payload_chunk().size());
      if (received > header.span().payload_bytes()) {
        return absl::InvalidArgumentError("a chunk overruns the span's payload_bytes");
      }
      if (payload.empty() && received == header.span().payload_bytes()) {
        payload.swap(*message.mutable_payload_chunk());
      } else {
        payload.append(message.payload_chunk());
      }
    }
  }
  return store();
}

// --- FetchSpans ---

grpc::Status PeerServiceImpl::FetchSpans(grpc::ServerContext* context,
                                         const v1::FetchSpansRequest* request,
                                         grpc::ServerWriter<v1::FetchSpansResponse>* writer) {
  rpc::RpcScope scope(fetch_metrics_);
  if (!scope.admitted()) return scope.Finish(rpc::RpcScope::Rejected());
  if (absl::Status st = CheckPeer(*context); !st.ok()) return scope.Finish(rpc::ToGrpcStatus(st));
  return scope.Finish(rpc::ToGrpcStatus(DoFetchSpans(*request, writer)));
}

absl::Status PeerServiceImpl::DoFetchSpans(const v1::FetchSpansRequest& request,
                                           grpc::ServerWriter<v1::FetchSpansResponse>* writer) {
  KVR_ASSIGN_OR_RETURN(std::vector<Hash128> hashes, ParseHashes(request.hashes()));
  const size_t chunk = static_cast<size_t>(std::max<int64_t>(4096, options_.chunk_bytes));
  v1::FetchSpansResponse message;
  for (size_t i = 0; i < hashes.size(); ++i) {
    store::GetResult got = local_->Get(store::SpanKey{request.tenant(), hashes[i]},
                                       request.model_id());
    message.Clear();
    v1::FetchedSpanHeader* h = message.mutable_header();
    h->set_index(static_cast<int32_t>(i));
    if (got.span == nullptr) {
      h->set_found(false);
      h->set_miss_reason(rpc::MissReasonToProto(
          got.miss == store::MissReason::kNone ? store::MissReason::kNeverStored : got.miss));
      if (!writer->Write(message)) return absl::CancelledError("the peer went away");
      continue;
    }
    h->set_found(true);
    *h->mutable_span() = SpanHeaderToProto(*got.span);
    const std::string& p = got.span->payload;
    size_t offset = 0;
    do {
      const size_t len = std::min(chunk, p.size() - offset);
      message.set_payload_chunk(p.data() + offset, len);
      offset += len;
      if (!writer->Write(message)) return absl::CancelledError("the peer went away");
      message.clear_header();
    } while (offset < p.size());
    fetch_metrics_->AddPayloadBytes(static_cast<int64_t>(p.size()));
  }
  return absl::OkStatus();
}

// --- ProbeSpans ---

grpc::Status PeerServiceImpl::ProbeSpans(grpc::ServerContext* context,
                                         const v1::ProbeSpansRequest* request,
                                         v1::ProbeSpansResponse* response) {
  rpc::RpcScope scope(probe_metrics_);
  if (!scope.admitted()) return scope.Finish(rpc::RpcScope::Rejected());
  if (absl::Status st = CheckPeer(*context); !st.ok()) return scope.Finish(rpc::ToGrpcStatus(st));
  return scope.Finish(rpc::ToGrpcStatus(DoProbeSpans(*request, response)));
}

absl::Status PeerServiceImpl::DoProbeSpans(const v1::ProbeSpansRequest& request,
                                           v1::ProbeSpansResponse* response) {
  KVR_ASSIGN_OR_RETURN(std::vector<Hash128> hashes, ParseHashes(request.hashes()));
  if (!request.model_id().empty() && options_.ensure_model) {
    KVR_RETURN_IF_ERROR(options_.ensure_model(request.model_id()));
  }
  for (const Hash128& h : hashes) {
    store::LookupResult r = local_->Lookup(request.tenant(), request.model_id(), {h});
    v1::SpanProbe* p = response->add_spans();
    p->set_found(r.prefix_spans == 1);
    if (r.prefix_spans == 1) {
      p->set_num_tokens(static_cast<int32_t>(r.prefix_tokens));
    } else if (!r.missing.empty()) {
      p->set_miss_reason(rpc::MissReasonToProto(r.missing.front()));
    }
  }
  return absl::OkStatus();
}

// --- SpanOp ---

grpc::Status PeerServiceImpl::SpanOp(grpc::ServerContext* context,
                                     const v1::SpanOpRequest* request,
                                     v1::SpanOpResponse* response) {
  rpc::RpcScope scope(span_op_metrics_);
  if (!scope.admitted()) return scope.Finish(rpc::RpcScope::Rejected());
  if (absl::Status st = CheckPeer(*context); !st.ok()) return scope.Finish(rpc::ToGrpcStatus(st));
  return scope.Finish(rpc::ToGrpcStatus(DoSpanOp(*request, response)));
}

absl::Status PeerServiceImpl::DoSpanOp(const v1::SpanOpRequest& request,
                                       v1::SpanOpResponse* response) {
  KVR_ASSIGN_OR_RETURN(std::vector<Hash128> hashes, ParseHashes(request.hashes()));
  const absl::Duration ttl = request.ttl_ms() <= 0 ? absl::InfiniteDuration()
                                                   : absl::Milliseconds(request.ttl_ms());
  for (size_t i = 0; i < hashes.size(); ++i) {
    const store::SpanKey key{request.tenant(), hashes[i]};
    absl::Status st;
    switch (request.op()) {
      case v1::SPAN_OP_DELETE:
        st = local_->Delete(key);
        break;
      case v1::SPAN_OP_DROP:
        st = local_->Drop(key);
        break;
      case v1::SPAN_OP_PIN:
        st = local_->Pin(key, ttl);
        break;
      case v1::SPAN_OP_UNPIN:
        st = local_->Unpin(key);
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat("unknown span op ", request.op()));
    }
    v1::ItemStatus* item = response->add_results();
    item->set_index(static_cast<int32_t>(i));
    item->set_hash(request.hashes(static_cast<int>(i)));
    item->set_code(static_cast<int32_t>(st.code()));
    item->set_message(std::string(st.message()));
  }
  return absl::OkStatus();
}

// --- catalog ---

grpc::Status PeerServiceImpl::CatalogWrite(grpc::ServerContext* context,
                                           const v1::CatalogWriteRequest* request,
                                           v1::CatalogWriteResponse* response) {
  rpc::RpcScope scope(catalog_write_metrics_);
  if (!scope.admitted()) return scope.Finish(rpc::RpcScope::Rejected());
  if (absl::Status st = CheckPeer(*context); !st.ok()) return scope.Finish(rpc::ToGrpcStatus(st));
  for (const v1::CatalogEntry& e : request->entries()) {
    absl::Status st = e.deleted() ? local_->CatalogDelete(e.space(), e.key())
                                  : local_->CatalogPut(e.space(), e.key(), e.value());
    if (!st.ok() && !(e.deleted() && st.code() == absl::StatusCode::kNotFound)) {
      return scope.Finish(rpc::ToGrpcStatus(st));
    }
  }
  return scope.Finish(grpc::Status::OK);
}

grpc::Status PeerServiceImpl::CatalogRead(grpc::ServerContext* context,
                                          const v1::CatalogReadRequest* request,
                                          v1::CatalogReadResponse* response) {
  rpc::RpcScope scope(catalog_read_metrics_);
  if (!scope.admitted()) return scope.Finish(rpc::RpcScope::Rejected());
  if (absl::Status st = CheckPeer(*context); !st.ok()) return scope.Finish(rpc::ToGrpcStatus(st));
  auto add = [&](const std::string& key, const std::string& value) {
    v1::CatalogEntry* e = response->add_entries();
    e->set_space(request->space());
    e->set_key(key);
    if (request->checksums_only()) {
      e->set_checksum(Checksum64(value));
    } else {
      e->set_value(value);
    }
  };
  if (request->prefix()) {
    auto all = local_->CatalogScan(request->space(), request->key());
    if (!all.ok()) return scope.Finish(rpc::ToGrpcStatus(all.status()));
    for (const auto& [k, v] : *all) add(k, v);
  } else {
    auto value = local_->CatalogGet(request->space(), request->key());
    if (value.ok()) {
      add(request->key(), *value);
    } else if (value.status().code() != absl::StatusCode::kNotFound) {
      return scope.Finish(rpc::ToGrpcStatus(value.status()));
    }
  }
  return scope.Finish(grpc::Status::OK);
}

}  // namespace kvrecall::cluster
