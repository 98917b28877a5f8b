#pragma once

// CPU partial attention over a subset of positions, and the exact merge of
// partial states (methods.md §0.2). For query head h with query q and a set S
// of positions of its KV head g = h / group_size:
//
//   s_i = scale * q·k_i           (scale = 1/sqrt(head_dim) unless given)
//   m   = max_{i∈S} s_i,   l = Σ_{i∈S} exp(s_i − m)
//   o   = (1/l) Σ_{i∈S} exp(s_i − m) v_i,   lse = m + ln l   (natural log)
//
// Merging the (o, lse) of disjoint sets gives exact softmax attention over
// their union. An empty set has lse = −inf and o = 0 and is the identity of
// the merge.

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/thread_pool.h"
#include "service/retrieval/kv_view.h"

namespace kvrecall::retrieval {

struct PartialAttentionArgs {
  const float* queries = nullptr;  // [num_q_heads, head_dim] f32, post-RoPE
  int32_t num_q_heads = 0;         // = num_kv_heads * group_size
  int32_t group_size = 1;          // query heads per KV head (GQA)
  // Positions attended by each query head: ids[h] (any order, no duplicates,
  // each < kv.num_tokens). Either num_q_heads lists, or num_kv_heads lists
  // shared by the group's query heads.
  std::vector<absl::Span<const int64_t>> ids;
  float scale = 0;                 // 0 means 1/sqrt(head_dim)
  int num_threads = 0;             // 0: the default pool; 1: caller only
};

struct PartialAttentionResult {
  std::vector<float> out;  // [num_q_heads, head_dim] f32
  std::vector<float> lse;  // [num_q_heads], natural log; -inf for an empty set
};

// Computes the partial attention of every query head over its ids.
// INVALID_ARGUMENT on shape mismatches or out-of-range ids.
// Thread-safe (pure function of its arguments).
absl::Status ComputePartialAttention(const LayerKvView& kv, const PartialAttentionArgs& args,
                                     PartialAttentionResult* result);

// Merges `parts` (each [num_heads, head_dim] + [num_heads]) into `merged`,
// head by head, in the max-subtracted form:
//   M = max_j lse_j,  lse = M + ln Σ_j exp(lse_j − M),  o = Σ_j exp(lse_j − lse) o_j.
void MergeAttentionStates(const std::vector<const PartialAttentionResult*>& parts,
                          int32_t num_heads, int32_t head_dim, PartialAttentionResult* merged);

}  // namespace kvrecall::retrieval
