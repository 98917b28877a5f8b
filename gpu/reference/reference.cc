#include "gpu/reference/reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "gpu/reference/half_convert.h"

namespace kvrecall::gpu::reference {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

float LoadHalf(const void* base, int64_t index, DType dtype) {
  return HalfBitsToFloat(static_cast<const uint16_t*>(base)[index], dtype);
}

double Scale(float sm_scale, int32_t head_dim) {
  return sm_scale > 0.0f ? static_cast<double>(sm_scale) : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// Element offset of (position, kv_head) of sequence b, or -1 when the
// position or its page id is out of range.
int64_t ResolveToken(const PagedKvCache& kv, int32_t b, int64_t pos, int32_t kv_head) {
  const int32_t seq_len = kv.seq_lens[b];
  if (pos < 0 || pos >= seq_len) return -1;
  const int64_t page_index = pos / kv.page_size;
  if (page_index >= kv.max_pages_per_seq) return -1;
  const int32_t page = kv.page_table[static_cast<int64_t>(b) * kv.max_pages_per_seq + page_index];
  if (page < 0 || page >= kv.num_pages) return -1;
  return page * kv.page_stride + (pos - page_index * kv.page_size) * kv.token_stride + kv_head * kv.head_stride;
}

// Element offset of `pos` of sequence b (kv_head 0) in a paged pool, or -1
// when the position has no valid page. Unlike ResolveToken, the position is
// not checked against seq_lens (AppendKv and ComputePageBounds bound it).
int64_t ResolveSlot(const PagedKvCache& kv, int32_t b, int64_t pos) {
  if (pos < 0) return -1;
  const int64_t page_index = pos / kv.page_size;
  if (page_index >= kv.max_pages_per_seq) return -1;
  const int32_t page = kv.page_table[static_cast<int64_t>(b) * kv.max_pages_per_seq + page_index];
  if (page < 0 || page >= kv.num_pages) return -1;
  return page * kv.page_stride + (pos - page_index * kv.page_size) * kv.token_stride;
}

// Element i of an f32, bf16 or f16 array.
double LoadAny(const void* base, int64_t index, DType dtype) {
  if (dtype == DType::kF32) return static_cast<const float*>(base)[index];
  return LoadHalf(base, index, dtype);
}

void StoreAny(void* base, int64_t index, DType dtype, double value) {
  const float f = static_cast<float>(value);
  if (dtype == DType::kF32) {
    static_cast<float*>(base)[index] = f;
  } else {
    static_cast<uint16_t*>(base)[index] = FloatToHalfBits(f, dtype);
  }
}

// Attention of one f32 query over the K/V rows at `offsets` (all valid),
// in float64. Writes o [head_dim] and returns lse (natural log).
double AttendRows(const PagedKvCache& kv, const float* q, double scale, const std::vector<int64_t>& offsets,
                  float* o_out) {
  const int d = kv.head_dim;
  if (offsets.empty()) {
    std::fill(o_out, o_out + d, 0.0f);
    return kNegInf;
  }
  std::vector<double> logits(offsets.size());
  double m = kNegInf;
  for (size_t i = 0; i < offsets.size(); ++i) {
    double dot = 0;
    for (int j = 0; j < d; ++j) dot += static_cast<double>(q[j]) * LoadHalf(kv.k, offsets[i] + j, kv.dtype);
    logits[i] = scale * dot;
    m = std::max(m, logits[i]);
  }
  double l = 0;
  std::vector<double> acc(d, 0.0);
  for (size_t i = 0; i < offsets.size(); ++i) {
    const double p = std::exp(logits[i] - m);
    l += p;
    for (int j = 0; j < d; ++j) acc[j] += p * LoadHalf(kv.v, offsets[i] + j, kv.dtype);
  }
  for (int j = 0; j < d; ++j) o_out[j] = static_cast<float>(acc[j] / l);
  return m + std::log(l);
}

// The radix-select order: larger first, NaN above +inf, -0 below +0.
uint32_t OrderKey(float x) {
  if (std::isnan(x)) return 0xffffffffu;
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}

// Top-k of one row in descending order, ties by the smaller index.
void TopKRow(const float* row, int32_t n, int32_t k, int32_t* indices, float* values) {
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [row](int32_t a, int32_t b) {
    const uint32_t ka = OrderKey(row[a]);
    const uint32_t kb = OrderKey(row[b]);
    return ka != kb ? ka > kb : a < b;
  });
  for (int32_t i = 0; i < k; ++i) {
    indices[i] = order[i];
    if (values != nullptr) values[i] = row[order[i]];
  }
}

}  // namespace

