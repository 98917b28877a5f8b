#pragma once

// MetricsHttpServer: serves a MetricsRegistry as Prometheus text on
// GET /metrics (cpp-httplib), from its own small thread pool.

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "common/metrics.h"

namespace httplib {
class Server;
}

namespace kvrecall::rpc {

// Thread-safe.
class MetricsHttpServer {
 public:
  // Binds host:port (port 0 picks a free port) and starts serving.
  // `registry` is not owned and must outlive the server.
  // UNAVAILABLE when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& host,
                                                                   int port,
                                                                   const MetricsRegistry* registry);
  // Stops serving and joins the thread.
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }

 private:
  MetricsHttpServer() = default;

  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace kvrecall::rpc
