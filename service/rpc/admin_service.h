#pragma once

// AdminServiceImpl: the kvrecall.v1.Admin service (Stats, GetConfig).

#include "absl/time/time.h"
#include "kvrecall/v1/admin.grpc.pb.h"
#include "service/rpc/rpc_metrics.h"
#include "service/rpc/server_options.h"
#include "service/rpc/tenant_auth.h"
#include "service/store/tiered_store.h"

namespace kvrecall::rpc {

// The daemon's version, reported by GetConfig.
inline constexpr char kKvrecallVersion[] = "0.1.0";

// Thread-safe.
class AdminServiceImpl final : public v1::Admin::Service {
 public:
  // None of the pointers is owned; all must outlive the service.
  AdminServiceImpl(const store::TieredStore* store, const TenantAuthenticator* auth,
                   RpcMetrics* metrics, const ServerOptions* options, absl::Time start_time);

  grpc::Status Stats(grpc::ServerContext* context, const v1::StatsRequest* request,
                     v1::StatsResponse* response) override;
  grpc::Status GetConfig(grpc::ServerContext* context, const v1::GetConfigRequest* request,
                         v1::GetConfigResponse* response) override;

 private:
  const store::TieredStore* const store_;
  const TenantAuthenticator* const auth_;
  RpcMetrics* const metrics_;
  const ServerOptions* const options_;
  const absl::Time start_time_;
  RpcMethodMetrics* const stats_metrics_;
  RpcMethodMetrics* const get_config_metrics_;
};

}  // namespace kvrecall::rpc