bool ScoreRanksBefore(float a, float b) { return OrderKey(a) > OrderKey(b); }

bool SparseDecodeAttention(const SparseDecodeArgs& a) {
  if (ValidateSparseDecodeArgs(a) != nullptr) return false;
  const PagedKvCache& kv = a.kv;
  const int32_t d = kv.head_dim;
  const int32_t group = a.num_q_heads / kv.num_kv_heads;
  const int32_t num_lists = a.lists_per_kv_head ? kv.num_kv_heads : a.num_q_heads;
  const int32_t heads_per_list = a.lists_per_kv_head ? group : 1;
  const double scale = Scale(a.sm_scale, d);
  for (int32_t b = 0; b < a.batch_size; ++b) {
    for (int32_t l = 0; l < num_lists; ++l) {
      const int64_t list = static_cast<int64_t>(b) * num_lists + l;
      int32_t len = a.list_lens != nullptr ? a.list_lens[list] : a.max_list_len;
      if (len < 0 || len > a.max_list_len) {
        if (a.num_invalid != nullptr) ++*a.num_invalid;
        len = std::clamp(len, 0, a.max_list_len);
      }
      const int32_t kv_head = l * heads_per_list / group;
      std::vector<int64_t> offsets;
      for (int32_t i = 0; i < len; ++i) {
        const int64_t off = ResolveToken(kv, b, a.positions[list * a.max_list_len + i], kv_head);
        if (off < 0) {
          if (a.num_invalid != nullptr) ++*a.num_invalid;
        } else {
          offsets.push_back(off);
        }
      }
      for (int32_t g = 0; g < heads_per_list; ++g) {
        const int64_t row = static_cast<int64_t>(b) * a.num_q_heads + l * heads_per_list + g;
        const double lse = AttendRows(kv, a.q + row * d, scale, offsets, a.o + row * d);
        if (a.lse != nullptr) a.lse[row] = static_cast<float>(lse);
      }
    }
  }
  return true;
}

bool DenseDecodeAttention(const DenseDecodeArgs& a) {
  if (ValidateDenseDecodeArgs(a) != nullptr) return false;
  const PagedKvCache& kv = a.kv;
  const int32_t d = kv.head_dim;
  const int32_t group = a.num_q_heads / kv.num_kv_heads;
  const double scale = Scale(a.sm_scale, d);
  const int64_t stride = a.scores_stride != 0 ? a.scores_stride : a.max_seq_len;
  std::vector<float> own_scores;
  float* scores = a.scores;
  if (scores == nullptr && a.top_k > 0) {
    own_scores.resize(static_cast<size_t>(a.batch_size) * a.num_q_heads * stride);
    scores = own_scores.data();
  }
  for (int32_t b = 0; b < a.batch_size; ++b) {
    const int32_t seq_len = kv.seq_lens[b];
    const int32_t len = std::clamp(seq_len, 0, a.max_seq_len);
    for (int32_t kv_head = 0; kv_head < kv.num_kv_heads; ++kv_head) {
      if (seq_len < 0 || seq_len > a.max_seq_len) {
        if (a.num_invalid != nullptr) ++*a.num_invalid;
      }
      std::vector<int64_t> offsets;
      std::vector<int32_t> token_of;  // position of each valid offset
      for (int32_t t = 0; t < len; ++t) {
        const int64_t off = ResolveToken(kv, b, t, kv_head);
        if (off < 0) {
          if (a.num_invalid != nullptr) ++*a.num_invalid;
        } else {
          offsets.push_back(off);
          token_of.push_back(t);
        }
      }
      for (int32_t g = 0; g < group; ++g) {
        const int64_t row = static_cast<int64_t>(b) * a.num_q_heads + kv_head * group + g;
        const float* q = a.q + row * d;
        const double lse = AttendRows(kv, q, scale, offsets, a.o + row * d);
        if (a.lse != nullptr) a.lse[row] = static_cast<float>(lse);
        if (scores != nullptr) {
          float* srow = scores + row * stride;
          std::fill(srow, srow + a.max_seq_len, -std::numeric_limits<float>::infinity());
          for (size_t i = 0; i < offsets.size(); ++i) {
            double dot = 0;
            for (int j = 0; j < d; ++j) dot += static_cast<double>(q[j]) * LoadHalf(kv.k, offsets[i] + j, kv.dtype);
            srow[token_of[i]] = static_cast<float>(scale * dot);
          }
          if (a.top_k > 0) TopKRow(srow, a.max_seq_len, a.top_k, a.top_k_positions + row * a.top_k, nullptr);
        }
      }
    }
  }
  return true;
}

