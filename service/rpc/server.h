#pragma once

// Server: the gRPC server of kvrecalld. Opens the span store, serves
// kvrecall.v1.KvStore and kvrecall.v1.Admin, the standard health service
// (grpc.health.v1.Health) and server reflection, plus any additional services
// (the seam for kvrecall.v1.Retrieval and later ones), and optionally
// Prometheus metrics over HTTP.
//
//   KVR_ASSIGN_OR_RETURN(auto server, Server::Create(options, &store::TieredStore::Open));
//   ... wait for a signal ...
//   KVR_RETURN_IF_ERROR(server->Shutdown(absl::Seconds(10)));
//
// Thread-safe.

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "service/rpc/inflight_limiter.h"
#include "service/rpc/rpc_metrics.h"
#include "service/rpc/server_options.h"
#include "service/rpc/tenant_auth.h"
#include "service/store/tiered_store.h"
#include <grpcpp/channel.h>
#include <grpcpp/server.h>

namespace kvrecall::rpc {

class MetricsHttpServer;

// What an additional service gets to work with. All pointers outlive the
// service (the Server destroys services after the gRPC server stops and
// before the store closes).
struct ServiceContext {
  store::TieredStore* store = nullptr;
  MetricsRegistry* metrics = nullptr;
  RpcMetrics* rpc_metrics = nullptr;  // register methods here for Admin.Stats
  const TenantAuthenticator* auth = nullptr;
  const ServerOptions* options = nullptr;
  InflightLimiter* limiter = nullptr;  // the daemon-wide bound on buffered request bytes
};

// Builds one additional gRPC service (e.g. kvrecall.v1.Retrieval).
using ServiceFactory =
    std::function<absl::StatusOr<std::unique_ptr<grpc::Service>>(const ServiceContext&)>;

// Opens the span store; production passes &store::TieredStore::Open.
using StoreOpener = std::function<absl::StatusOr<std::unique_ptr<store::TieredStore>>(
    const store::TieredStoreOptions&)>;

// The running gRPC server of kvrecalld and everything it owns (store,
// services, metrics). Thread-safe.
class Server {
 public:
  // Validates `options` (refusing to listen beyond loopback without TLS and
  // a tenants file unless options.insecure), reads the tenants file, opens the store through
  // `open_store` (with this server's metrics registry), builds the services
  // and starts listening on options.listen_address (port 0 picks a free
  // port). Writes options.port_file when set. INVALID_ARGUMENT for bad
  // options, UNAVAILABLE when the address cannot be bound, and the store's
  // errors.
  static absl::StatusOr<std::unique_ptr<Server>> Create(
      const ServerOptions& options, const StoreOpener& open_store,
      const std::vector<ServiceFactory>& additional_services = {});

  // Shuts down (with a zero grace period) if Shutdown() was not called.
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The bound gRPC port.
  int port() const { return port_; }
  // "host:port" clients can dial.
  std::string address() const;
  // The bound metrics HTTP port, 0 when disabled.
  int metrics_port() const;
  const ServerOptions& options() const { return options_; }
  // RPCs of the kvrecall services running now.
  int64_t in_flight_calls() const { return rpc_metrics_->gate()->in_flight(); }
  // Streaming calls being served now (bounded by --max_concurrent_streams).
  int64_t streams_in_flight() const { return limiter_->streams(); }
  store::TieredStore* store() const { return store_.get(); }
  MetricsRegistry* metrics() const { return metrics_.get(); }

  // A channel to this server that bypasses the network (tests, in-process
  // engines). Carries the same message size limits.
  std::shared_ptr<grpc::Channel> InProcessChannel();

  // Graceful shutdown: marks the health service NOT_SERVING, turns new calls
  // away with UNAVAILABLE (clients retry), lets the calls in flight finish
  // for up to `grace` (then cancels them), closes the connections, syncs the
  // store's files and stops the metrics endpoint. Returns the store's Sync()
  // status. Idempotent: later calls return OK at once.
  absl::Status Shutdown(absl::Duration grace) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  Server() = default;

  ServerOptions options_;
  std::unique_ptr<MetricsRegistry> metrics_;
  std::unique_ptr<RpcMetrics> rpc_metrics_;
  std::unique_ptr<TenantAuthenticator> auth_;
  std::unique_ptr<InflightLimiter> limiter_;
  std::unique_ptr<store::TieredStore> store_;
  std::vector<std::unique_ptr<grpc::Service>> services_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  std::string host_;
  int port_ = 0;

  absl::Mutex mu_;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace kvrecall::rpc
