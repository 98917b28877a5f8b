#include "bench/index/attention_eval.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/half.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/distance.h"
#include "index/testing/synthetic_attention.h"

namespace kvrecall::bench {
namespace {

absl::StatusOr<NpyArray> ReadF16(const std::string& path, int64_t rank) {
  KVR_ASSIGN_OR_RETURN(NpyArray a, ReadNpy(path));
  if (a.descr != "<f2" || static_cast<int64_t>(a.shape.size()) != rank) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": expected a rank-", rank, " float16 array, got ", a.descr));
  }
  return a;
}

}  // namespace

absl::StatusOr<EvalSet> LoadCapture(const std::string& dir, int32_t layer, int32_t kv_head,
                                    int64_t decode) {
  const std::string prefix = absl::StrFormat("%s/layer%02d_", dir, layer);
  KVR_ASSIGN_OR_RETURN(NpyArray q, ReadF16(prefix + "q.npy", 3));
  KVR_ASSIGN_OR_RETURN(NpyArray k, ReadF16(prefix + "k.npy", 3));
  KVR_ASSIGN_OR_RETURN(NpyArray v, ReadF16(prefix + "v.npy", 3));
  const int64_t hq = q.shape[0], t = q.shape[1], d = q.shape[2], hkv = k.shape[0];
  if (k.shape[1] != t || k.shape[2] != d || v.shape != k.shape || hkv < 1 || hq % hkv != 0) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "*: inconsistent shapes"));
  }
  if (kv_head < 0 || kv_head >= hkv || decode < 1 || decode >= t) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_head ", kv_head, " / decode ", decode, " out of range"));
  }
  const int64_t group = hq / hkv, n = t - decode;
  EvalSet set;
  set.name = absl::StrFormat("L%d/h%d", layer, kv_head);
  set.layer = layer;
  set.kv_head = kv_head;
  set.dim = static_cast<int32_t>(d);
  set.num_keys = n;
  const uint16_t* kh = k.as<uint16_t>() + kv_head * t * d;
  const uint16_t* vh = v.as<uint16_t>() + kv_head * t * d;
  set.keys.assign(kh, kh + n * d);
  set.values.resize(n * d);
  ConvertToFloat(vh, DType::kF16, n * d, set.values.data());
  set.training_dtype = DType::kF16;
  set.num_training = group * n;
  set.training.resize(set.num_training * d * 2);
  set.num_queries = group * decode;
  set.queries.resize(set.num_queries * d);
  for (int64_t g = 0; g < group; ++g) {
    const uint16_t* qh = q.as<uint16_t>() + (kv_head * group + g) * t * d;
    std::memcpy(set.training.data() + g * n * d * 2, qh, n * d * 2);
    ConvertToFloat(qh + n * d, DType::kF16, decode * d, set.queries.data() + g * decode * d);
  }
  return set;
}

namespace {

// Rotates post-RoPE vectors as if they sat `shift` positions later.
//   x: [rows, d] f32, rotate_half layout (dim i paired with i + d/2)
void ShiftRope(int64_t shift, int64_t rows, int32_t d, float* x) {
  const int32_t half = d / 2;
  std::vector<double> c(half), s(half);
  for (int32_t i = 0; i < half; ++i) {
    const double a = static_cast<double>(shift) * std::pow(10000.0, -2.0 * i / d);
    c[i] = std::cos(a);
    s[i] = std::sin(a);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* v = x + r * d;
    for (int32_t i = 0; i < half; ++i) {
      const double x0 = v[i], x1 = v[i + half];
      v[i] = static_cast<float>(x0 * c[i] - x1 * s[i]);
      v[i + half] = static_cast<float>(x1 * c[i] + x0 * s[i]);
    }
  }
}

}  // namespace

absl::StatusOr<EvalSet> MakeTiledCapture(const std::string& dir, int32_t layer, int32_t kv_head,
                                         int64_t decode, int64_t copies) {
  if (copies < 1) return absl::InvalidArgumentError("copies must be >= 1");
  KVR_ASSIGN_OR_RETURN(EvalSet base, LoadCapture(dir, layer, kv_head, decode));
  const int64_t n = base.num_keys, d = base.dim, group = base.num_training / n;
  EvalSet set;
  set.name = absl::StrFormat("L%d/h%d x%d", layer, kv_head, copies);
  set.layer = layer;
  set.kv_head = kv_head;
  set.dim = base.dim;
  set.num_keys = n * copies;
  set.keys.resize(set.num_keys * d);
  set.values.resize(set.num_keys * d);
  set.training_dtype = DType::kF16;
  set.num_training = group * set.num_keys;
  set.training.resize(set.num_training * d * 2);
  std::vector<float> rows(n * d);
  std::vector<float> training_f32(n * d);
  for (int64_t c = 0; c < copies; ++c) {
    ConvertToFloat(base.keys.data(), DType::kF16, n * d, rows.data());
    ShiftRope(c * n, n, base.dim, rows.data());
    ConvertFromFloat(rows.data(), n * d, DType::kF16, set.keys.data() + c * n * d);
    std::copy(base.values.begin(), base.values.end(), set.values.begin() + c * n * d);
    for (int64_t g = 0; g < group; ++g) {
      ConvertToFloat(base.training.data() + g * n * d * 2, DType::kF16, n * d,
                     training_f32.data());
      ShiftRope(c * n, n, base.dim, training_f32.data());
      ConvertFromFloat(training_f32.data(), n * d, DType::kF16,
                       set.training.data() + (g * set.num_keys + c * n) * d * 2);
    }
  }
  set.num_queries = base.num_queries;
  set.queries = base.queries;
  ShiftRope((copies - 1) * n, set.num_queries, base.dim, set.queries.data());
  return set;
}