bool MergeStates(const MergeStatesArgs& a) {
  if (ValidateMergeStatesArgs(a) != nullptr) return false;
  const int32_t d = a.head_dim;
  for (int32_t h = 0; h < a.num_heads; ++h) {
    double m = kNegInf;
    for (int32_t j = 0; j < a.num_states; ++j) {
      m = std::max(m, static_cast<double>(a.lse_states[j * a.lse_state_stride + h * a.lse_head_stride]));
    }
    std::vector<double> acc(d, 0.0);
    double lse = kNegInf;
    if (m != kNegInf) {
      double sum = 0;
      for (int32_t j = 0; j < a.num_states; ++j) {
        const double w = std::exp(a.lse_states[j * a.lse_state_stride + h * a.lse_head_stride] - m);
        sum += w;
        for (int32_t i = 0; i < d; ++i) acc[i] += w * a.o_states[j * a.o_state_stride + h * a.o_head_stride + i];
      }
      for (int32_t i = 0; i < d; ++i) acc[i] /= sum;
      lse = m + std::log(sum);
    }
    for (int32_t i = 0; i < d; ++i) {
      const float f = static_cast<float>(acc[i]);
      const int64_t idx = static_cast<int64_t>(h) * d + i;
      if (a.out_dtype == DType::kF32) {
        static_cast<float*>(a.o)[idx] = f;
      } else {
        static_cast<uint16_t*>(a.o)[idx] = FloatToHalfBits(f, a.out_dtype);
      }
    }
    if (a.lse != nullptr) a.lse[h] = static_cast<float>(lse);
  }
  return true;
}

bool TopK(const TopKArgs& a) {
  if (ValidateTopKArgs(a) != nullptr) return false;
  const int64_t stride = a.row_stride != 0 ? a.row_stride : a.num_cols;
  for (int32_t r = 0; r < a.num_rows; ++r) {
    TopKRow(a.scores + r * stride, a.num_cols, a.k, a.indices + static_cast<int64_t>(r) * a.k,
            a.values != nullptr ? a.values + static_cast<int64_t>(r) * a.k : nullptr);
  }
  return true;
}

