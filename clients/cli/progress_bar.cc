#include "clients/cli/progress_bar.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace kvrecall::cli {

ProgressBar::ProgressBar(std::ostream* out, std::string label, int64_t total_bytes, bool enabled)
    : out_(out),
      label_(std::move(label)),
      total_bytes_(total_bytes),
      enabled_(enabled),
      start_(absl::Now()) {}

void ProgressBar::Update(int64_t done_bytes) {
  done_bytes_ = std::max(done_bytes_, done_bytes);
  if (!enabled_) return;
  const absl::Time now = absl::Now();
  if (now - last_draw_ < absl::Milliseconds(100)) return;
  last_draw_ = now;
  Draw(false);
}

void ProgressBar::Finish() {
  if (finished_) return;
  finished_ = true;
  if (total_bytes_ > 0) done_bytes_ = std::max(done_bytes_, total_bytes_);
  if (enabled_) Draw(true);
}

void ProgressBar::Draw(bool final) {
  constexpr int kWidth = 24;
  const double mib = 1024.0 * 1024.0;
  const double seconds = std::max(1e-6, absl::ToDoubleSeconds(absl::Now() - start_));
  const double rate = done_bytes_ / mib / seconds;
  std::string line;
  if (total_bytes_ > 0) {
    const double fraction = std::min(1.0, static_cast<double>(done_bytes_) / total_bytes_);
    const int filled = static_cast<int>(fraction * kWidth);
    line = absl::StrFormat("\r%s [%s%s] %3d%%  %.1f/%.1f MiB  %.1f MiB/s", label_,
                           std::string(filled, '#'), std::string(kWidth - filled, '-'),
                           static_cast<int>(fraction * 100), done_bytes_ / mib,
                           total_bytes_ / mib, rate);
  } else {
    line = absl::StrFormat("\r%s %.1f MiB  %.1f MiB/s", label_, done_bytes_ / mib, rate);
  }
  *out_ << line << (final ? "\n" : "") << std::flush;
}

}  // namespace kvrecall::cli
