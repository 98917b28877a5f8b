#include "service/cluster/etcd_client.h"

#include <chrono>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

namespace kvrecall::cluster {
namespace {

absl::Status FromGrpc(const grpc::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat("etcd ", what, ": ", s.error_message()));
}

void SetDeadline(grpc::ClientContext* ctx, absl::Duration timeout) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::microseconds(absl::ToInt64Microseconds(timeout)));
}

EtcdKeyValue FromProto(const mvccpb::KeyValue& kv) {
  EtcdKeyValue out;
  out.key = kv.key();
  out.value = kv.value();
  out.create_revision = kv.create_revision();
  out.mod_revision = kv.mod_revision();
  out.lease = kv.lease();
  return out;
}

}  // namespace

std::string PrefixRangeEnd(absl::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    unsigned char last = static_cast<unsigned char>(end.back());
    if (last < 0xff) {
      end.back() = static_cast<char>(last + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');  // every key
}

void EtcdWatchHandle::Cancel() {
  absl::MutexLock lock(&mu_);
  cancelled_ = true;
  if (context_ != nullptr) static_cast<grpc::ClientContext*>(context_)->TryCancel();
}

bool EtcdWatchHandle::cancelled() const {
  absl::MutexLock lock(&mu_);
  return cancelled_;
}

absl::StatusOr<std::unique_ptr<EtcdClient>> EtcdClient::Create(const EtcdOptions& options) {
  if (options.endpoints.empty()) {
    return absl::InvalidArgumentError("etcd: at least one endpoint (host:port) is needed");
  }
  EtcdOptions o = options;
  for (std::string& e : o.endpoints) {
    if (absl::StartsWith(e, "http://")) e = e.substr(7);
    if (absl::StartsWith(e, "https://")) {
      return absl::InvalidArgumentError(
          absl::StrCat("etcd endpoint ", e, ": TLS to etcd is not supported yet"));
    }
    while (!e.empty() && e.back() == '/') e.pop_back();
    if (e.empty() || e.find(':') == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("etcd endpoint '", e, "' is not host:port"));
    }
  }
  if (o.call_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("etcd: call_timeout must be positive");
  }
  return std::unique_ptr<EtcdClient>(new EtcdClient(o));
}

EtcdClient::EtcdClient(const EtcdOptions& options) : options_(options) {
  for (const std::string& address : options_.endpoints) {
    Endpoint e;
    e.address = address;
    grpc::ChannelArguments args;
    // Reconnect quickly after etcd restarts.
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    // Not the process-wide subchannel pool: a connection in backoff from an
    // earlier etcd outage must not fail a fresh client's calls.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    e.channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
    e.kv = etcdserverpb::KV::NewStub(e.channel);
    e.lease = etcdserverpb::Lease::NewStub(e.channel);
    e.watch = etcdserverpb::Watch::NewStub(e.channel);
    endpoints_.push_back(std::move(e));
  }
}

std::string EtcdClient::current_endpoint() const {
  return endpoints_[current_.load() % endpoints_.size()].address;
}

absl::Status EtcdClient::Call(
    const std::function<grpc::Status(Endpoint&, grpc::ClientContext*)>& call) {
  grpc::Status last;
  const size_t first = current_.load();
  for (size_t i = 0; i < endpoints_.size(); ++i) {
    const size_t index = (first + i) % endpoints_.size();
    grpc::ClientContext ctx;
    SetDeadline(&ctx, options_.call_timeout);
    // With one endpoint, wait for it (etcd restarting) up to the deadline;
    // with several, fail fast and try the next.
    ctx.set_wait_for_ready(endpoints_.size() == 1);
    last = call(endpoints_[index], &ctx);
    if (last.error_code() != grpc::StatusCode::UNAVAILABLE &&
        last.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      current_.store(index);
      break;
    }
  }
  if (last.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(last.error_code()),
                      absl::StrCat("etcd at ", current_endpoint(), ": ", last.error_message()));
}

absl::StatusOr<int64_t> EtcdClient::Put(absl::string_view key, absl::string_view value,
                                        int64_t lease) {
  etcdserverpb::PutRequest request;
  request.set_key(std::string(key));
  request.set_value(std::string(value));
  request.set_lease(lease);
  etcdserverpb::PutResponse response;
  KVR_RETURN_IF_ERROR(Call([&](Endpoint& e, grpc::ClientContext* ctx) {
    return e.kv->Put(ctx, request, &response);
  }));
  return response.header().revision();
}

absl::StatusOr<std::optional<EtcdKeyValue>> EtcdClient::Get(absl::string_view key) {
  etcdserverpb::RangeRequest request;
  request.set_key(std::string(key));
  etcdserverpb::RangeResponse response;
  KVR_RETURN_IF_ERROR(Call([&](Endpoint& e, grpc::ClientContext* ctx) {
    return e.kv->Range(ctx, request, &response);
  }));
  if (response.kvs_size() == 0) return std::optional<EtcdKeyValue>();
  return std::optional<EtcdKeyValue>(FromProto(response.kvs(0)));
}

absl::StatusOr<std::pair<std::vector<EtcdKeyValue>, int64_t>> EtcdClient::GetPrefix(
    absl::string_view prefix) {
  etcdserverpb::RangeRequest request;
  request.set_key(std::string(prefix));
  request.set_range_end(PrefixRangeEnd(prefix));
  etcdserverpb::RangeResponse response;
  KVR_RETURN_IF_ERROR(Call([&](Endpoint& e, grpc::ClientContext* ctx) {
    return e.kv->Range(ctx, request, &response);
  }));
  std::vector<EtcdKeyValue> out;
  out.reserve(response.kvs_size());
  for (const auto& kv : response.kvs()) out.push_back(FromProto(kv));
  return std::make_pair(std::move(out), response.header().revision());
}

absl::StatusOr<int64_t> EtcdClient::Delete(absl::string_view key) {
  etcdserverpb::DeleteRangeRequest request;
  request.set_key(std::string(key));
  etcdserverpb::DeleteRangeResponse response;
  KVR_RETURN_IF_ERROR(Call([&](Endpoint& e, grpc::ClientContext* ctx) {
    return e.kv->DeleteRange(ctx, request, &response);
  }));
  return response.deleted();
}

absl::StatusOr<bool> EtcdClient::PutIfAbsent(absl::string_view key, absl::string_view value,
                                             int64_t lease, EtcdKeyValue* existing) {
  etcdserverpb::TxnRequest request;
  etcdserverpb::Compare* cmp = request.add_compare();
  cmp->set_key(std::string(key));
  cmp->set_target(etcdserverpb::Compare::CREATE);
  cmp->set_result(etcdserverpb::Compare::EQUAL);
  cmp->set_create_revision(0);  // the key does not exist
  etcdserverpb::PutRequest* put = request.add_success()->mutable_request_put();
  put->set_key(std::string(key));
  put->set_value(std::string(value));
  put->set_lease(lease);
  request.add_failure()->mutable_request_range()->set_key(std::string(key));
  etcdserverpb::TxnResponse response;
  KVR_RETURN_IF_ERROR(Call([&](Endpoint& e, grpc::ClientContext* ctx) {
    return e.kv->Txn(ctx, request, &response);
  }));
  if (response.succeeded()) return true;
  if (existing != nullptr && response.responses_size() > 0 &&
      response.responses(0).response_range().kvs_size() > 0) {
    *existing = FromProto(response.responses(0).response_range().kvs(0));
  }
  return false;
}

absl::StatusOr<int64_t> EtcdClient::GrantLease(absl::Duration ttl) {
  etcdserverpb::LeaseGrantRequest request;
  request.set_ttl(std::max<int64_t>(1, absl::ToInt64Seconds(ttl)));
  etcdserverpb::LeaseGrantResponse response;
  KVR_RETURN_IF_ERROR(Call([&](Endpoint& e, grpc::ClientContext* ctx) {
    return e.lease->LeaseGrant(ctx, request, &response);
  }));
  if (!response.error().empty()) {
    return absl::UnavailableError(absl::StrCat("etcd lease grant: ", response.error()));
  }
  return response.id();
}

absl::StatusOr<absl::Duration> EtcdClient::KeepAliveOnce(int64_t lease) {
  etcdserverpb::LeaseKeepAliveResponse response;
  bool got = false;
  KVR_RETURN_IF_ERROR(Call([&](Endpoint& e, grpc::ClientContext* ctx) {
    auto stream = e.lease->LeaseKeepAlive(ctx);
    etcdserverpb::LeaseKeepAliveRequest request;
    request.set_id(lease);
    got = stream->Write(request) && stream->Read(&response);
    stream->WritesDone();
    grpc::Status status = stream->Finish();
    if (got) return grpc::Status::OK;
    return status.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "keep-alive stream ended")
                       : status;
  }));
  if (response.ttl() <= 0) {
    return absl::NotFoundError(absl::StrCat("etcd lease ", lease, " expired"));
  }
  return absl::Seconds(response.ttl());
}