bool LokiScore(const LokiScoreArgs& a) {
  if (ValidateLokiScoreArgs(a) != nullptr) return false;
  const int32_t group = a.num_q_heads / a.num_kv_heads;
  const double scale = Scale(a.sm_scale, a.head_dim);
  const int64_t n = a.max_seq_len;
  std::vector<float> own_scores;
  float* scores = a.scores_dtype == DType::kF32 ? static_cast<float*>(a.scores) : nullptr;
  if (scores == nullptr) {
    own_scores.resize(static_cast<size_t>(a.batch_size) * a.num_q_heads * n);
    scores = own_scores.data();
  }
  for (int32_t b = 0; b < a.batch_size; ++b) {
    const int32_t len = std::clamp(a.seq_lens[b], 0, a.max_seq_len);
    for (int32_t h = 0; h < a.num_q_heads; ++h) {
      const int64_t row = static_cast<int64_t>(b) * a.num_q_heads + h;
      const float* q = a.q + row * a.rank;
      const int64_t base = b * a.seq_stride + static_cast<int64_t>(h / group) * a.head_stride;
      float* srow = scores + row * n;
      for (int64_t t = 0; t < n; ++t) {
        if (t >= len) {
          srow[t] = -std::numeric_limits<float>::infinity();
          continue;
        }
        double dot = 0;
        for (int32_t j = 0; j < a.rank; ++j) {
          dot += static_cast<double>(q[j]) * LoadHalf(a.keys, base + t * a.rank + j, a.dtype);
        }
        srow[t] = static_cast<float>(scale * dot);
      }
      if (a.k > 0) TopKRow(srow, a.max_seq_len, a.k, a.top_k_positions + row * a.k, nullptr);
    }
  }
  if (a.scores_dtype != DType::kF32) {  // 16-bit scores: each f32 score rounded once
    const int64_t count = static_cast<int64_t>(a.batch_size) * a.num_q_heads * n;
    for (int64_t i = 0; i < count; ++i) {
      static_cast<uint16_t*>(a.scores)[i] = FloatToHalfBits(scores[i], a.scores_dtype);
    }
  }
  return true;
}

bool QuestScore(const QuestScoreArgs& a) {
  if (ValidateQuestScoreArgs(a) != nullptr) return false;
  const int32_t group = a.num_q_heads / a.num_kv_heads;
  const int32_t d = a.head_dim;
  const double scale = Scale(a.sm_scale, d);
  const int64_t n = a.max_pages;
  std::vector<float> own_scores;
  float* scores = a.scores;
  if (scores == nullptr) {
    own_scores.resize(static_cast<size_t>(a.batch_size) * a.num_q_heads * n);
    scores = own_scores.data();
  }
  for (int32_t b = 0; b < a.batch_size; ++b) {
    const int32_t pages = std::clamp(a.num_pages[b], 0, a.max_pages);
    for (int32_t h = 0; h < a.num_q_heads; ++h) {
      const int64_t row = static_cast<int64_t>(b) * a.num_q_heads + h;
      const float* q = a.q + row * d;
      const int64_t base = b * a.seq_stride + static_cast<int64_t>(h / group) * a.head_stride;
      float* srow = scores + row * n;
      for (int64_t p = 0; p < n; ++p) {
        if (p >= pages) {
          srow[p] = -std::numeric_limits<float>::infinity();
          continue;
        }
        double bound = 0;
        for (int32_t j = 0; j < d; ++j) {
          const double qj = q[j];
          const double hi = qj * LoadHalf(a.page_max, base + p * d + j, a.dtype);
          const double lo = qj * LoadHalf(a.page_min, base + p * d + j, a.dtype);
          bound += std::max(hi, lo);
        }
        srow[p] = static_cast<float>(scale * bound);
      }
      if (a.k > 0) TopKRow(srow, a.max_pages, a.k, a.top_k_pages + row * a.k, nullptr);
    }
  }
  return true;
}

bool AdvanceSeqLens(const AdvanceSeqLensArgs& a) {
  if (ValidateAdvanceSeqLensArgs(a) != nullptr) return false;
  for (int32_t b = 0; b < a.batch_size; ++b) {
    a.seq_lens[b] += a.num_tokens;
    if (a.pages != nullptr) {
      const int64_t len = std::max(a.seq_lens[b], 0);
      a.pages[b] = static_cast<int32_t>((len + a.page_size - 1) / a.page_size);
    }
  }
  return true;
}

