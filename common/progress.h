#pragma once

// Progress of a long operation (index build, bulk load, benchmark), reported
// through a callback that the operation calls from any of its threads.

#include <cstdint>
#include <functional>
#include <string>

namespace kvrecall {

struct Progress {
  std::string stage;    // what is running now, e.g. "knn", "projection", "connectivity"
  int64_t done = 0;     // units finished in this stage
  int64_t total = 0;    // units in this stage (0 when unknown)
  double fraction = 0;  // of the whole operation, 0..1
};

// Called with monotonically non-decreasing `fraction`. May be called from
// worker threads; must be cheap and thread-safe. Return false to request
// cancellation (the operation then stops early with CANCELLED).
using ProgressCallback = std::function<bool(const Progress&)>;

}  // namespace kvrecall
