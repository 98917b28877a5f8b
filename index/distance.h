#pragma once

// Inner-product kernels shared by the index kinds: one f32 query against
// rows of f32, f16 or bf16 keys, vectorised with AVX-512F or AVX2+FMA+F16C
// (chosen at run time; a scalar path otherwise). Results are f32 sums.
//
// Also a bounded top-k collector. All functions are thread-safe (pure).

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/types.h"

namespace kvrecall::index {

// a·b over d f32 elements.
float DotF32(const float* a, const float* b, int32_t d);

// query · row for one row of `dtype` (f32, f16 or bf16 bits).
//   query: [d] f32;  row: [d] elements of dtype
float DotRow(const float* query, const void* row, DType dtype, int32_t d);

// scores[i] = query · keys[i] for the n rows starting at `keys`.
//   query:  [d] f32
//   keys:   [n, stride] elements of `dtype` (f32, f16 or bf16 bits), row-major
//   scores: [n] f32
void ScoreRows(const float* query, const void* keys, DType dtype, int64_t n, int32_t d,
               int64_t stride, float* scores);

// scores[j] = query · keys[ids[j]] for j in [0, m).
//   keys: [*, stride] elements of `dtype`; ids: [m] row indices
void ScoreRowsGather(const float* query, const void* keys, DType dtype, int32_t d, int64_t stride,
                     const int64_t* ids, int64_t m, float* scores);

// Which vector path ScoreRows uses: "avx512", "avx2" or "scalar".
const char* ScoreKernelName();

// Keeps the k largest (score, id) pairs seen. Ties keep the smaller id.
// Not thread-safe.
class TopK {
 public:
  explicit TopK(int32_t k) : k_(k) { heap_.reserve(static_cast<size_t>(k) + 1); }

  // The smallest score still admitted once full (-inf before).
  float threshold() const { return full() ? heap_.front().first : -__builtin_inff(); }
  bool full() const { return static_cast<int32_t>(heap_.size()) >= k_; }
  int32_t k() const { return k_; }
  size_t size() const { return heap_.size(); }

  void Push(float score, int64_t id) {
    if (!full()) {
      heap_.emplace_back(score, id);
      std::push_heap(heap_.begin(), heap_.end(), Worse);
    } else if (Worse({score, id}, heap_.front())) {
      std::pop_heap(heap_.begin(), heap_.end(), Worse);
      heap_.back() = {score, id};
      std::push_heap(heap_.begin(), heap_.end(), Worse);
    }
  }

  // Writes the kept pairs in descending score order into ids[0..k) and
  // scores[0..k), padding with -1 / -inf; resets the collector.
  void Drain(int64_t* ids, float* scores);

 private:
  // True when a ranks above b (a is "better"): used as the heap's "less", so
  // the heap front is the worst kept pair.
  static bool Worse(const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  }
  int32_t k_;
  std::vector<std::pair<float, int64_t>> heap_;
};

// Writes the k best of (scores[i], ids[i]) in TopK's order (score
// descending, ties by smaller id) to out_ids / out_scores, padded with
// -1 / -inf: the same result as pushing every pair through a TopK, without a
// heap push per pair. `order` is scratch space reused across calls.
//   scores, ids: [n];  out_ids, out_scores: [k]
void WriteTopK(const std::vector<float>& scores, const std::vector<int64_t>& ids, int32_t k,
               std::vector<int32_t>* order, int64_t* out_ids, float* out_scores);

}  // namespace kvrecall::index