bool AppendKv(const AppendKvArgs& a) {
  if (ValidateAppendKvArgs(a) != nullptr) return false;
  const PagedKvCache& kv = a.kv;
  uint16_t* k = static_cast<uint16_t*>(const_cast<void*>(kv.k));
  uint16_t* v = static_cast<uint16_t*>(const_cast<void*>(kv.v));
  const uint16_t* ks = static_cast<const uint16_t*>(a.k_src);
  const uint16_t* vs = static_cast<const uint16_t*>(a.v_src);
  for (int32_t b = 0; b < a.batch_size; ++b) {
    const int64_t start = a.start_positions != nullptr ? a.start_positions[b]
                                                       : static_cast<int64_t>(kv.seq_lens[b]) - a.num_tokens;
    for (int32_t t = 0; t < a.num_tokens; ++t) {
      const int64_t slot = ResolveSlot(kv, b, start + t);
      if (slot < 0) continue;
      for (int32_t h = 0; h < kv.num_kv_heads; ++h) {
        const int64_t dst = slot + h * kv.head_stride;
        const int64_t src = b * a.src_batch_stride + h * a.src_head_stride + t * a.src_token_stride;
        std::copy(ks + src, ks + src + kv.head_dim, k + dst);
        std::copy(vs + src, vs + src + kv.head_dim, v + dst);
      }
    }
  }
  return true;
}

bool ProjectRows(const ProjectRowsArgs& a) {
  if (ValidateProjectRowsArgs(a) != nullptr) return false;
  const int64_t d = a.head_dim;
  std::vector<double> x(d);
  for (int32_t b = 0; b < a.batch_size; ++b) {
    const int64_t offset = a.offset_from_seq_lens ? static_cast<int64_t>(a.seq_lens[b]) - a.num_tokens : 0;
    for (int32_t h = 0; h < a.num_heads; ++h) {
      const float* mat = a.matrices + static_cast<int64_t>(h / a.heads_per_matrix) * d * a.matrix_cols;
      for (int32_t t = 0; t < a.num_tokens; ++t) {
        const int64_t pos = t + offset;
        if (pos < 0 || (a.max_positions > 0 && pos >= a.max_positions)) continue;
        const int64_t xb = b * a.x_batch_stride + h * a.x_head_stride + t * a.x_token_stride;
        for (int64_t i = 0; i < d; ++i) x[i] = LoadAny(a.x, xb + i, a.x_dtype);
        const int64_t yb = b * a.y_batch_stride + h * a.y_head_stride + pos * a.y_token_stride;
        for (int32_t j = 0; j < a.rank; ++j) {
          double sum = 0;
          for (int64_t i = 0; i < d; ++i) sum += x[i] * mat[i * a.matrix_cols + j];
          StoreAny(a.y, yb + j, a.y_dtype, sum);
        }
      }
    }
  }
  return true;
}

bool ComputePageBounds(const PageBoundsArgs& a) {
  if (ValidatePageBoundsArgs(a) != nullptr) return false;
  const PagedKvCache& kv = a.kv;
  const int32_t d = kv.head_dim;
  const int64_t psz = a.quest_page_size;
  std::vector<float> mx(d), mn(d);
  for (int32_t b = 0; b < a.batch_size; ++b) {
    const int64_t len = std::max(kv.seq_lens[b], 0);
    const int64_t pages = (len + psz - 1) / psz;
    const int64_t first = a.last_pages == 0 ? 0 : std::max<int64_t>(0, pages - a.last_pages);
    const int64_t end = std::min<int64_t>(pages, a.max_pages);
    for (int32_t h = 0; h < kv.num_kv_heads; ++h) {
      for (int64_t p = first; p < end; ++p) {
        std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
        std::fill(mn.begin(), mn.end(), std::numeric_limits<float>::infinity());
        for (int64_t pos = p * psz; pos < std::min((p + 1) * psz, len); ++pos) {
          const int64_t slot = ResolveSlot(kv, b, pos);
          if (slot < 0) continue;
          for (int32_t j = 0; j < d; ++j) {
            const float x = static_cast<float>(LoadHalf(kv.k, slot + h * kv.head_stride + j, kv.dtype));
            mx[j] = std::fmax(mx[j], x);
            mn[j] = std::fmin(mn[j], x);
          }
        }
        const int64_t out = b * a.seq_stride + h * a.head_stride + p * d;
        for (int32_t j = 0; j < d; ++j) {
          static_cast<uint16_t*>(a.page_max)[out + j] = FloatToHalfBits(mx[j], kv.dtype);
          static_cast<uint16_t*>(a.page_min)[out + j] = FloatToHalfBits(mn[j], kv.dtype);
        }
      }
    }
  }
  return true;
}