absl::StatusOr<EvalSet> MakeSynthetic(int64_t num_keys, int64_t decode, uint64_t seed) {
  index::SyntheticAttentionOptions o;
  o.num_keys = num_keys;
  o.num_decode_queries = decode;
  o.seed = seed;
  KVR_ASSIGN_OR_RETURN(index::SyntheticAttention s, index::GenerateSyntheticAttention(o));
  EvalSet set;
  set.name = absl::StrCat("synthetic-", num_keys);
  set.dim = s.dim;
  set.num_keys = num_keys;
  set.keys.resize(s.keys.size());
  ConvertFromFloat(s.keys.data(), s.keys.size(), DType::kF16, set.keys.data());
  set.values = std::move(s.values);
  set.training_dtype = DType::kF16;
  set.num_training = s.num_query_heads * num_keys;
  set.training.resize(s.prefill_queries.size() * 2);
  ConvertFromFloat(s.prefill_queries.data(), s.prefill_queries.size(), DType::kF16,
                   set.training.data());
  set.num_queries = s.num_query_heads * decode;
  // Decode queries as they would arrive: f16, then f32 for the searches.
  set.queries.resize(s.decode_queries.size());
  std::vector<uint16_t> half(s.decode_queries.size());
  ConvertFromFloat(s.decode_queries.data(), half.size(), DType::kF16, half.data());
  ConvertToFloat(half.data(), DType::kF16, half.size(), set.queries.data());
  return set;
}

FullAttention ComputeFullAttention(const EvalSet& set, int threads) {
  const int64_t n = set.num_keys, nq = set.num_queries;
  const int32_t d = set.dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  FullAttention full;
  full.lse.resize(nq);
  full.out.resize(nq * d);
  ThreadPool::Default()->ParallelFor(
      nq, 1,
      [&](int64_t begin, int64_t end) {
        std::vector<float> s(n);
        std::vector<double> acc(d);
        for (int64_t q = begin; q < end; ++q) {
          index::ScoreRows(set.queries.data() + q * d, set.keys.data(), DType::kF16, n, d, d,
                           s.data());
          const double m = *std::max_element(s.begin(), s.end()) * scale;
          double sum = 0;
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t i = 0; i < n; ++i) {
            const double w = std::exp(s[i] * scale - m);
            sum += w;
            const float* v = set.values.data() + i * d;
            for (int32_t j = 0; j < d; ++j) acc[j] += w * v[j];
          }
          full.lse[q] = m + std::log(sum);
          for (int32_t j = 0; j < d; ++j) full.out[q * d + j] = static_cast<float>(acc[j] / sum);
        }
      },
      threads);
  return full;
}

SetQuality EvaluateSet(const EvalSet& set, const FullAttention& full, int64_t q,
                       const int64_t* ids, int64_t count) {
  const int32_t d = set.dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const float* query = set.queries.data() + q * d;
  std::vector<double> logits;
  std::vector<int64_t> members;
  for (int64_t j = 0; j < count; ++j) {
    if (ids[j] < 0) continue;
    members.push_back(ids[j]);
    logits.push_back(index::DotRow(query, set.keys.data() + ids[j] * d, DType::kF16, d) * scale);
  }
  SetQuality quality;
  if (members.empty()) {
    quality.out_rel_err = 1;
    return quality;
  }
  const double m = *std::max_element(logits.begin(), logits.end());
  double sum = 0, mass = 0;
  std::vector<double> acc(d, 0.0);
  for (size_t i = 0; i < members.size(); ++i) {
    mass += std::exp(logits[i] - full.lse[q]);
    const double w = std::exp(logits[i] - m);
    sum += w;
    const float* v = set.values.data() + members[i] * d;
    for (int32_t j = 0; j < d; ++j) acc[j] += w * v[j];
  }
  double err = 0, ref = 0;
  for (int32_t j = 0; j < d; ++j) {
    const double o = full.out[q * d + j];
    err += (acc[j] / sum - o) * (acc[j] / sum - o);
    ref += o * o;
  }
  quality.mass = mass;
  quality.out_rel_err = ref > 0 ? std::sqrt(err / ref) : std::sqrt(err);
  return quality;
}

double RecallAt(const int64_t* got, int64_t got_count, const int64_t* truth, int32_t k) {
  std::unordered_set<int64_t> t(truth, truth + k);
  t.erase(-1);
  int64_t hits = 0;
  for (int64_t j = 0; j < got_count; ++j) hits += got[j] >= 0 && t.count(got[j]) > 0;
  return k > 0 ? static_cast<double>(hits) / k : 0;
}

}  // namespace kvrecall::bench
