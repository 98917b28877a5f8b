#include "service/retrieval/partial_attention.h"

// GCC 12's AVX-512 headers trip -Wuninitialized in their own helpers (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "index/distance.h"

namespace kvrecall::retrieval {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- exp(x - m) over an array, in place (Cephes expf polynomial; rel. error ~2e-7) ----

inline float ExpScalar(float x) { return std::exp(x); }

__attribute__((target("avx2,fma"))) void ExpShiftAvx2(float* x, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 c1 = _mm256_set1_ps(0.693359375f);
  const __m256 c2 = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 p0 = _mm256_set1_ps(1.9875691500E-4f);
  const __m256 p1 = _mm256_set1_ps(1.3981999507E-3f);
  const __m256 p2 = _mm256_set1_ps(8.3334519073E-3f);
  const __m256 p3 = _mm256_set1_ps(4.1665795894E-2f);
  const __m256 p4 = _mm256_set1_ps(1.6666665459E-1f);
  const __m256 p5 = _mm256_set1_ps(5.0000001201E-1f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm);
    const __m256 underflow = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(v, log2e, half));
    v = _mm256_fnmadd_ps(fx, c1, v);
    v = _mm256_fnmadd_ps(fx, c2, v);
    const __m256 z = _mm256_mul_ps(v, v);
    __m256 y = _mm256_fmadd_ps(p0, v, p1);
    y = _mm256_fmadd_ps(y, v, p2);
    y = _mm256_fmadd_ps(y, v, p3);
    y = _mm256_fmadd_ps(y, v, p4);
    y = _mm256_fmadd_ps(y, v, p5);
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(v, one));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx),
                                                         _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    y = _mm256_andnot_ps(underflow, y);  // exp of very negative -> 0
    _mm256_storeu_ps(x + i, y);
  }
  for (; i < n; ++i) x[i] = ExpScalar(x[i] - m);
}

void ExpShift(float* x, int64_t n, float m) {
  if (CpuHasAvx2F16c()) {
    ExpShiftAvx2(x, n, m);
    return;
  }
  for (int64_t i = 0; i < n; ++i) x[i] = ExpScalar(x[i] - m);
}

// ---- out[0..d) += w * row[0..d) ----

__attribute__((target("avx512f"))) void AxpyAvx512(float w, const float* row, int32_t d,
                                                    float* out) {
  const __m512 vw = _mm512_set1_ps(w);
  int32_t j = 0;
  for (; j + 16 <= d; j += 16) {
    _mm512_storeu_ps(out + j,
                     _mm512_fmadd_ps(vw, _mm512_loadu_ps(row + j), _mm512_loadu_ps(out + j)));
  }
  for (; j < d; ++j) out[j] += w * row[j];
}

__attribute__((target("avx2,fma"))) void AxpyAvx2(float w, const float* row, int32_t d,
                                                   float* out) {
  const __m256 vw = _mm256_set1_ps(w);
  int32_t j = 0;
  for (; j + 8 <= d; j += 8) {
    _mm256_storeu_ps(out + j,
                     _mm256_fmadd_ps(vw, _mm256_loadu_ps(row + j), _mm256_loadu_ps(out + j)));
  }
  for (; j < d; ++j) out[j] += w * row[j];
}

void Axpy(float w, const float* row, int32_t d, float* out) {
  if (CpuHasAvx512f()) {
    AxpyAvx512(w, row, d, out);
  } else if (CpuHasAvx2F16c()) {
    AxpyAvx2(w, row, d, out);
  } else {
    for (int32_t j = 0; j < d; ++j) out[j] += w * row[j];
  }
}

// Attention of `g` query heads (rows of q, already scaled) over one shared
// id list of KV head `kv_head`. Writes out [g, d] and lse [g].
// Rows are read in a random order: ask for a whole row (every cache line)
// kPrefetchRows rows ahead, so that several rows are in flight at once.
constexpr int64_t kPrefetchRows = 8;

inline void PrefetchRow(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

void AttendGroup(const LayerKvView& kv, int32_t kv_head, const float* q, int32_t g,
                 absl::Span<const int64_t> ids, float* out, float* lse) {
  const int32_t d = kv.head_dim;
  std::fill(out, out + static_cast<size_t>(g) * d, 0.0f);
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n == 0) {
    std::fill(lse, lse + g, kNegInf);
    return;
  }
  std::vector<float> scores(static_cast<size_t>(g) * n);  // [g, n]
  std::vector<float> row(d);
  const bool f32 = kv.dtype == DType::kF32;
  const int64_t row_bytes = static_cast<int64_t>(d) * DTypeSize(kv.dtype);
  for (int64_t i = 0; i < std::min(n, kPrefetchRows); ++i) PrefetchRow(kv.KeyRow(kv_head, ids[i]), row_bytes);
  // Pass 1: scores. One key row is read once for the whole group.
  for (int64_t i = 0; i < n; ++i) {
    const void* k = kv.KeyRow(kv_head, ids[i]);
    if (i + kPrefetchRows < n) PrefetchRow(kv.KeyRow(kv_head, ids[i + kPrefetchRows]), row_bytes);
    if (g == 1) {
      scores[i] = index::DotRow(q, k, kv.dtype, d);
      continue;
    }
    const float* kr = static_cast<const float*>(k);
    if (!f32) {
      ConvertToFloat(k, kv.dtype, d, row.data());
      kr = row.data();
    }
    for (int32_t h = 0; h < g; ++h) scores[h * n + i] = index::DotF32(q + h * d, kr, d);
  }
  // Softmax numerators, per head.
  std::vector<float> inv_l(g);
  for (int32_t h = 0; h < g; ++h) {
    float* s = scores.data() + h * n;
    const float m = *std::max_element(s, s + n);
    ExpShift(s, n, m);
    double l = 0;
    for (int64_t i = 0; i < n; ++i) l += s[i];
    inv_l[h] = static_cast<float>(1.0 / l);
    lse[h] = m + static_cast<float>(std::log(l));
  }
  // Pass 2: weighted values. One value row is read once for the whole group.
  for (int64_t i = 0; i < std::min(n, kPrefetchRows); ++i) PrefetchRow(kv.ValueRow(kv_head, ids[i]), row_bytes);
  for (int64_t i = 0; i < n; ++i) {
    const void* v = kv.ValueRow(kv_head, ids[i]);
    if (i + kPrefetchRows < n) PrefetchRow(kv.ValueRow(kv_head, ids[i + kPrefetchRows]), row_bytes);
    const float* vr = static_cast<const float*>(v);
    if (!f32) {
      ConvertToFloat(v, kv.dtype, d, row.data());
      vr = row.data();
    }
    for (int32_t h = 0; h < g; ++h) Axpy(scores[h * n + i] * inv_l[h], vr, d, out + h * d);
  }
}

}  // namespace

