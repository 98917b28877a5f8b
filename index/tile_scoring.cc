#include "index/tile_scoring.h"

// GCC 12's avx512fintrin.h trips -Wuninitialized on its own _mm512_undefined
// helpers (GCC bug 105593); the warning is about the header, not this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "common/half.h"
#include "common/logging.h"
#include "index/distance.h"

namespace kvrecall::index {
namespace {

constexpr int32_t kL = kTileKeys;

// ---- scalar: DotScalar's sequential sum, per lane ----

template <DType kDt>
inline float ElementToFloat(const void* base, int64_t i) {
  if constexpr (kDt == DType::kF32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (kDt == DType::kF16) {
    return HalfToFloat(static_cast<const uint16_t*>(base)[i]);
  } else {
    return Bf16ToFloat(static_cast<const uint16_t*>(base)[i]);
  }
}

template <DType kDt>
void TileScalar(const float* q, int32_t nq, const void* tile, int32_t d, float* out,
                int64_t out_stride) {
  for (int32_t qi = 0; qi < nq; ++qi) {
    const float* qv = q + static_cast<int64_t>(qi) * d;
    for (int32_t l = 0; l < kL; ++l) {
      float s = 0;
      for (int32_t j = 0; j < d; ++j) s += qv[j] * ElementToFloat<kDt>(tile, j * kL + l);
      out[qi * out_stride + l] = s;
    }
  }
}

// ---- AVX2 + FMA + F16C: DotAvx2's two 8-lane accumulators ----
// Classes c in [0, 16): element j belongs to class j % 16 (acc0 lanes 0..7 are
// classes 0..7, acc1 lanes are classes 8..15); a trailing 8-chunk
// (d % 16 == 8) continues classes 0..7. Lane sums a_l = class l + class 8+l,
// then HorizontalSum256's tree ((a0+a4)+(a1+a5)) + ((a2+a6)+(a3+a7)).

template <DType kDt>
__attribute__((target("avx2,fma,f16c"))) inline __m256 LoadTile8(const void* tile, int32_t j,
                                                                   int32_t half) {
  const int64_t at = static_cast<int64_t>(j) * kL + 8 * half;
  if constexpr (kDt == DType::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(tile) + at);
  } else if constexpr (kDt == DType::kF16) {
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(tile) + at)));
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(tile) + at))),
        16));
  }
}

template <int kQ, DType kDt>
__attribute__((target("avx2,fma,f16c"))) void TileAvx2(const float* q, const void* tile,
                                                        int32_t d, float* out,
                                                        int64_t out_stride) {
  constexpr int kGroup = 2;  // classes per pass: kQ * kGroup accumulators
  alignas(32) float part[kQ][16][8];
  const int32_t rounds = d / 16;
  const bool tail8 = (d % 16) != 0;  // d % 8 == 0 is required
  for (int32_t half = 0; half < 2; ++half) {
    for (int32_t g = 0; g < 16; g += kGroup) {
      __m256 acc[kQ][kGroup];
      for (int qi = 0; qi < kQ; ++qi) {
        for (int c = 0; c < kGroup; ++c) acc[qi][c] = _mm256_setzero_ps();
      }
      for (int32_t t = 0; t < rounds; ++t) {
        for (int c = 0; c < kGroup; ++c) {
          const int32_t j = 16 * t + g + c;
          const __m256 kv = LoadTile8<kDt>(tile, j, half);
          for (int qi = 0; qi < kQ; ++qi) {
            acc[qi][c] = _mm256_fmadd_ps(_mm256_set1_ps(q[qi * d + j]), kv, acc[qi][c]);
          }
        }
      }
      if (tail8 && g < 8) {
        for (int c = 0; c < kGroup; ++c) {
          const int32_t j = 16 * rounds + g + c;
          const __m256 kv = LoadTile8<kDt>(tile, j, half);
          for (int qi = 0; qi < kQ; ++qi) {
            acc[qi][c] = _mm256_fmadd_ps(_mm256_set1_ps(q[qi * d + j]), kv, acc[qi][c]);
          }
        }
      }
      for (int qi = 0; qi < kQ; ++qi) {
        for (int c = 0; c < kGroup; ++c) _mm256_store_ps(part[qi][g + c], acc[qi][c]);
      }
    }
    for (int qi = 0; qi < kQ; ++qi) {
      __m256 a[8];
      for (int l = 0; l < 8; ++l) {
        a[l] = _mm256_add_ps(_mm256_load_ps(part[qi][l]), _mm256_load_ps(part[qi][8 + l]));
      }
      __m256 lo[4];
      for (int i = 0; i < 4; ++i) lo[i] = _mm256_add_ps(a[i], a[4 + i]);
      const __m256 s0 = _mm256_add_ps(lo[0], lo[1]);
      const __m256 s2 = _mm256_add_ps(lo[2], lo[3]);
      _mm256_storeu_ps(out + qi * out_stride + 8 * half, _mm256_add_ps(s0, s2));
    }
  }
}

