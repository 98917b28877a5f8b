#include "service/rpc/metrics_http.h"

#include <exception>

#include <httplib.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"

namespace kvrecall::rpc {

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& host, int port, const MetricsRegistry* registry) {
  std::unique_ptr<MetricsHttpServer> self(new MetricsHttpServer());
  try {
    self->server_ = std::make_unique<httplib::Server>();
    self->server_->new_task_queue = [] { return new httplib::ThreadPool(2); };
    self->server_->Get("/metrics", [registry](const httplib::Request&, httplib::Response& res) {
      res.set_content(registry->PrometheusText(), "text/plain; version=0.0.4");
    });
    self->server_->Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("kvrecalld: metrics at /metrics\n", "text/plain");
    });
    if (port == 0) {
      self->port_ = self->server_->bind_to_any_port(host);
      if (self->port_ <= 0) {
        return absl::UnavailableError(absl::StrCat("metrics: cannot bind ", host, ":0"));
      }
    } else {
      if (!self->server_->bind_to_port(host, port)) {
        return absl::UnavailableError(absl::StrCat("metrics: cannot bind ", host, ":", port,
                                                   " (--metrics_port)"));
      }
      self->port_ = port;
    }
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("metrics: ", e.what()));
  }
  httplib::Server* server = self->server_.get();
  self->thread_ = std::thread([server] {
    try {
      if (!server->listen_after_bind()) KVR_LOG(ERROR) << "metrics HTTP server stopped";
    } catch (const std::exception& e) {
      KVR_LOG(ERROR) << "metrics HTTP server: " << e.what();
    }
  });
  // stop() is a no-op before the listening loop runs, so wait for it.
  for (int i = 0; i < 5000 && !server->is_running(); ++i) absl::SleepFor(absl::Milliseconds(1));
  return self;
}

MetricsHttpServer::~MetricsHttpServer() {
  if (server_ != nullptr) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace kvrecall::rpc
