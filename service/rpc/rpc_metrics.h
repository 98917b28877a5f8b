#pragma once

// Per-RPC counters and latency histograms, registered in the daemon's
// MetricsRegistry (so Prometheus sees them) and read back by Admin.Stats.
//
//   RpcMethodMetrics* m = rpc_metrics->Register("kvrecall.v1.KvStore/Lookup");
//   RpcScope scope(m);
//   ...
//   return scope.Finish(status);

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include <grpcpp/support/status.h>

namespace kvrecall::rpc {

// Counts the calls in flight and, once draining starts (graceful shutdown),
// turns new calls away so that the in-flight ones can finish. Thread-safe.
class CallGate {
 public:
  // Admits a call; false once draining (the call must fail UNAVAILABLE).
  bool Enter() ABSL_LOCKS_EXCLUDED(mu_);
  void Exit() ABSL_LOCKS_EXCLUDED(mu_);
  void StartDraining() ABSL_LOCKS_EXCLUDED(mu_);
  // Whether draining started (long-lived streams end themselves then).
  bool draining() const ABSL_LOCKS_EXCLUDED(mu_);
  // Waits until no admitted call is in flight or `deadline` passes; returns
  // the number still in flight (0: drained).
  int64_t AwaitDrained(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);
  int64_t in_flight() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  mutable absl::Mutex mu_;
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

// Metrics of one method. Thread-safe.
class RpcMethodMetrics {
 public:
  RpcMethodMetrics(std::string method, MetricsRegistry* registry, CallGate* gate);

  CallGate* gate() const { return gate_; }

  const std::string& method() const { return method_; }
  void Record(int code, absl::Duration latency);
  void AddPayloadBytes(int64_t n) { payload_bytes_->Increment(n); }

  struct Snapshot {
    std::string method;
    LatencyHistogram::Snapshot latency;
    std::array<int64_t, 17> calls_by_code{};
    int64_t payload_bytes = 0;
  };
  Snapshot Read() const;

 private:
  Counter* CodeCounter(int code);

  const std::string method_;
  MetricsRegistry* const registry_;
  CallGate* const gate_;
  LatencyHistogram* const latency_;
  Counter* const payload_bytes_;
  std::array<std::atomic<Counter*>, 17> calls_by_code_{};  // created on first use
};

// The methods of one daemon. Thread-safe.
class RpcMetrics {
 public:
  // `registry` is not owned and must outlive this object.
  explicit RpcMetrics(MetricsRegistry* registry) : registry_(registry) {}

  // Returns the metrics of `method` ("package.Service/Method"), creating them
  // once. The pointer stays valid for this object's lifetime.
  RpcMethodMetrics* Register(const std::string& method) ABSL_LOCKS_EXCLUDED(mu_);
  // The gate every call of these methods passes (RpcScope).
  CallGate* gate() { return &gate_; }
  // Snapshots of every registered method, in method order.
  std::vector<RpcMethodMetrics::Snapshot> Read() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  MetricsRegistry* const registry_;
  CallGate gate_;
  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<RpcMethodMetrics>> methods_ ABSL_GUARDED_BY(mu_);
};

// Times one call, records its final code and holds its place in the
// CallGate. A call that was not admitted() must return Finish(Rejected()).
// Not thread-safe (one per call).
class RpcScope {
 public:
  explicit RpcScope(RpcMethodMetrics* metrics)
      : metrics_(metrics), start_(absl::Now()), admitted_(metrics->gate()->Enter()) {}
  ~RpcScope() {
    if (admitted_) metrics_->gate()->Exit();
  }
  RpcScope(const RpcScope&) = delete;
  RpcScope& operator=(const RpcScope&) = delete;

  // False when the daemon is shutting down.
  bool admitted() const { return admitted_; }
  static grpc::Status Rejected() {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "kvrecalld is shutting down; retry");
  }

  // Records `status` and the elapsed time; returns `status`.
  grpc::Status Finish(grpc::Status status) {
    metrics_->Record(static_cast<int>(status.error_code()), absl::Now() - start_);
    return status;
  }
  RpcMethodMetrics* metrics() const { return metrics_; }

 private:
  RpcMethodMetrics* const metrics_;
  const absl::Time start_;
  const bool admitted_;
};

}  // namespace kvrecall::rpc