// ---- AVX-512F: DotAvx512's two 16-lane accumulators ----
// Classes c in [0, 32): element j belongs to class j % 32 (acc0 lanes are
// classes 0..15, acc1 lanes classes 16..31); a trailing 16-chunk
// (d % 32 == 16) continues classes 0..15. Lane sums a_l = class l + class
// 16+l, then _mm512_reduce_add_ps's tree: t3_i = a_i + a_{8+i},
// t6_i = t3_i + t3_{4+i}, (t6_0 + t6_2) + (t6_1 + t6_3).

template <DType kDt>
__attribute__((target("avx512f"))) inline __m512 LoadTile16(const void* tile, int32_t j) {
  const int64_t at = static_cast<int64_t>(j) * kL;
  if constexpr (kDt == DType::kF32) {
    return _mm512_loadu_ps(static_cast<const float*>(tile) + at);
  } else if constexpr (kDt == DType::kF16) {
    return _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(tile) + at)));
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(tile) + at))),
        16));
  }
}

// kD > 0 fixes d at compile time (fully unrolled chains); kD == 0 reads d.
template <int kQ, DType kDt, int32_t kD>
__attribute__((target("avx512f"))) void TileAvx512(const float* q, const void* tile,
                                                    int32_t d_runtime, float* out,
                                                    int64_t out_stride) {
  const int32_t d = kD > 0 ? kD : d_runtime;
  // Pass i (0..7) runs the chains of classes i, 8+i, 16+i, 24+i for kQ
  // queries (4 * kQ accumulators) and folds them at once into
  // t3_i = (c_{8+i} + c_{24+i}) + (c_i + c_{16+i}) = a_{8+i} + a_i; only the
  // eight t3 vectors per query go through memory.
  alignas(64) float t3[kQ][8][16];
  const int32_t rounds = d / 32;
  const bool tail16 = (d % 32) != 0;  // d % 16 == 0 is required
  for (int32_t i = 0; i < 8; ++i) {
    const int32_t cls[4] = {i, 8 + i, 16 + i, 24 + i};
    __m512 acc[kQ][4];
    for (int qi = 0; qi < kQ; ++qi) {
      for (int c = 0; c < 4; ++c) acc[qi][c] = _mm512_setzero_ps();
    }
    for (int32_t t = 0; t < rounds; ++t) {
      for (int c = 0; c < 4; ++c) {
        const int32_t j = 32 * t + cls[c];
        const __m512 kv = LoadTile16<kDt>(tile, j);
        for (int qi = 0; qi < kQ; ++qi) {
          acc[qi][c] = _mm512_fmadd_ps(_mm512_set1_ps(q[qi * d + j]), kv, acc[qi][c]);
        }
      }
    }
    if (tail16) {  // the trailing 16 elements continue classes 0..15
      for (int c = 0; c < 2; ++c) {
        const int32_t j = 32 * rounds + cls[c];
        const __m512 kv = LoadTile16<kDt>(tile, j);
        for (int qi = 0; qi < kQ; ++qi) {
          acc[qi][c] = _mm512_fmadd_ps(_mm512_set1_ps(q[qi * d + j]), kv, acc[qi][c]);
        }
      }
    }
    for (int qi = 0; qi < kQ; ++qi) {
      const __m512 a_lo = _mm512_add_ps(acc[qi][0], acc[qi][2]);  // a_i
      const __m512 a_hi = _mm512_add_ps(acc[qi][1], acc[qi][3]);  // a_{8+i}
      _mm512_store_ps(t3[qi][i], _mm512_add_ps(a_hi, a_lo));
    }
  }
  for (int qi = 0; qi < kQ; ++qi) {
    __m512 t6[4];
    for (int i = 0; i < 4; ++i) {
      t6[i] = _mm512_add_ps(_mm512_load_ps(t3[qi][4 + i]), _mm512_load_ps(t3[qi][i]));
    }
    const __m512 t8_0 = _mm512_add_ps(t6[0], t6[2]);
    const __m512 t8_1 = _mm512_add_ps(t6[1], t6[3]);
    _mm512_storeu_ps(out + qi * out_stride, _mm512_add_ps(t8_0, t8_1));
  }
}

