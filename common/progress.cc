#include "common/progress.h"

#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace kvrecall {

ProgressMode StderrProgressMode() {
  return ::isatty(STDERR_FILENO) == 1 ? ProgressMode::kBar : ProgressMode::kLines;
}

StageProgress::StageProgress(std::ostream* out, std::string label, ProgressMode mode)
    : out_(out), label_(std::move(label)), mode_(mode) {}

bool StageProgress::Update(const Progress& p) {
  absl::MutexLock lock(&mu_);
  const bool new_stage = !started_ || p.stage != last_stage_;
  started_ = true;
  last_stage_ = p.stage;
  last_ = p;
  switch (mode_) {
    case ProgressMode::kLines:
      if (new_stage) {
        *out_ << absl::StrFormat("%s: %3d%% %s%s\n", label_,
                                 static_cast<int>(100 * std::clamp(p.fraction, 0.0, 1.0)),
                                 p.stage,
                                 p.total > 0 ? absl::StrCat(" (", p.total, " steps)") : "")
              << std::flush;
      }
      break;
    case ProgressMode::kBar: {
      const absl::Time now = absl::Now();
      if (new_stage || now - last_draw_ >= absl::Milliseconds(100)) {
        last_draw_ = now;
        Draw(p);
      }
      break;
    }
    case ProgressMode::kNone:
      break;
  }
  return true;
}

void StageProgress::Clear() {
  absl::MutexLock lock(&mu_);
  if (mode_ != ProgressMode::kBar || !drawn_) return;
  *out_ << "\r\x1b[K" << std::flush;
  drawn_ = false;
  last_draw_ = absl::InfinitePast();
}

void StageProgress::Finish() {
  absl::MutexLock lock(&mu_);
  if (mode_ != ProgressMode::kBar || !started_) return;
  last_.fraction = 1.0;
  if (last_.total > 0) last_.done = last_.total;
  Draw(last_);
  *out_ << "\n" << std::flush;
  drawn_ = false;
}

void StageProgress::Draw(const Progress& p) {
  constexpr int kWidth = 24;
  const double fraction = std::clamp(p.fraction, 0.0, 1.0);
  const int filled = static_cast<int>(fraction * kWidth);
  *out_ << absl::StrFormat("\r%s [%s%s] %3d%%  %s", label_, std::string(filled, '#'),
                           std::string(kWidth - filled, '-'), static_cast<int>(100 * fraction),
                           p.stage)
        << (p.total > 0 ? absl::StrFormat("  %d/%d", p.done, p.total) : "") << "\x1b[K"
        << std::flush;
  drawn_ = true;
}

}  // namespace kvrecall
