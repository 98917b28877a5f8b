#pragma once

// Counters and latency histograms, registered by name, exported as
// Prometheus text and read by Admin.Stats. Recording is lock-free.

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace kvrecall {

// A monotonically increasing count. Thread-safe.
class Counter {
 public:
  void Increment(int64_t n = 1) { value_.fetch_add(n, std::memory_order_relaxed); }
  int64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> value_{0};
};

// A value that goes up and down (bytes held, spans stored). Thread-safe.
class Gauge {
 public:
  void Set(int64_t v) { value_.store(v, std::memory_order_relaxed); }
  void Add(int64_t n) { value_.fetch_add(n, std::memory_order_relaxed); }
  int64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> value_{0};
};

// Latencies in microseconds in log-spaced buckets (8 per power of two, from
// 1 us to about 1.2 hours); percentiles are accurate to about 9%.
// Thread-safe.
class LatencyHistogram {
 public:
  static constexpr int kBucketsPerOctave = 8;
  static constexpr int kNumBuckets = 32 * kBucketsPerOctave;

  struct Snapshot {
    int64_t count = 0;
    double sum_us = 0;
    double max_us = 0;
    double p50_us = 0;
    double p90_us = 0;
    double p99_us = 0;
    double p999_us = 0;
    double mean_us() const { return count == 0 ? 0 : sum_us / count; }
  };

  void Record(double micros);
  Snapshot Read() const;
  // Upper edge of bucket i in microseconds.
  static double BucketUpperUs(int i);

 private:
  static int BucketFor(double micros);
  std::array<std::atomic<int64_t>, kNumBuckets> buckets_{};
  std::atomic<int64_t> count_{0};
  std::atomic<int64_t> sum_ns_{0};
  std::atomic<int64_t> max_ns_{0};
};

// Owns every metric of a process, keyed by name plus an optional label set
// written as Prometheus labels ("code=\"OK\",rpc=\"PutSpans\""). Returned
// pointers stay valid for the registry's lifetime. Thread-safe.
class MetricsRegistry {
 public:
  Counter* GetCounter(absl::string_view name, absl::string_view labels = "");
  Gauge* GetGauge(absl::string_view name, absl::string_view labels = "");
  LatencyHistogram* GetHistogram(absl::string_view name, absl::string_view labels = "");

  // Prometheus text exposition format (version 0.0.4). Histograms are written
  // as summaries with quantiles 0.5, 0.9, 0.99 in seconds.
  std::string PrometheusText() const;

  // Visits metrics in name/label order.
  struct CounterEntry {
    std::string name, labels;
    int64_t value;
  };
  struct HistogramEntry {
    std::string name, labels;
    LatencyHistogram::Snapshot snapshot;
  };
  std::vector<CounterEntry> Counters() const;
  std::vector<CounterEntry> Gauges() const;
  std::vector<HistogramEntry> Histograms() const;

 private:
  using Key = std::pair<std::string, std::string>;
  mutable absl::Mutex mu_;
  std::map<Key, std::unique_ptr<Counter>> counters_ ABSL_GUARDED_BY(mu_);
  std::map<Key, std::unique_ptr<Gauge>> gauges_ ABSL_GUARDED_BY(mu_);
  std::map<Key, std::unique_ptr<LatencyHistogram>> histograms_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvrecall
