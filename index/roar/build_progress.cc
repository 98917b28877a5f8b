#include "index/roar/build_progress.h"

#include <algorithm>

namespace kvrecall::index::roar {

StageProgress::StageProgress(ProgressCallback callback,
                             std::vector<std::pair<std::string, double>> stages)
    : callback_(std::move(callback)), stages_(std::move(stages)) {
  double total = 0;
  for (const auto& s : stages_) total += s.second;
  double at = 0;
  for (auto& s : stages_) {
    s.second = total > 0 ? s.second / total : 0;
    start_.push_back(at);
    at += s.second;
  }
  absl::MutexLock lock(&mu_);
  done_.assign(stages_.size(), 0);
}

bool StageProgress::Advance(int stage, int64_t units, int64_t total) {
  if (cancelled()) return false;
  if (!callback_) return true;
  absl::MutexLock lock(&mu_);
  done_[stage] = std::min(total, done_[stage] + units);
  Progress p;
  p.stage = stages_[stage].first;
  p.done = done_[stage];
  p.total = total;
  const double within = total > 0 ? static_cast<double>(p.done) / static_cast<double>(total) : 1;
  last_fraction_ = std::max(last_fraction_, start_[stage] + stages_[stage].second * within);
  p.fraction = std::min(1.0, last_fraction_);
  if (!callback_(p)) {
    cancelled_.store(true, std::memory_order_relaxed);
    return false;
  }
  return true;
}

}  // namespace kvrecall::index::roar