absl::Status EtcdClient::RevokeLease(int64_t lease) {
  etcdserverpb::LeaseRevokeRequest request;
  request.set_id(lease);
  etcdserverpb::LeaseRevokeResponse response;
  return Call([&](Endpoint& e, grpc::ClientContext* ctx) {
    return e.lease->LeaseRevoke(ctx, request, &response);
  });
}

absl::StatusOr<absl::Duration> EtcdClient::LeaseTimeToLive(int64_t lease) {
  etcdserverpb::LeaseTimeToLiveRequest request;
  request.set_id(lease);
  etcdserverpb::LeaseTimeToLiveResponse response;
  KVR_RETURN_IF_ERROR(Call([&](Endpoint& e, grpc::ClientContext* ctx) {
    return e.lease->LeaseTimeToLive(ctx, request, &response);
  }));
  if (response.ttl() < 0) return absl::NotFoundError(absl::StrCat("etcd lease ", lease, " expired"));
  return absl::Seconds(response.ttl());
}

absl::Status EtcdClient::Watch(absl::string_view prefix, int64_t start_revision,
                               const WatchCallback& on_events, EtcdWatchHandle* handle) {
  Endpoint& e = endpoints_[current_.load() % endpoints_.size()];
  grpc::ClientContext ctx;
  ctx.set_wait_for_ready(endpoints_.size() == 1);
  {
    absl::MutexLock lock(&handle->mu_);
    if (handle->cancelled_) return absl::OkStatus();
    handle->context_ = &ctx;
  }
  auto clear = [&] {
    absl::MutexLock lock(&handle->mu_);
    handle->context_ = nullptr;
  };
  auto stream = e.watch->Watch(&ctx);
  etcdserverpb::WatchRequest request;
  etcdserverpb::WatchCreateRequest* create = request.mutable_create_request();
  create->set_key(std::string(prefix));
  create->set_range_end(PrefixRangeEnd(prefix));
  create->set_start_revision(start_revision);
  create->set_progress_notify(true);
  if (!stream->Write(request)) {
    grpc::Status s = stream->Finish();
    clear();
    if (s.ok()) s = grpc::Status(grpc::StatusCode::UNAVAILABLE, "watch stream closed");
    current_.store((current_.load() + 1) % endpoints_.size());  // try another endpoint next
    return FromGrpc(s, "watch");
  }
  etcdserverpb::WatchResponse response;
  absl::Status result = absl::OkStatus();
  bool stopped = false;
  while (stream->Read(&response)) {
    if (response.compact_revision() > 0) {
      result = absl::OutOfRangeError(absl::StrCat("etcd watch: revision ", start_revision,
                                                  " was compacted (now ",
                                                  response.compact_revision(), ")"));
      stopped = true;
      break;
    }
    if (response.canceled()) {
      result = absl::UnavailableError(
          absl::StrCat("etcd cancelled the watch: ", response.cancel_reason()));
      stopped = true;
      break;
    }
    std::vector<EtcdEvent> events;
    events.reserve(response.events_size());
    for (const auto& ev : response.events()) {
      EtcdEvent out;
      out.deleted = ev.type() == mvccpb::Event::DELETE;
      out.kv = FromProto(ev.kv());
      events.push_back(std::move(out));
    }
    if (!on_events(events, response.header().revision())) {
      stopped = true;
      break;
    }
  }
  if (stopped) ctx.TryCancel();
  grpc::Status status = stream->Finish();
  const bool cancelled = handle->cancelled();
  clear();
  if (stopped) return result;
  if (cancelled) return absl::OkStatus();
  if (status.ok()) status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "watch stream ended");
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    current_.store((current_.load() + 1) % endpoints_.size());
  }
  return FromGrpc(status, "watch");
}

}  // namespace kvrecall::cluster
