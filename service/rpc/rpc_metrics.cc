#include "service/rpc/rpc_metrics.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "service/rpc/grpc_status.h"

namespace kvrecall::rpc {
namespace {

std::string MethodLabel(const std::string& method) {
  return absl::StrCat("method=\"", method, "\"");
}

}  // namespace

bool CallGate::Enter() {
  absl::MutexLock lock(&mu_);
  if (draining_) return false;
  ++in_flight_;
  return true;
}

void CallGate::Exit() {
  absl::MutexLock lock(&mu_);
  --in_flight_;
}

void CallGate::StartDraining() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
}

bool CallGate::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

int64_t CallGate::AwaitDrained(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto drained = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return in_flight_ == 0; };
  mu_.AwaitWithDeadline(absl::Condition(&drained), deadline);
  return in_flight_;
}

int64_t CallGate::in_flight() const {
  absl::MutexLock lock(&mu_);
  return in_flight_;
}

RpcMethodMetrics::RpcMethodMetrics(std::string method, MetricsRegistry* registry, CallGate* gate)
    : method_(std::move(method)),
      registry_(registry),
      gate_(gate),
      latency_(registry->GetHistogram("kvrecall_rpc_latency_seconds", MethodLabel(method_))),
      payload_bytes_(
          registry->GetCounter("kvrecall_rpc_payload_bytes_total", MethodLabel(method_))) {}

Counter* RpcMethodMetrics::CodeCounter(int code) {
  if (code < 0 || code > 16) code = 2;  // UNKNOWN
  Counter* counter = calls_by_code_[code].load(std::memory_order_acquire);
  if (counter == nullptr) {
    // The registry returns the same counter for the same name and labels, so
    // two threads racing here store the same pointer.
    counter = registry_->GetCounter(
        "kvrecall_rpc_calls_total",
        absl::StrCat("code=\"", StatusCodeName(code), "\",", MethodLabel(method_)));
    calls_by_code_[code].store(counter, std::memory_order_release);
  }
  return counter;
}

void RpcMethodMetrics::Record(int code, absl::Duration latency) {
  latency_->Record(absl::ToDoubleMicroseconds(latency));
  CodeCounter(code)->Increment();
}

RpcMethodMetrics::Snapshot RpcMethodMetrics::Read() const {
  Snapshot s;
  s.method = method_;
  s.latency = latency_->Read();
  for (int code = 0; code < 17; ++code) {
    const Counter* c = calls_by_code_[code].load(std::memory_order_acquire);
    s.calls_by_code[code] = c == nullptr ? 0 : c->value();
  }
  s.payload_bytes = payload_bytes_->value();
  return s;
}

RpcMethodMetrics* RpcMetrics::Register(const std::string& method) {
  absl::MutexLock lock(&mu_);
  for (const auto& m : methods_) {
    if (m->method() == method) return m.get();
  }
  methods_.push_back(std::make_unique<RpcMethodMetrics>(method, registry_, &gate_));
  return methods_.back().get();
}

std::vector<RpcMethodMetrics::Snapshot> RpcMetrics::Read() const {
  std::vector<RpcMethodMetrics::Snapshot> out;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& m : methods_) out.push_back(m->Read());
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.method < b.method; });
  return out;
}

}  // namespace kvrecall::rpc
