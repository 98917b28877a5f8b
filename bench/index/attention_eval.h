#pragma once

// Quality of a retrieved key set for decode queries (recall of the exact top-k, attention mass, output error):
// recall of the exact top-k, attention mass captured and the relative error
// of the attention output over the set against full attention. Attention is
// over the indexed keys (the prefix a retrieval index serves), with logits
// q·k / sqrt(d) in natural log.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/types.h"

namespace kvrecall::bench {

// One evaluation case: the keys and values of a context for one KV head,
// the decode queries of its query heads, and the prefill queries that index
// builds may train on. Value type.
struct EvalSet {
  std::string name;           // "L3/h0", "synthetic-131072"
  int32_t layer = -1;         // -1 for synthetic
  int32_t kv_head = -1;
  int32_t dim = 0;
  int64_t num_keys = 0;
  std::vector<uint16_t> keys;      // [num_keys, dim] f16
  std::vector<float> values;       // [num_keys, dim]
  DType training_dtype = DType::kF16;
  int64_t num_training = 0;
  std::vector<char> training;      // [num_training, dim] of training_dtype
  int64_t num_queries = 0;
  std::vector<float> queries;      // [num_queries, dim]
};

// Loads layer `layer`, KV head `kv_head` of an attn-dev style capture in
// `dir` (layerLL_{q,k,v}.npy: q [Hq, T, d], k and v [Hkv, T, d], f16).
// The last `decode` positions of every query head of the group are the
// queries; positions before them are the keys and values, and the prefill
// queries of those positions (all heads of the group) the training queries.
absl::StatusOr<EvalSet> LoadCapture(const std::string& dir, int32_t layer, int32_t kv_head,
                                    int64_t decode);

// A long context built from a capture: `copies` copies of the prefix of
// layer `layer`, KV head `kv_head`, placed one after another. Keys and
// queries are post-RoPE, so copy c is the capture shifted by c * n positions
// (each pair (i, i + d/2) rotated by c * n * theta^(-2i/d), theta = 10000):
// the keys the model would produce for the same text c * n positions later.
// The decode queries follow the last copy; the training queries are the
// prefill queries of every copy, in position order. Scores against the last
// copy are the capture's own; earlier copies are seen from further away.
absl::StatusOr<EvalSet> MakeTiledCapture(const std::string& dir, int32_t layer, int32_t kv_head,
                                         int64_t decode, int64_t copies);

// A synthetic set from index/testing/synthetic_attention.h with `num_keys`
// keys, 2 query heads and `decode` decode queries per head.
absl::StatusOr<EvalSet> MakeSynthetic(int64_t num_keys, int64_t decode, uint64_t seed);

// Full attention of every query over all keys. Value type.
struct FullAttention {
  std::vector<double> lse;  // [num_queries], natural log
  std::vector<float> out;   // [num_queries, dim]
};
FullAttention ComputeFullAttention(const EvalSet& set, int threads);

struct SetQuality {
  double mass = 0;         // sum of the full-attention weights of the set
  double out_rel_err = 0;  // |o_S - o*| / |o*|, o_S = attention restricted to the set
};

// Quality of the set `ids` (count entries, -1 entries ignored) for query q.
SetQuality EvaluateSet(const EvalSet& set, const FullAttention& full, int64_t q,
                       const int64_t* ids, int64_t count);

// |got ∩ truth[0..k)| / k; -1 entries of got are ignored.
double RecallAt(const int64_t* got, int64_t got_count, const int64_t* truth, int32_t k);

}  // namespace kvrecall::bench
