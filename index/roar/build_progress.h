#pragma once

// Progress of a multi-stage parallel build: each stage has a weight (its
// share of the whole), workers report units done, and the callback sees a
// monotonically non-decreasing fraction. A callback returning false cancels:
// cancelled() turns true and workers stop taking new work. Thread-safe.

#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/progress.h"

namespace kvrecall::index::roar {

class StageProgress {
 public:
  // stages: (name, weight); weights are normalised to sum to 1.
  StageProgress(ProgressCallback callback, std::vector<std::pair<std::string, double>> stages);

  // Adds `units` done to stage `stage` (of `total` units) and reports.
  // Returns false once the build is cancelled.
  bool Advance(int stage, int64_t units, int64_t total);
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }

 private:
  ProgressCallback callback_;
  std::vector<std::pair<std::string, double>> stages_;
  std::vector<double> start_;  // fraction at which each stage begins
  std::atomic<bool> cancelled_{false};
  absl::Mutex mu_;
  std::vector<int64_t> done_ ABSL_GUARDED_BY(mu_);
  double last_fraction_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvrecall::index::roar
