#include "common/metrics.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace kvrecall {

int LatencyHistogram::BucketFor(double micros) {
  if (!(micros > 1.0)) return 0;
  const int b = static_cast<int>(std::ceil(std::log2(micros) * kBucketsPerOctave));
  return std::clamp(b, 0, kNumBuckets - 1);
}

double LatencyHistogram::BucketUpperUs(int i) {
  return std::exp2(static_cast<double>(i) / kBucketsPerOctave);
}

void LatencyHistogram::Record(double micros) {
  if (!(micros >= 0)) micros = 0;
  buckets_[BucketFor(micros)].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  const int64_t ns = static_cast<int64_t>(micros * 1000.0);
  sum_ns_.fetch_add(ns, std::memory_order_relaxed);
  int64_t prev = max_ns_.load(std::memory_order_relaxed);
  while (ns > prev && !max_ns_.compare_exchange_weak(prev, ns, std::memory_order_relaxed)) {
  }
}

LatencyHistogram::Snapshot LatencyHistogram::Read() const {
  Snapshot s;
  std::array<int64_t, kNumBuckets> counts;
  int64_t total = 0;
  for (int i = 0; i < kNumBuckets; ++i) {
    counts[i] = buckets_[i].load(std::memory_order_relaxed);
    total += counts[i];
  }
  s.count = total;
  s.sum_us = sum_ns_.load(std::memory_order_relaxed) / 1000.0;
  s.max_us = max_ns_.load(std::memory_order_relaxed) / 1000.0;
  if (total == 0) return s;
  auto quantile = [&](double q) {
    const double rank = q * static_cast<double>(total);
    int64_t seen = 0;
    for (int i = 0; i < kNumBuckets; ++i) {
      seen += counts[i];
      if (static_cast<double>(seen) >= rank && counts[i] > 0) {
        return std::min(BucketUpperUs(i), s.max_us);
      }
    }
    return s.max_us;
  };
  s.p50_us = quantile(0.5);
  s.p90_us = quantile(0.9);
  s.p99_us = quantile(0.99);
  s.p999_us = quantile(0.999);
  return s;
}

namespace {

template <typename T>
T* GetOrCreate(std::map<std::pair<std::string, std::string>, std::unique_ptr<T>>* map,
               absl::string_view name, absl::string_view labels) {
  auto& slot = (*map)[{std::string(name), std::string(labels)}];
  if (slot == nullptr) slot = std::make_unique<T>();
  return slot.get();
}

std::string Series(const std::string& name, const std::string& labels,
                   absl::string_view extra = "") {
  std::string all = labels;
  if (!extra.empty()) {
    if (!all.empty()) all += ",";
    absl::StrAppend(&all, extra);
  }
  return all.empty() ? name : absl::StrCat(name, "{", all, "}");
}

}  // namespace

Counter* MetricsRegistry::GetCounter(absl::string_view name, absl::string_view labels) {
  absl::MutexLock lock(&mu_);
  return GetOrCreate(&counters_, name, labels);
}

Gauge* MetricsRegistry::GetGauge(absl::string_view name, absl::string_view labels) {
  absl::MutexLock lock(&mu_);
  return GetOrCreate(&gauges_, name, labels);
}

LatencyHistogram* MetricsRegistry::GetHistogram(absl::string_view name,
                                                absl::string_view labels) {
  absl::MutexLock lock(&mu_);
  return GetOrCreate(&histograms_, name, labels);
}

std::vector<MetricsRegistry::CounterEntry> MetricsRegistry::Counters() const {
  absl::MutexLock lock(&mu_);
  std::vector<CounterEntry> out;
  for (const auto& [key, c] : counters_) out.push_back({key.first, key.second, c->value()});
  return out;
}

std::vector<MetricsRegistry::CounterEntry> MetricsRegistry::Gauges() const {
  absl::MutexLock lock(&mu_);
  std::vector<CounterEntry> out;
  for (const auto& [key, g] : gauges_) out.push_back({key.first, key.second, g->value()});
  return out;
}

std::vector<MetricsRegistry::HistogramEntry> MetricsRegistry::Histograms() const {
  absl::MutexLock lock(&mu_);
  std::vector<HistogramEntry> out;
  for (const auto& [key, h] : histograms_) out.push_back({key.first, key.second, h->Read()});
  return out;
}

std::string MetricsRegistry::PrometheusText() const {
  std::string out;
  std::string last;
  for (const CounterEntry& c : Counters()) {
    if (c.name != last) absl::StrAppend(&out, "# TYPE ", c.name, " counter\n");
    last = c.name;
    absl::StrAppend(&out, Series(c.name, c.labels), " ", c.value, "\n");
  }
  last.clear();
  for (const CounterEntry& g : Gauges()) {
    if (g.name != last) absl::StrAppend(&out, "# TYPE ", g.name, " gauge\n");
    last = g.name;
    absl::StrAppend(&out, Series(g.name, g.labels), " ", g.value, "\n");
  }
  last.clear();
  for (const HistogramEntry& h : Histograms()) {
    if (h.name != last) absl::StrAppend(&out, "# TYPE ", h.name, " summary\n");
    last = h.name;
    const auto& s = h.snapshot;
    absl::StrAppend(&out, Series(h.name, h.labels, "quantile=\"0.5\""), " ", s.p50_us / 1e6, "\n");
    absl::StrAppend(&out, Series(h.name, h.labels, "quantile=\"0.9\""), " ", s.p90_us / 1e6, "\n");
    absl::StrAppend(&out, Series(h.name, h.labels, "quantile=\"0.99\""), " ", s.p99_us / 1e6,
                    "\n");
    absl::StrAppend(&out, Series(h.name + "_sum", h.labels), " ", s.sum_us / 1e6, "\n");
    absl::StrAppend(&out, Series(h.name + "_count", h.labels), " ", s.count, "\n");
  }
  return out;
}

}  // namespace kvrecall