bool MaskScores(const MaskScoresArgs& a) {
  if (ValidateMaskScoresArgs(a) != nullptr) return false;
  const int64_t stride = a.row_stride != 0 ? a.row_stride : a.num_cols;
  for (int32_t r = 0; r < a.num_rows; ++r) {
    const int64_t hi = static_cast<int64_t>(a.seq_lens[r / a.rows_per_seq]) - a.window;
    float* row = a.scores + r * stride;
    for (int64_t c = 0; c < a.num_cols; ++c) {
      const bool keep = c * a.unit < hi && (c + 1) * a.unit > a.sinks;
      if (!keep) row[c] = -std::numeric_limits<float>::infinity();
    }
  }
  return true;
}

bool ComposeLists(const ComposeListsArgs& a) {
  if (ValidateComposeListsArgs(a) != nullptr) return false;
  for (int32_t b = 0; b < a.batch_size; ++b) {
    const int64_t len = std::max(a.seq_lens[b], 0);
    const int64_t hi = len - a.window;  // the expansion stays in [sinks, hi)
    for (int32_t l = 0; l < a.num_lists; ++l) {
      const int64_t list = static_cast<int64_t>(b) * a.num_lists + l;
      int32_t* out = a.positions + list * a.max_list_len;
      int32_t n = 0;
      for (int64_t p = 0; p < std::min<int64_t>(a.sinks, len); ++p) out[n++] = static_cast<int32_t>(p);
      for (int64_t p = std::max<int64_t>(a.sinks, hi); p < len; ++p) out[n++] = static_cast<int32_t>(p);
      if (a.selected != nullptr) {
        const int32_t* sel = a.selected + list * a.num_selected;
        for (int32_t i = 0; i < a.num_selected; ++i) {
          if (sel[i] < 0) continue;
          const int64_t e = sel[i];
          for (int64_t p = std::max<int64_t>(e * a.unit, a.sinks); p < std::min((e + 1) * a.unit, hi); ++p) {
            out[n++] = static_cast<int32_t>(p);
          }
        }
      }
      a.list_lens[list] = n;
    }
  }
  return true;
}

std::string CheckTopKSelection(const float* row, int32_t n, const int32_t* selected, int32_t k, double tolerance) {
  std::vector<char> taken(n, 0);
  for (int32_t i = 0; i < k; ++i) {
    const int32_t idx = selected[i];
    if (idx < 0 || idx >= n) return "index " + std::to_string(idx) + " out of range at slot " + std::to_string(i);
    if (taken[idx]) return "index " + std::to_string(idx) + " selected twice";
    taken[idx] = 1;
  }
  std::vector<int32_t> best(k);
  TopKRow(row, n, k, best.data(), nullptr);
  const float kth = row[best[k - 1]];
  if (tolerance == 0.0) {
    const uint32_t kth_key = OrderKey(kth);
    for (int32_t i = 0; i < n; ++i) {
      const uint32_t key = OrderKey(row[i]);
      if (taken[i] && key < kth_key) {
        return "selected index " + std::to_string(i) + " ranks below the k-th largest";
      }
      if (!taken[i] && key > kth_key) return "index " + std::to_string(i) + " ranks above the k-th largest but is missing";
    }
    return "";
  }
  for (int32_t i = 0; i < n; ++i) {
    const double s = row[i];
    if (taken[i] && s < static_cast<double>(kth) - tolerance) {
      return "selected index " + std::to_string(i) + " has score " + std::to_string(s) + " < k-th " + std::to_string(kth);
    }
    if (!taken[i] && s > static_cast<double>(kth) + tolerance) {
      return "index " + std::to_string(i) + " has score " + std::to_string(s) + " > k-th " + std::to_string(kth) +
             " but is missing";
    }
  }
  return "";
}

}  // namespace kvrecall::gpu::reference
