#include "index/distance.h"

// GCC 12's avx512fintrin.h trips -Wuninitialized on its own _mm512_undefined
// helpers (GCC bug 105593); the warning is about the header, not this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "common/half.h"

namespace kvrecall::index {
namespace {

// ---- scalar ----

float DotScalar(const float* q, const void* row, DType dtype, int32_t d) {
  float s = 0;
  switch (dtype) {
    case DType::kF32: {
      const float* r = static_cast<const float*>(row);
      for (int32_t j = 0; j < d; ++j) s += q[j] * r[j];
      break;
    }
    case DType::kF16: {
      const uint16_t* r = static_cast<const uint16_t*>(row);
      for (int32_t j = 0; j < d; ++j) s += q[j] * HalfToFloat(r[j]);
      break;
    }
    case DType::kBf16: {
      const uint16_t* r = static_cast<const uint16_t*>(row);
      for (int32_t j = 0; j < d; ++j) s += q[j] * Bf16ToFloat(r[j]);
      break;
    }
  }
  return s;
}

// ---- AVX2 + FMA + F16C ----

__attribute__((target("avx2,fma"))) inline float HorizontalSum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 shuf = _mm_movehdup_ps(lo);
  __m128 sums = _mm_add_ps(lo, shuf);
  shuf = _mm_movehl_ps(shuf, sums);
  sums = _mm_add_ss(sums, shuf);
  return _mm_cvtss_f32(sums);
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 Load8(const void* row, DType dtype,
                                                              int32_t j) {
  switch (dtype) {
    case DType::kF16:
      return _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + j)));
    case DType::kBf16:
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(
              reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + j))),
          16));
    case DType::kF32:
    default:
      return _mm256_loadu_ps(static_cast<const float*>(row) + j);
  }
}

__attribute__((target("avx2,fma,f16c"))) float DotAvx2(const float* q, const void* row,
                                                        DType dtype, int32_t d) {
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  int32_t j = 0;
  for (; j + 16 <= d; j += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), Load8(row, dtype, j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), Load8(row, dtype, j + 8), acc1);
  }
  for (; j + 8 <= d; j += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), Load8(row, dtype, j), acc0);
  }
  float s = HorizontalSum256(_mm256_add_ps(acc0, acc1));
  if (j < d) {
    const size_t elem = DTypeSize(dtype);
    s += DotScalar(q + j, static_cast<const char*>(row) + j * elem, dtype, d - j);
  }
  return s;
}

// ---- AVX-512F ----

__attribute__((target("avx512f"))) inline __m512 Load16(const void* row, DType dtype, int32_t j) {
  switch (dtype) {
    case DType::kF16:
      return _mm512_cvtph_ps(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + j)));
    case DType::kBf16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + j))),
          16));
    case DType::kF32:
    default:
      return _mm512_loadu_ps(static_cast<const float*>(row) + j);
  }
}

__attribute__((target("avx512f"))) float DotAvx512(const float* q, const void* row, DType dtype,
                                                    int32_t d) {
  __m512 acc0 = _mm512_setzero_ps();
  __m512 acc1 = _mm512_setzero_ps();
  int32_t j = 0;
  for (; j + 32 <= d; j += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), Load16(row, dtype, j), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j + 16), Load16(row, dtype, j + 16), acc1);
  }
  for (; j + 16 <= d; j += 16) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), Load16(row, dtype, j), acc0);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  if (j < d) {
    const size_t elem = DTypeSize(dtype);
    s += DotScalar(q + j, static_cast<const char*>(row) + j * elem, dtype, d - j);
  }
  return s;
}

enum class Path { kScalar, kAvx2, kAvx512 };

Path ChoosePath() {
  if (CpuHasAvx512f()) return Path::kAvx512;
  if (CpuHasAvx2F16c()) return Path::kAvx2;
  return Path::kScalar;
}

const Path kPath = ChoosePath();

inline float DotRowDispatch(const float* q, const void* row, DType dtype, int32_t d) {
  switch (kPath) {
    case Path::kAvx512:
      return DotAvx512(q, row, dtype, d);
    case Path::kAvx2:
      return DotAvx2(q, row, dtype, d);
    case Path::kScalar:
    default:
      return DotScalar(q, row, dtype, d);
  }
}

}  // namespace

const char* ScoreKernelName() {
  switch (kPath) {
    case Path::kAvx512:
      return "avx512";
    case Path::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

float DotF32(const float* a, const float* b, int32_t d) {
  return DotRowDispatch(a, b, DType::kF32, d);
}

float DotRow(const float* query, const void* row, DType dtype, int32_t d) {
  return DotRowDispatch(query, row, dtype, d);
}

void ScoreRows(const float* query, const void* keys, DType dtype, int64_t n, int32_t d,
               int64_t stride, float* scores) {
  const size_t row_bytes = static_cast<size_t>(stride) * DTypeSize(dtype);
  const char* base = static_cast<const char*>(keys);
  for (int64_t i = 0; i < n; ++i) scores[i] = DotRowDispatch(query, base + i * row_bytes, dtype, d);
}

void ScoreRowsGather(const float* query, const void* keys, DType dtype, int32_t d, int64_t stride,
                     const int64_t* ids, int64_t m, float* scores) {
  const size_t row_bytes = static_cast<size_t>(stride) * DTypeSize(dtype);
  const char* base = static_cast<const char*>(keys);
  for (int64_t j = 0; j < m; ++j) {
    if (j + 4 < m) __builtin_prefetch(base + ids[j + 4] * row_bytes);
    scores[j] = DotRowDispatch(query, base + ids[j] * row_bytes, dtype, d);
  }
}

void TopK::Drain(int64_t* ids, float* scores) {
  std::sort_heap(heap_.begin(), heap_.end(), Worse);
  // sort_heap with "Worse" as less orders from best to worst.
  size_t i = 0;
  for (; i < heap_.size(); ++i) {
    ids[i] = heap_[i].second;
    scores[i] = heap_[i].first;
  }
  for (; i < static_cast<size_t>(k_); ++i) {
    ids[i] = -1;
    scores[i] = -std::numeric_limits<float>::infinity();
  }
  heap_.clear();
}

void WriteTopK(const std::vector<float>& scores, const std::vector<int64_t>& ids, int32_t k,
               std::vector<int32_t>* order, int64_t* out_ids, float* out_scores) {
  const int64_t n = static_cast<int64_t>(ids.size());
  order->resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) (*order)[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  auto better = [&](int32_t a, int32_t b) {
    const float sa = scores[static_cast<size_t>(a)], sb = scores[static_cast<size_t>(b)];
    return sa > sb || (sa == sb && ids[static_cast<size_t>(a)] < ids[static_cast<size_t>(b)]);
  };
  const int64_t top = std::min<int64_t>(n, k);
  if (n > top) std::nth_element(order->begin(), order->begin() + top, order->end(), better);
  std::sort(order->begin(), order->begin() + top, better);
  for (int64_t i = 0; i < k; ++i) {
    if (i < top) {
      const int32_t at = (*order)[static_cast<size_t>(i)];
      out_ids[i] = ids[static_cast<size_t>(at)];
      out_scores[i] = scores[static_cast<size_t>(at)];
    } else {
      out_ids[i] = -1;
      out_scores[i] = -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace kvrecall::index
