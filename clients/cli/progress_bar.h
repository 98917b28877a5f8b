#pragma once

// A one-line progress bar on a terminal stream (stderr) for bulk transfers:
//   put [##########----------]  50%  128.0/256.0 MiB  812.4 MiB/s
// Redrawn at most every 100 ms; Finish() prints the final line. Disabled
// bars print nothing.

#include <cstdint>
#include <ostream>
#include <string>

#include "absl/time/time.h"

namespace kvrecall::cli {

// Not thread-safe.
class ProgressBar {
 public:
  ProgressBar(std::ostream* out, std::string label, int64_t total_bytes, bool enabled);

  // `done_bytes` so far (never decreasing).
  void Update(int64_t done_bytes);
  // Draws 100% (or the last value) and ends the line.
  void Finish();

 private:
  void Draw(bool final);

  std::ostream* const out_;
  const std::string label_;
  const int64_t total_bytes_;
  const bool enabled_;
  const absl::Time start_;
  absl::Time last_draw_ = absl::InfinitePast();
  int64_t done_bytes_ = 0;
  bool finished_ = false;
};

}  // namespace kvrecall::cli
