#include "service/cluster/peers.h"

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "service/rpc/grpc_status.h"
#include "service/rpc/proto_convert.h"
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

namespace kvrecall::cluster {
namespace {

absl::Status FromGrpc(const grpc::Status& s, absl::string_view address) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat("peer ", address, ": ", s.error_message()));
}

}  // namespace

v1::PutSpanHeader SpanHeaderToProto(const store::StoredSpan& span) {
  v1::PutSpanHeader h;
  h.set_model_id(span.meta.model_id);
  h.set_hash(span.key.hash.ToBytes());
  h.set_parent_hash(span.meta.parent.ToBytes());
  h.set_num_tokens(span.meta.num_tokens);
  h.mutable_token_ids()->Add(span.meta.token_ids.begin(), span.meta.token_ids.end());
  h.set_payload_bytes(static_cast<int64_t>(span.payload.size()));
  h.set_payload_checksum(span.meta.payload_checksum);
  h.set_durable(span.meta.durable);
  return h;
}

absl::StatusOr<store::StoredSpan> SpanFromProto(absl::string_view tenant,
                                                const v1::PutSpanHeader& header,
                                                std::string payload) {
  store::StoredSpan span;
  span.key.tenant = std::string(tenant);
  KVR_ASSIGN_OR_RETURN(span.key.hash, rpc::HashFromProto(header.hash(), "hash"));
  KVR_ASSIGN_OR_RETURN(span.meta.parent, rpc::HashFromProto(header.parent_hash(), "parent_hash"));
  span.meta.model_id = header.model_id();
  span.meta.num_tokens = header.num_tokens();
  span.meta.token_ids.assign(header.token_ids().begin(), header.token_ids().end());
  span.meta.payload_bytes = header.payload_bytes();
  span.meta.payload_checksum = header.payload_checksum();
  span.meta.durable = header.durable();
  span.payload = std::move(payload);
  return span;
}

store::MissReason MissReasonFromProto(v1::MissReason reason) {
  switch (reason) {
    case v1::MISS_REASON_NEVER_STORED:
      return store::MissReason::kNeverStored;
    case v1::MISS_REASON_EVICTED:
      return store::MissReason::kEvicted;
    case v1::MISS_REASON_DELETED:
      return store::MissReason::kDeleted;
    case v1::MISS_REASON_MODEL_MISMATCH:
      return store::MissReason::kModelMismatch;
    case v1::MISS_REASON_CHECKSUM_FAILURE:
      return store::MissReason::kChecksumFailure;
    case v1::MISS_REASON_OTHER_NAMESPACE:
      return store::MissReason::kOtherNamespace;
    case v1::MISS_REASON_PARENT_MISSING:
      return store::MissReason::kParentMissing;
    case v1::MISS_REASON_OWNER_UNAVAILABLE:
      return store::MissReason::kOwnerUnavailable;
    default:
      return store::MissReason::kNone;
  }
}

store::TierId TierFromProto(v1::Tier tier) {
  switch (tier) {
    case v1::TIER_DISK:
      return store::TierId::kDisk;
    case v1::TIER_ROCKSDB:
      return store::TierId::kRocksDb;
    default:
      return store::TierId::kMemory;
  }
}

absl::StatusOr<std::unique_ptr<PeerPool>> PeerPool::Create(const PeerOptions& options) {
  std::unique_ptr<PeerPool> pool(new PeerPool(options));
  if (options.tls) {
    auto read = [](const std::string& path, const char* what,
                   std::string* out) -> absl::Status {
      if (path.empty()) return absl::OkStatus();
      absl::StatusOr<std::string> text = ReadFileToString(path);
      if (!text.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": ", text.status().message()));
      }
      *out = *std::move(text);
      return absl::OkStatus();
    };
    KVR_RETURN_IF_ERROR(read(options.tls_ca_file, "cluster TLS CA", &pool->ca_pem_));
    KVR_RETURN_IF_ERROR(read(options.tls_cert_file, "cluster TLS certificate", &pool->cert_pem_));
    KVR_RETURN_IF_ERROR(read(options.tls_key_file, "cluster TLS key", &pool->key_pem_));
  }
  return pool;
}

PeerPool::Connection& PeerPool::ConnectionFor(const std::string& address) {
  auto it = connections_.find(address);
  if (it != connections_.end()) return it->second;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(options_.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(options_.max_message_bytes));
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (options_.tls) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = ca_pem_;
    ssl.pem_cert_chain = cert_pem_;
    ssl.pem_private_key = key_pem_;
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  Connection c;
  c.channel = grpc::CreateCustomChannel(address, creds, args);
  c.stub = v1::ClusterPeer::NewStub(c.channel);
  return connections_[address] = std::move(c);
}