// ---- generic: DotRow on a gathered row (any d) ----

void TileGeneric(const float* q, int32_t nq, const void* tile, DType dtype, int32_t d, float* out,
                 int64_t out_stride) {
  const size_t elem = DTypeSize(dtype);
  std::vector<char> row(static_cast<size_t>(d) * elem);
  for (int32_t l = 0; l < kL; ++l) {
    for (int32_t j = 0; j < d; ++j) {
      std::memcpy(row.data() + j * elem, static_cast<const char*>(tile) + (j * kL + l) * elem,
                  elem);
    }
    for (int32_t qi = 0; qi < nq; ++qi) {
      out[qi * out_stride + l] = DotRow(q + static_cast<int64_t>(qi) * d, row.data(), dtype, d);
    }
  }
}

template <int kQ, DType kDt>
__attribute__((target("avx512f"))) void TileAvx512Dispatch(const float* q, const void* tile,
                                                            int32_t d, float* out,
                                                            int64_t out_stride) {
  switch (d) {
    case 64:
      return TileAvx512<kQ, kDt, 64>(q, tile, d, out, out_stride);
    case 128:
      return TileAvx512<kQ, kDt, 128>(q, tile, d, out, out_stride);
    case 256:
      return TileAvx512<kQ, kDt, 256>(q, tile, d, out, out_stride);
    default:
      return TileAvx512<kQ, kDt, 0>(q, tile, d, out, out_stride);
  }
}

// Calls kernel(std::integral_constant<int, Q>, first) for groups of Q <= 4
// queries covering [0, nq): as many groups of 4 as fit, then one of 1-3.
template <typename Kernel>
inline void ForQueryGroups(int32_t nq, const Kernel& kernel) {
  int32_t qi = 0;
  for (; qi + 4 <= nq; qi += 4) kernel(std::integral_constant<int, 4>{}, qi);
  switch (nq - qi) {
    case 3:
      kernel(std::integral_constant<int, 3>{}, qi);
      break;
    case 2:
      kernel(std::integral_constant<int, 2>{}, qi);
      break;
    case 1:
      kernel(std::integral_constant<int, 1>{}, qi);
      break;
    default:
      break;
  }
}

template <DType kDt>
void ScoreTilesTyped(TilePath path, const float* queries, int32_t nq, const void* tiles, int32_t d,
                     int64_t num_tiles, float* scores, int64_t score_stride) {
  const size_t tile_bytes = static_cast<size_t>(d) * kL * DTypeSize(kDt);
  for (int64_t t = 0; t < num_tiles; ++t) {
    const void* tile = static_cast<const char*>(tiles) + t * tile_bytes;
    float* out_t = scores + t * kL;
    switch (path) {
      case TilePath::kAvx512:
        ForQueryGroups(nq, [&](auto q_count, int32_t qi) {
          TileAvx512Dispatch<decltype(q_count)::value, kDt>(
              queries + qi * d, tile, d, out_t + qi * score_stride, score_stride);
        });
        break;
      case TilePath::kAvx2:
        ForQueryGroups(nq, [&](auto q_count, int32_t qi) {
          TileAvx2<decltype(q_count)::value, kDt>(queries + qi * d, tile, d,
                                                  out_t + qi * score_stride, score_stride);
        });
        break;
      case TilePath::kScalar:
        TileScalar<kDt>(queries, nq, tile, d, out_t, score_stride);
        break;
      case TilePath::kGeneric:
        TileGeneric(queries, nq, tile, kDt, d, out_t, score_stride);
        break;
    }
  }
}

__attribute__((target("avx512f"))) int64_t CollectAvx512(const float* s, int64_t m, float thr,
                                                         int32_t* out) {
  const __m512 t = _mm512_set1_ps(thr);
  int64_t count = 0, i = 0;
  for (; i + 16 <= m; i += 16) {
    uint32_t mask = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), t, _CMP_GE_OQ);
    while (mask != 0) {
      out[count++] = static_cast<int32_t>(i + __builtin_ctz(mask));
      mask &= mask - 1;
    }
  }
  for (; i < m; ++i) {
    if (s[i] >= thr) out[count++] = static_cast<int32_t>(i);
  }
  return count;
}

__attribute__((target("avx2"))) int64_t CollectAvx2(const float* s, int64_t m, float thr,
                                                     int32_t* out) {
  const __m256 t = _mm256_set1_ps(thr);
  int64_t count = 0, i = 0;
  for (; i + 8 <= m; i += 8) {
    uint32_t mask = static_cast<uint32_t>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + i), t, _CMP_GE_OQ)));
    while (mask != 0) {
      out[count++] = static_cast<int32_t>(i + __builtin_ctz(mask));
      mask &= mask - 1;
    }
  }
  for (; i < m; ++i) {
    if (s[i] >= thr) out[count++] = static_cast<int32_t>(i);
  }
  return count;
}

}  // namespace