absl::Status ComputePartialAttention(const LayerKvView& kv, const PartialAttentionArgs& args,
                                     PartialAttentionResult* result) {
  const int32_t d = kv.head_dim;
  if (args.queries == nullptr || args.num_q_heads <= 0 || args.group_size <= 0 ||
      kv.num_kv_heads <= 0 || d <= 0) {
    return absl::InvalidArgumentError("partial attention: empty queries or KV geometry");
  }
  if (args.num_q_heads != kv.num_kv_heads * args.group_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "partial attention: ", args.num_q_heads, " query heads do not make groups of ",
        args.group_size, " over ", kv.num_kv_heads, " KV heads"));
  }
  const bool per_q_head = static_cast<int32_t>(args.ids.size()) == args.num_q_heads;
  if (!per_q_head && static_cast<int32_t>(args.ids.size()) != kv.num_kv_heads) {
    return absl::InvalidArgumentError(absl::StrCat(
        "partial attention: ", args.ids.size(), " id lists; need one per query head (",
        args.num_q_heads, ") or per KV head (", kv.num_kv_heads, ")"));
  }
  for (const auto& list : args.ids) {
    for (int64_t id : list) {
      if (id < 0 || id >= kv.num_tokens) {
        return absl::InvalidArgumentError(absl::StrCat("partial attention: position ", id,
                                                       " outside [0, ", kv.num_tokens, ")"));
      }
    }
  }
  const float scale = args.scale != 0 ? args.scale : 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> q(static_cast<size_t>(args.num_q_heads) * d);
  for (size_t i = 0; i < q.size(); ++i) q[i] = args.queries[i] * scale;

  result->out.assign(static_cast<size_t>(args.num_q_heads) * d, 0.0f);
  result->lse.assign(args.num_q_heads, kNegInf);
  const int32_t g = args.group_size;
  // Work items: one per query head (own lists) or one per KV group (shared lists).
  const int64_t items = per_q_head ? args.num_q_heads : kv.num_kv_heads;
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      if (per_q_head) {
        const int32_t h = static_cast<int32_t>(w);
        AttendGroup(kv, h / g, q.data() + h * d, 1, args.ids[h], result->out.data() + h * d,
                    result->lse.data() + h);
      } else {
        const int32_t kvh = static_cast<int32_t>(w);
        AttendGroup(kv, kvh, q.data() + kvh * g * d, g, args.ids[kvh],
                    result->out.data() + kvh * g * d, result->lse.data() + kvh * g);
      }
    }
  };
  int64_t total_ids = 0;
  for (const auto& list : args.ids) total_ids += static_cast<int64_t>(list.size());
  if (args.num_threads == 1 || items == 1 || total_ids * d < (int64_t{1} << 15)) {
    run(0, items);
  } else {
    ThreadPool::Default()->ParallelFor(items, 1, run, args.num_threads);
  }
  return absl::OkStatus();
}

void MergeAttentionStates(const std::vector<const PartialAttentionResult*>& parts,
                          int32_t num_heads, int32_t head_dim, PartialAttentionResult* merged) {
  merged->out.assign(static_cast<size_t>(num_heads) * head_dim, 0.0f);
  merged->lse.assign(num_heads, kNegInf);
  for (int32_t h = 0; h < num_heads; ++h) {
    float m = kNegInf;
    for (const PartialAttentionResult* p : parts) m = std::max(m, p->lse[h]);
    if (m == kNegInf) continue;  // every part empty
    double sum = 0;
    for (const PartialAttentionResult* p : parts) sum += std::exp(double(p->lse[h]) - m);
    const double lse = m + std::log(sum);
    merged->lse[h] = static_cast<float>(lse);
    float* o = merged->out.data() + static_cast<size_t>(h) * head_dim;
    for (const PartialAttentionResult* p : parts) {
      if (p->lse[h] == kNegInf) continue;
      const float w = static_cast<float>(std::exp(double(p->lse[h]) - lse));
      const float* po = p->out.data() + static_cast<size_t>(h) * head_dim;
      for (int32_t j = 0; j < head_dim; ++j) o[j] += w * po[j];
    }
  }
}

}  // namespace kvrecall::retrieval