v1::ClusterPeer::Stub* PeerPool::StubFor(const std::string& address) {
  absl::MutexLock lock(&mu_);
  return ConnectionFor(address).stub.get();
}

std::shared_ptr<grpc::Channel> PeerPool::ChannelFor(const std::string& address) {
  absl::MutexLock lock(&mu_);
  return ConnectionFor(address).channel;
}

std::unique_ptr<grpc::ClientContext> PeerPool::NewContext(int64_t payload_bytes) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  absl::Duration timeout = options_.call_timeout;
  if (options_.min_bytes_per_second > 0 && payload_bytes > 0) {
    timeout += absl::Seconds(static_cast<double>(payload_bytes) /
                             static_cast<double>(options_.min_bytes_per_second));
  }
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::microseconds(absl::ToInt64Microseconds(timeout)));
  if (!options_.peer_token.empty()) ctx->AddMetadata(kPeerTokenMetadata, options_.peer_token);
  return ctx;
}

absl::Status PeerPool::StoreSpans(const std::string& address,
                                  absl::Span<const store::StoredSpanPtr> spans,
                                  std::vector<bool>* already_present,
                                  std::vector<store::TierId>* durable_tiers) {
  if (spans.empty()) return absl::OkStatus();
  int64_t bytes = 0;
  for (const auto& s : spans) bytes += static_cast<int64_t>(s->payload.size());
  auto ctx = NewContext(bytes);
  v1::StoreSpansResponse response;
  auto writer = StubFor(address)->StoreSpans(ctx.get(), &response);
  v1::StoreSpansRequest message;
  bool ok = true;
  const size_t chunk = static_cast<size_t>(options_.chunk_bytes);
  for (size_t i = 0; i < spans.size() && ok; ++i) {
    const store::StoredSpan& s = *spans[i];
    message.Clear();
    message.mutable_header()->set_tenant(s.key.tenant);
    *message.mutable_header()->mutable_span() = SpanHeaderToProto(s);
    size_t offset = 0;
    do {
      const size_t len = std::min(chunk, s.payload.size() - offset);
      message.set_payload_chunk(s.payload.data() + offset, len);
      offset += len;
      ok = writer->Write(message);
      message.clear_header();
    } while (ok && offset < s.payload.size());
  }
  if (ok) writer->WritesDone();
  KVR_RETURN_IF_ERROR(FromGrpc(writer->Finish(), address));
  if (already_present != nullptr) {
    already_present->assign(response.already_present().begin(), response.already_present().end());
  }
  if (durable_tiers != nullptr) {
    durable_tiers->clear();
    for (int t : response.durable_tiers()) {
      durable_tiers->push_back(TierFromProto(static_cast<v1::Tier>(t)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<store::GetResult>> PeerPool::FetchSpans(
    const std::string& address, absl::string_view tenant, absl::string_view model_id,
    absl::Span<const Hash128> hashes) {
  v1::FetchSpansRequest request;
  request.set_tenant(std::string(tenant));
  request.set_model_id(std::string(model_id));
  for (const Hash128& h : hashes) request.add_hashes(h.ToBytes());
  auto ctx = NewContext(0);
  // Fetches move payloads: allow for 256 MiB at the minimum rate.
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = StubFor(address)->FetchSpans(ctx.get(), request);
  std::vector<store::GetResult> out(hashes.size());
  v1::FetchSpansResponse message;
  int current = -1;
  v1::PutSpanHeader header;
  std::string payload;
  absl::Status error;
  auto complete = [&]() -> absl::Status {
    if (current < 0 || header.hash().empty()) return absl::OkStatus();
    if (static_cast<int64_t>(payload.size()) != header.payload_bytes()) {
      return absl::DataLossError(absl::StrCat("peer ", address, " sent ", payload.size(),
                                              " of ", header.payload_bytes(), " payload bytes"));
    }
    KVR_ASSIGN_OR_RETURN(store::StoredSpan span,
                         SpanFromProto(tenant, header, std::move(payload)));
    out[current].span = std::make_shared<const store::StoredSpan>(std::move(span));
    header.Clear();
    payload.clear();
    return absl::OkStatus();
  };
  while (error.ok() && reader->Read(&message)) {
    if (message.has_header()) {
      error = complete();
      if (!error.ok()) break;
      const v1::FetchedSpanHeader& h = message.header();
      if (h.index() < 0 || h.index() >= static_cast<int>(hashes.size())) {
        error = absl::InternalError(absl::StrCat("peer ", address, " sent span index ", h.index()));
        break;
      }
      current = h.index();
      if (h.found()) {
        header = h.span();
        payload.reserve(static_cast<size_t>(std::max<int64_t>(0, header.payload_bytes())));
        out[current].tier = store::TierId::kMemory;
      } else {
        header.Clear();
        out[current].miss = MissReasonFromProto(h.miss_reason());
        if (out[current].miss == store::MissReason::kNone) {
          out[current].miss = store::MissReason::kNeverStored;
        }
      }
    }
    if (!message.payload_chunk().empty()) {
      if (header.hash().empty()) {
        error = absl::InternalError(absl::StrCat("peer ", address, " sent payload without a span"));
        break;
      }
      if (payload.empty() &&
          static_cast<int64_t>(message.payload_chunk().size()) == header.payload_bytes()) {
        payload.swap(*message.mutable_payload_chunk());
      } else {
        payload.append(message.payload_chunk());
      }
    }
  }
  if (error.ok()) error = complete();
  if (!error.ok()) {
    ctx->TryCancel();
    reader->Finish().IgnoreError();  // the error above is the result
    return error;
  }
  KVR_RETURN_IF_ERROR(FromGrpc(reader->Finish(), address));
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i].span == nullptr && out[i].miss == store::MissReason::kNone) {
      return absl::InternalError(absl::StrCat("peer ", address, " did not answer span ", i));
    }
  }
  return out;
}

absl::StatusOr<std::vector<PeerProbe>> PeerPool::ProbeSpans(const std::string& address,
                                                            absl::string_view tenant,
                                                            absl::string_view model_id,
                                                            absl::Span<const Hash128> hashes) {
  v1::ProbeSpansRequest request;
  request.set_tenant(std::string(tenant));
  request.set_model_id(std::string(model_id));
  for (const Hash128& h : hashes) request.add_hashes(h.ToBytes());
  v1::ProbeSpansResponse response;
  auto ctx = NewContext(0);
  KVR_RETURN_IF_ERROR(FromGrpc(StubFor(address)->ProbeSpans(ctx.get(), request, &response), address));
  if (response.spans_size() != static_cast<int>(hashes.size())) {
    return absl::InternalError(absl::StrCat("peer ", address, " answered ", response.spans_size(),
                                            " of ", hashes.size(), " probes"));
  }
  std::vector<PeerProbe> out;
  out.reserve(hashes.size());
  for (const v1::SpanProbe& p : response.spans()) {
    PeerProbe probe;
    probe.found = p.found();
    probe.miss = p.found() ? store::MissReason::kNone : MissReasonFromProto(p.miss_reason());
    if (!p.found() && probe.miss == store::MissReason::kNone) probe.miss = store::MissReason::kNeverStored;
    probe.num_tokens = p.num_tokens();
    out.push_back(probe);
  }
  return out;
}

absl::StatusOr<std::vector<absl::Status>> PeerPool::SpanOp(const std::string& address,
                                                           absl::string_view tenant,
                                                           v1::SpanOpKind op,
                                                           absl::Span<const Hash128> hashes,
                                                           absl::Duration ttl) {
  v1::SpanOpRequest request;
  request.set_tenant(std::string(tenant));
  request.set_op(op);
  for (const Hash128& h : hashes) request.add_hashes(h.ToBytes());
  if (ttl != absl::InfiniteDuration()) {
    request.set_ttl_ms(std::max<int64_t>(1, absl::ToInt64Milliseconds(ttl)));
  }
  v1::SpanOpResponse response;
  auto ctx = NewContext(0);
  KVR_RETURN_IF_ERROR(FromGrpc(StubFor(address)->SpanOp(ctx.get(), request, &response), address));
  std::vector<absl::Status> out;
  for (const v1::ItemStatus& item : response.results()) {
    out.emplace_back(static_cast<absl::StatusCode>(item.code()), item.message());
  }
  if (out.size() != hashes.size()) {
    return absl::InternalError(absl::StrCat("peer ", address, " answered ", out.size(), " of ",
                                            hashes.size(), " span operations"));
  }
  return out;
}

absl::Status PeerPool::CatalogWrite(const std::string& address,
                                    const v1::CatalogWriteRequest& request) {
  int64_t bytes = 0;
  for (const auto& e : request.entries()) bytes += static_cast<int64_t>(e.value().size());
  v1::CatalogWriteResponse response;
  auto ctx = NewContext(bytes);
  return FromGrpc(StubFor(address)->CatalogWrite(ctx.get(), request, &response), address);
}

absl::StatusOr<std::vector<v1::CatalogEntry>> PeerPool::CatalogRead(
    const std::string& address, const v1::CatalogReadRequest& request) {
  v1::CatalogReadResponse response;
  auto ctx = NewContext(request.checksums_only() ? 0 : options_.max_message_bytes);
  KVR_RETURN_IF_ERROR(
      FromGrpc(StubFor(address)->CatalogRead(ctx.get(), request, &response), address));
  return std::vector<v1::CatalogEntry>(response.entries().begin(), response.entries().end());
}

}  // namespace kvrecall::cluster
