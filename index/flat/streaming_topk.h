#pragma once

// StreamingTopK: the k best (score, id) pairs of a stream, for scans that
// see many more candidates than k. Candidates at or above the threshold are
// appended to a buffer; when it holds `capacity` pairs, the threshold rises
// to a value t that at least k buffered scores reach (found by bisection
// with vectorised counting, no data-dependent branches) and the buffer keeps
// only the scores >= t. Amortised O(1) per admitted candidate.
//
// The result is that of TopK (index/distance.h): larger score first, the
// smaller id on equal scores. Not thread-safe.

#include <cstdint>
#include <vector>

namespace kvrecall::index {

// Number of scores[i] >= t for i < m (vectorised).
int64_t CountAtLeast(const float* scores, int64_t m, float t);

// A value t with CountAtLeast(scores, m, t) >= k, as large as 12 bisection
// steps over [min, max] of the scores find. REQUIRES: 1 <= k <= m, no NaN.
//   scores: [m] f32
float KthLargestLowerBound(const float* scores, int64_t m, int32_t k);

class StreamingTopK {
 public:
  // REQUIRES: k >= 1.
  explicit StreamingTopK(int32_t k);

  int32_t k() const { return k_; }
  // Candidates below it cannot enter the top k.
  float threshold() const { return threshold_; }

  // Raises the threshold to t. REQUIRES: at least k candidates with score
  // >= t have been or will be pushed (e.g. t = KthLargestLowerBound of a
  // block about to be pushed), so that no member of the top k is dropped.
  void RaiseThreshold(float t) {
    if (t > threshold_) threshold_ = t;
  }

  void Push(float score, int64_t id) {
    if (!(score >= threshold_)) return;  // also drops NaN
    scores_.push_back(score);
    ids_.push_back(id);
    if (static_cast<int64_t>(scores_.size()) >= capacity_) Compact();
  }

  // Writes the k best in descending order into ids[0..k) / scores[0..k),
  // padding with -1 / -inf; resets the collector.
  void Drain(int64_t* ids, float* scores);

 private:
  void Compact();
  // Keeps the entries with score >= t.
  void Filter(float t);

  int32_t k_;
  int64_t capacity_;
  float threshold_;
  std::vector<float> scores_;
  std::vector<int64_t> ids_;
};

}  // namespace kvrecall::index