int64_t CollectAtLeast(const float* scores, int64_t m, float threshold, int32_t* out) {
  static const int path = CpuHasAvx512f() ? 2 : CpuHasAvx2F16c() ? 1 : 0;
  if (path == 2) return CollectAvx512(scores, m, threshold, out);
  if (path == 1) return CollectAvx2(scores, m, threshold, out);
  int64_t count = 0;
  for (int64_t i = 0; i < m; ++i) {
    if (scores[i] >= threshold) out[count++] = static_cast<int32_t>(i);
  }
  return count;
}

TilePath ChooseTilePath(int32_t d) {
  const char* name = ScoreKernelName();
  if (std::strcmp(name, "avx512") == 0 && d % 16 == 0) return TilePath::kAvx512;
  if (std::strcmp(name, "avx2") == 0 && d % 8 == 0) return TilePath::kAvx2;
  if (std::strcmp(name, "scalar") == 0) return TilePath::kScalar;
  return TilePath::kGeneric;
}

const char* TilePathName(TilePath path) {
  switch (path) {
    case TilePath::kAvx512:
      return "avx512";
    case TilePath::kAvx2:
      return "avx2";
    case TilePath::kScalar:
      return "scalar";
    default:
      return "generic";
  }
}

bool TilePathSupported(TilePath path, int32_t d) {
  switch (path) {
    case TilePath::kAvx512:
      return CpuHasAvx512f() && d % 16 == 0;
    case TilePath::kAvx2:
      return CpuHasAvx2F16c() && d % 8 == 0;
    default:
      return true;
  }
}

void ScoreTilesWith(TilePath path, const float* queries, int32_t num_queries, const void* tiles,
                    DType dtype, int32_t d, int64_t num_tiles, float* scores,
                    int64_t score_stride) {
  switch (dtype) {
    case DType::kF32:
      ScoreTilesTyped<DType::kF32>(path, queries, num_queries, tiles, d, num_tiles, scores,
                                   score_stride);
      break;
    case DType::kF16:
      ScoreTilesTyped<DType::kF16>(path, queries, num_queries, tiles, d, num_tiles, scores,
                                   score_stride);
      break;
    case DType::kBf16:
      ScoreTilesTyped<DType::kBf16>(path, queries, num_queries, tiles, d, num_tiles, scores,
                                    score_stride);
      break;
  }
}

void ScoreTiles(const float* queries, int32_t num_queries, const void* tiles, DType dtype,
                int32_t d, int64_t num_tiles, float* scores, int64_t score_stride) {
  ScoreTilesWith(ChooseTilePath(d), queries, num_queries, tiles, dtype, d, num_tiles, scores,
                 score_stride);
}

void PackIntoTiles(const void* src, DType src_dtype, int64_t rows, int32_t d, int64_t src_stride,
                   int64_t first, void* tiles, DType tile_dtype) {
  KVR_CHECK(tile_dtype == src_dtype || tile_dtype == DType::kF32);
  const size_t src_elem = DTypeSize(src_dtype), tile_elem = DTypeSize(tile_dtype);
  std::vector<float> f32(tile_dtype != src_dtype ? d : 0);
  for (int64_t i = 0; i < rows; ++i) {
    const char* row = static_cast<const char*>(src) + i * src_stride * src_elem;
    if (!f32.empty()) {
      ConvertToFloat(row, src_dtype, d, f32.data());
      row = reinterpret_cast<const char*>(f32.data());
    }
    const int64_t pos = first + i;
    char* tile = static_cast<char*>(tiles) + (pos / kL) * d * kL * tile_elem;
    const int64_t lane = pos % kL;
    for (int32_t j = 0; j < d; ++j) {
      std::memcpy(tile + (j * kL + lane) * tile_elem, row + j * tile_elem, tile_elem);
    }
  }
}

void UnpackFromTiles(const void* tiles, DType tile_dtype, int32_t d, int64_t pos, void* row) {
  const size_t elem = DTypeSize(tile_dtype);
  const char* tile = static_cast<const char*>(tiles) + (pos / kL) * d * kL * elem;
  const int64_t lane = pos % kL;
  for (int32_t j = 0; j < d; ++j) {
    std::memcpy(static_cast<char*>(row) + j * elem, tile + (j * kL + lane) * elem, elem);
  }
}

}  // namespace kvrecall::index
