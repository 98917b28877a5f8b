#include "index/flat/streaming_topk.h"

// GCC 12's avx512fintrin.h trips -Wuninitialized on its own _mm512_undefined
// helpers (GCC bug 105593); the warning is about the header, not this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "common/half.h"

namespace kvrecall::index {
namespace {

__attribute__((target("avx512f"))) int64_t CountAvx512(const float* s, int64_t m, float t) {
  const __m512 tv = _mm512_set1_ps(t);
  int64_t count = 0, i = 0;
  for (; i + 16 <= m; i += 16) {
    count += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), tv, _CMP_GE_OQ));
  }
  for (; i < m; ++i) count += s[i] >= t;
  return count;
}

__attribute__((target("avx2"))) int64_t CountAvx2(const float* s, int64_t m, float t) {
  const __m256 tv = _mm256_set1_ps(t);
  int64_t count = 0, i = 0;
  for (; i + 8 <= m; i += 8) {
    count += __builtin_popcount(
        static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + i), tv,
                                                               _CMP_GE_OQ))));
  }
  for (; i < m; ++i) count += s[i] >= t;
  return count;
}

__attribute__((target("avx512f"))) void MinMaxAvx512(const float* s, int64_t m, float* lo,
                                                     float* hi) {
  __m512 vlo = _mm512_set1_ps(s[0]), vhi = vlo;
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    const __m512 v = _mm512_loadu_ps(s + i);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
  }
  float l = _mm512_reduce_min_ps(vlo), h = _mm512_reduce_max_ps(vhi);
  for (; i < m; ++i) {
    l = std::min(l, s[i]);
    h = std::max(h, s[i]);
  }
  *lo = l;
  *hi = h;
}

void MinMax(const float* s, int64_t m, float* lo, float* hi) {
  static const bool avx512 = CpuHasAvx512f();
  if (avx512) return MinMaxAvx512(s, m, lo, hi);
  float l = s[0], h = s[0];
  for (int64_t i = 1; i < m; ++i) {
    l = std::min(l, s[i]);
    h = std::max(h, s[i]);
  }
  *lo = l;
  *hi = h;
}

}  // namespace

int64_t CountAtLeast(const float* scores, int64_t m, float t) {
  static const int path = CpuHasAvx512f() ? 2 : CpuHasAvx2F16c() ? 1 : 0;
  if (path == 2) return CountAvx512(scores, m, t);
  if (path == 1) return CountAvx2(scores, m, t);
  int64_t count = 0;
  for (int64_t i = 0; i < m; ++i) count += scores[i] >= t;
  return count;
}

float KthLargestLowerBound(const float* scores, int64_t m, int32_t k) {
  float lo, hi;
  MinMax(scores, m, &lo, &hi);  // count(>= lo) = m >= k
  if (k == 1) return hi;
  for (int step = 0; step < 12 && lo < hi; ++step) {
    const float mid = lo + (hi - lo) * 0.5f;
    if (mid <= lo || mid >= hi) break;
    if (CountAtLeast(scores, m, mid) >= k) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

StreamingTopK::StreamingTopK(int32_t k)
    : k_(k),
      capacity_(std::max<int64_t>(2 * int64_t{k}, k + 64)),
      threshold_(-std::numeric_limits<float>::infinity()) {}

void StreamingTopK::Compact() {
  const float t = KthLargestLowerBound(scores_.data(), static_cast<int64_t>(scores_.size()), k_);
  Filter(t);
  threshold_ = t;
  // Many equal scores can leave more than capacity/2 entries; grow then.
  if (static_cast<int64_t>(scores_.size()) * 2 > capacity_) {
    capacity_ = 2 * static_cast<int64_t>(scores_.size());
  }
}

void StreamingTopK::Filter(float t) {
  size_t w = 0;
  for (size_t i = 0; i < scores_.size(); ++i) {
    scores_[w] = scores_[i];
    ids_[w] = ids_[i];
    w += scores_[i] >= t;
  }
  scores_.resize(w);
  ids_.resize(w);
}

void StreamingTopK::Drain(int64_t* ids, float* scores) {
  if (static_cast<int64_t>(scores_.size()) > k_) {
    Filter(KthLargestLowerBound(scores_.data(), static_cast<int64_t>(scores_.size()), k_));
  }
  std::vector<std::pair<float, int64_t>> entries(scores_.size());
  for (size_t i = 0; i < entries.size(); ++i) entries[i] = {scores_[i], ids_[i]};
  const size_t keep = std::min<size_t>(entries.size(), k_);
  std::partial_sort(entries.begin(), entries.begin() + keep, entries.end(),
                    [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
                      return a.first > b.first || (a.first == b.first && a.second < b.second);
                    });
  size_t i = 0;
  for (; i < keep; ++i) {
    ids[i] = entries[i].second;
    scores[i] = entries[i].first;
  }
  for (; i < static_cast<size_t>(k_); ++i) {
    ids[i] = -1;
    scores[i] = -std::numeric_limits<float>::infinity();
  }
  scores_.clear();
  ids_.clear();
  threshold_ = -std::numeric_limits<float>::infinity();
}

}  // namespace kvrecall::index
