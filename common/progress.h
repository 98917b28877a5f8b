#pragma once

// Progress of a long operation (index build, bulk load, benchmark), reported
// through a callback that the operation calls from any of its threads.

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

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

// How a command line tool shows progress on stderr: a bar redrawn in place
// (an interactive terminal), one line per stage (a file, a pipe, a CI log),
// or nothing. Tables and results never go there: they go to stdout.
enum class ProgressMode { kBar, kLines, kNone };

// kBar when stderr is a terminal, else kLines.
ProgressMode StderrProgressMode();

// Shows the stages of a long computation on a stream in a ProgressMode:
//   kBar:   "label [######------------------]  25%  stage  3/12", redrawn at
//           most every 100 ms and whenever the stage changes;
//   kLines: "label:  25% stage (12 steps)", once per stage;
//   kNone:  nothing.
// Thread-safe (operations report from their worker threads).
class StageProgress {
 public:
  StageProgress(std::ostream* out, std::string label, ProgressMode mode);

  // Shows `p`. Returns true (never asks to cancel), so that it can serve as
  // a ProgressCallback: [&](const Progress& p) { return progress.Update(p); }.
  bool Update(const Progress& p);
  // Erases the bar from the terminal line (kBar), so that other output can
  // start on a clean line; the next Update draws it again.
  void Clear();
  // Draws the bar at 100% and ends its line (kBar; nothing otherwise).
  void Finish();

 private:
  void Draw(const Progress& p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::ostream* const out_;
  const std::string label_;
  const ProgressMode mode_;
  absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  std::string last_stage_ ABSL_GUARDED_BY(mu_);
  absl::Time last_draw_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  bool drawn_ ABSL_GUARDED_BY(mu_) = false;  // a bar is on the line now
  Progress last_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvrecall
