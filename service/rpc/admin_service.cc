#include "service/rpc/admin_service.h"

#include "absl/time/clock.h"
#include "service/rpc/grpc_status.h"
#include "service/rpc/proto_convert.h"

namespace kvrecall::rpc {

AdminServiceImpl::AdminServiceImpl(const store::TieredStore* store,
                                   const TenantAuthenticator* auth, RpcMetrics* metrics,
                                   const ServerOptions* options, absl::Time start_time)
    : store_(store),
      auth_(auth),
      metrics_(metrics),
      options_(options),
      start_time_(start_time),
      stats_metrics_(metrics->Register("kvrecall.v1.Admin/Stats")),
      get_config_metrics_(metrics->Register("kvrecall.v1.Admin/GetConfig")) {}

grpc::Status AdminServiceImpl::Stats(grpc::ServerContext* context,
                                     const v1::StatsRequest* request,
                                     v1::StatsResponse* response) {
  RpcScope scope(stats_metrics_);
  if (!scope.admitted()) return scope.Finish(RpcScope::Rejected());
  absl::StatusOr<Principal> caller = auth_->AuthenticatePrincipal(*context);
  if (!caller.ok()) return scope.Finish(ToGrpcStatus(caller.status()));
  // The counters are of every tenant's traffic: for admins only.
  if (!caller->admin) {
    return scope.Finish(ToGrpcStatus(absl::PermissionDeniedError(
        "Admin.Stats needs the admin role (the 'admin' option of the tenants file)")));
  }

  const store::StoreStats stats = store_->Stats();
  for (const store::TierStats& t : stats.tiers) {
    v1::TierStats* out = response->add_tiers();
    out->set_tier(TierToProto(t.tier));
    out->set_capacity_bytes(t.capacity_bytes);
    out->set_bytes(t.bytes);
    out->set_spans(t.spans);
    out->set_hits(t.hits);
    out->set_misses(t.misses);
    out->set_evictions(t.evictions);
    out->set_promotions(t.promotions);
    out->set_demotions(t.demotions);
    out->set_checksum_failures(t.checksum_failures);
  }
  for (int r = static_cast<int>(store::MissReason::kNeverStored);
       r <= static_cast<int>(store::MissReason::kOwnerUnavailable); ++r) {
    const auto reason = static_cast<store::MissReason>(r);
    auto it = stats.misses_by_reason.find(reason);
    v1::MissCount* out = response->add_misses_by_reason();
    out->set_reason(MissReasonToProto(reason));
    out->set_count(it == stats.misses_by_reason.end() ? 0 : it->second);
  }
  response->set_models(stats.models);
  response->set_pinned_spans(stats.pinned_spans);
  response->set_uptime_s(absl::ToInt64Seconds(absl::Now() - start_time_));
  if (options_->stats_extension) options_->stats_extension(response);

  for (const RpcMethodMetrics::Snapshot& m : metrics_->Read()) {
    v1::RpcStats* out = response->add_rpcs();
    out->set_method(m.method);
    int64_t count = 0;
    for (int code = 0; code < 17; ++code) {
      if (m.calls_by_code[code] == 0) continue;
      count += m.calls_by_code[code];
      v1::CodeCount* c = out->add_codes();
      c->set_code(std::string(StatusCodeName(code)));
      c->set_count(m.calls_by_code[code]);
    }
    out->set_count(count);
    out->set_p50_us(m.latency.p50_us);
    out->set_p90_us(m.latency.p90_us);
    out->set_p99_us(m.latency.p99_us);
    out->set_max_us(m.latency.max_us);
    out->set_mean_us(m.latency.mean_us());
    out->set_payload_bytes(m.payload_bytes);
  }
  return scope.Finish(grpc::Status::OK);
}

grpc::Status AdminServiceImpl::GetConfig(grpc::ServerContext* context,
                                         const v1::GetConfigRequest* request,
                                         v1::GetConfigResponse* response) {
  RpcScope scope(get_config_metrics_);
  if (!scope.admitted()) return scope.Finish(RpcScope::Rejected());
  absl::StatusOr<Principal> caller = auth_->AuthenticatePrincipal(*context);
  if (!caller.ok()) return scope.Finish(ToGrpcStatus(caller.status()));
  // Every tenant may check versions and limits; the effective options (paths,
  // capacities, quotas) are for admins.
  if (caller->admin) {
    for (const auto& [name, value] : ServerOptionsToFlags(*options_)) {
      v1::ConfigEntry* entry = response->add_options();
      entry->set_name(name);
      entry->set_value(value);
    }
  }
  response->set_version(kKvrecallVersion);
  response->set_api_version("kvrecall.v1");
  response->set_span_hash_version("kvrecall.span.v1");
  response->set_max_message_bytes(options_->max_message_bytes);
  return scope.Finish(grpc::Status::OK);
}

}  // namespace kvrecall::rpc
