#pragma once

// Attention-like synthetic keys, queries and values for tests and scale
// benchmarks (a real capture has only ~8K positions). A context is a
// sequence of segments (like passages of text), each about one of
// num_topics topics; position t has a content state h_t (its segment's
// topic plus an AR(1) wander; Student-t draws, so scores are heavy-tailed)
// and a nuisance state u_t (a faster AR(1)) in a subspace orthogonal to the
// content:
//
//   key     k_t = RoPE_t( mu_k + U u_t + A h_t + noise )
//   query   q_t = RoPE_t( mu_q + focus * A W_g (h_s + noise) + noise )   (head g)
//   value   v_t = C h_t + noise
//
// Most of the key variance is nuisance, which queries do not see, so keys
// close in the key space are not the keys a query scores high. A query looks
// for the content h_s of an earlier position s (within the last
// recent_window positions with probability recent_fraction, else uniform
// over the past) through a head-specific mixing W_g, so its top keys are
// the segments about that topic. mu_k is a shared key offset in the slowest
// RoPE pairs (so that it survives the rotation, as the large mean components
// of real keys do), and mu_q points away from it: queries are out of
// distribution for the keys. The defaults come close to attn-dev layers 3-7
// in |mean k|/|k|, cos(mean q, mean k), norms, logit spread and top-100
// attention mass, but not in where a query's top keys lie: here they spread
// over the context, in real attention most are recent (docs/index.md).

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace kvrecall::index {

struct SyntheticAttentionOptions {
  int64_t num_keys = 8192;          // context positions 0..num_keys-1 (>= 1)
  int32_t dim = 128;                // head dim, even (RoPE pairs i and i + dim/2)
  int32_t num_query_heads = 2;      // query heads sharing the KV head (GQA group), >= 1
  int64_t num_decode_queries = 256; // per head, at positions num_keys, num_keys+1, ...
  int32_t latent_rank = 32;         // rank r of the content state, 1..dim
  int32_t num_topics = 1024;        // distinct segment topics, >= 1
  double segment_length = 64;       // mean positions per segment, >= 1
  double topic_noise = 0.3;         // wandering of h_t around its topic, >= 0
  double head_mixing = 0.3;         // off-diagonal scale of W_g, >= 0
  double target_noise = 0.5;        // noise on the content a query looks for, >= 0
  int32_t nuisance_rank = 32;       // rank of the nuisance state, r + it <= dim
  double content_share = 0.3;       // share of the key variance in A h_t, (0, 1]
  double nuisance_share = 0.6;      // share of the key variance in U u_t, [0, 1 - content]
  double nuisance_correlation = 0.5;  // AR(1) coefficient of u_t, [0, 1)
  double temporal_correlation = 0.9;  // AR(1) coefficient of the wandering, [0, 1)
  double student_t_dof = 6;         // degrees of freedom of the innovations, > 2
  double key_mean_fraction = 0.55;  // |mu_k| / E|k|, [0, 1)
  double query_mean_cos = -0.3;     // cos(mu_q, mu_k), [-1, 1]
  double query_mean_fraction = 0.45;  // |mu_q| / E|q|, [0, 1)
  double key_norm = 20;             // E|k|
  double query_norm = 13;           // E|q| (before query_focus)
  double query_focus = 1.5;         // scale of a query's content part (> 0): logit spread
  double recent_fraction = 0.7;     // queries looking at the recent window, [0, 1]
  int64_t recent_window = 256;      // positions counted as recent, >= 1
  double rope_theta = 10000;        // RoPE base
  uint64_t seed = 1;
};

// Value type; thread-compatible.
struct SyntheticAttention {
  int32_t dim = 0;
  int64_t num_keys = 0;
  int32_t num_query_heads = 0;
  int64_t num_decode_queries = 0;
  std::vector<float> keys;             // [num_keys, dim], post-RoPE
  std::vector<float> values;           // [num_keys, dim]
  std::vector<float> prefill_queries;  // [num_query_heads, num_keys, dim], query of position t at row t
  std::vector<float> decode_queries;   // [num_query_heads, num_decode_queries, dim]
};

// Deterministic for a given options.seed. INVALID_ARGUMENT on out-of-range
// options.
absl::StatusOr<SyntheticAttention> GenerateSyntheticAttention(
    const SyntheticAttentionOptions& options);

}  // namespace kvrecall::index
