#pragma once

// RoarIndex: the attention-aware graph of RetrievalAttention / RoarGraph
// (docs/index.md; RoarGraph, arXiv 2408.08933, as in RetrievalAttention, arXiv 2409.10516). Decode queries are out of
// distribution for the keys, so a graph of key-to-key proximity navigates
// badly for them; this graph is built from real queries instead:
//
//   1. knn:          exact top-nq keys of every training query; with causal
//                    training (default) only among the keys at or before the
//                    query's position, the keys it really attended to;
//   2. entries:      the key nearest the keys' mean (RoarGraph's entry point)
//                    and the best keys of the latest training queries;
//   3. projection:   each of the first `targets` neighbours t of a training
//                    query gets the query's other neighbours as candidates
//                    (RoarGraph: only the first); pooled per key (the l most
//                    often co-retrieved), occlusion-pruned to m, reverse edges;
//   4. connectivity: every key searches the projected graph (beam l) for
//                    itself; the pruned result (m), with reverse edges (2m),
//                    adds up to 2m edges: degree <= 3m;
//   5. repair:       keys not reachable from the entry points get an edge
//                    from their best reachable key, so that a search with
//                    ef >= size() visits every key.
//
// Search is best-first with a beam of ef >= k from all entry points; at
// ef >= size() it returns exactly the flat result. Add() inserts keys by
// beam search + pruning + reverse edges. The defaults differ from RoarGraph's
// (nq=100, M=35, L=500, one target, non-causal) where attn-dev measured a
// better recall per key scanned (docs/index.md).
//
// Build parameters (docs/formats/roar.md):
//   nq=100        kNN per training query (RoarGraph M_sq), 1..1000
//   m=12          projected out-degree (M_pjbp); final degree <= 3m, 4..256
//   l=200         pool and beam of projection / connectivity (L_pjpq), >= m
//   targets=16    leading kNN entries that become projection targets, 1..1000
//   entries=16    entry points, 1..1024
//   causal=1      training row r is the query at position r % n
//   max_train=0   training queries used, sampled evenly; 0 = all
//   storage=native|f32   dtype of the stored keys
// Search knobs: ef (default 128; clamped up to k).

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/progress.h"
#include "index/index_format.h"
#include "index/key_index.h"
#include "index/roar/graph.h"

namespace kvrecall::index {

namespace roar {
class StageProgress;
}  // namespace roar

struct RoarOptions {
  // Nearest keys per training query in the bipartite kNN graph (RoarGraph
  // M_sq). Default 100, range [1, 1000].
  int32_t nq = 100;
  // Out-degree after projection (RoarGraph M_pjbp); the final degree is at
  // most 3 * m. Default 12, range [4, 256].
  int32_t m = 12;
  // Candidates kept per projection target, and the beam of the
  // connectivity step's searches and of Add() (RoarGraph L_pjpq). Default
  // 200, range [m, 10000].
  int32_t l = 200;
  // Training queries used (evenly sampled when more are given); 0 = all.
  int64_t max_train = 0;
  // Leading kNN entries of each training query that become projection
  // targets (RoarGraph: 1). Default 16, range [1, 1000] (at most nq used).
  int32_t targets = 16;
  // Entry points of every search: the key nearest the keys' mean plus the
  // best keys of the latest training queries (up to entries - 1 distinct).
  // Default 16, range [1, 1024].
  int32_t entries = 16;
  // Training row r is the query at position r % n, whose neighbours are
  // taken among keys 0..r % n only (the keys it attended to). REQUIRES the
  // training rows to be a multiple of the keys. Default true.
  bool causal = true;
  // Store keys as f32 instead of their own dtype. Default false.
  bool store_f32 = false;
  // Build threads; 0 = the default pool.
  int num_threads = 0;
  // Progress (stages "knn", "projection", "connectivity", "repair"); may be
  // empty; returning false cancels the build (CANCELLED).
  ProgressCallback progress;

  // From build params (nq, m, l, max_train, storage); INVALID_ARGUMENT on
  // unknown keys or out-of-range values.
  static absl::StatusOr<RoarOptions> FromParams(const ParamMap& params);
  ParamMap ToParams() const;
};

// Thread-compatible (see KeyIndex): Search may run concurrently.
class RoarIndex final : public KeyIndex {
 public:
  static constexpr int32_t kDefaultEf = 128;

  // Builds over keys [n, d] with training queries [t, d] (prefill queries of
  // the KV head's query group). With no training queries the keys stand in
  // for them (a key-to-key graph). INVALID_ARGUMENT on malformed input,
  // CANCELLED when the progress callback says so.
  static absl::StatusOr<std::unique_ptr<RoarIndex>> Build(const VectorView& keys,
                                                          const VectorView& training_queries,
                                                          const RoarOptions& options);
  static absl::StatusOr<std::unique_ptr<RoarIndex>> Load(const IndexHeader& header,
                                                         absl::string_view payload);

  absl::string_view kind() const override { return "roar"; }
  int32_t dim() const override { return keys_.dim(); }
  int64_t size() const override { return keys_.size(); }
  // REQUIRES keys.dtype == the built keys' dtype (else INVALID_ARGUMENT).
  absl::Status Add(const VectorView& keys) override;
  absl::StatusOr<SearchResult> Search(const VectorView& queries, int32_t k,
                                      const SearchParams& params) const override;
  absl::string_view SearchEffortKnob() const override { return "ef"; }
  int64_t MaxSearchEffort() const override { return std::max<int64_t>(1, size()); }
  int64_t IndexBytes() const override;
  int64_t KeyBytes() const override { return keys_.bytes(); }
  const ParamMap& build_params() const override { return build_params_; }
  absl::StatusOr<std::string> Serialize() const override;

  // Graph statistics and internals (benchmarks, tests).
  double AverageDegree() const;
  const std::vector<uint32_t>& entry_points() const { return entry_points_; }
  const roar::AdjacencyLists& graph() const { return graph_; }
  const roar::KeyStore& keys() const { return keys_; }

 private:
  RoarIndex(int32_t dim, DType key_dtype, const RoarOptions& options);
  // Links node `id` (already in keys_) into the graph: beam search, prune,
  // reverse edges.
  void Insert(uint32_t id);
  // Adds u -> v, re-pruning u's list when it is full.
  void AddEdgeWithPrune(uint32_t u, uint32_t v, int32_t max_degree);
  // Build stage 4, connectivity: every key searches the projected graph
  // (`projected`, m per key) for itself; the graph is the projected lists
  // plus up to 2m of what these searches found (reverse edges added).
  absl::Status Connect(const std::vector<std::vector<uint32_t>>& projected, int threads,
                       roar::StageProgress* progress);
  // Build stage 5, repair: links every key not reachable from the entry
  // points from the best reachable key its search finds.
  absl::Status Repair(roar::StageProgress* progress);

  DType key_dtype_;  // dtype of the keys given to Build (the serialized dtype)
  RoarOptions options_;
  ParamMap build_params_;
  roar::KeyStore keys_;
  roar::AdjacencyLists graph_;
  std::vector<uint32_t> entry_points_ = {0};  // [0] is the medoid
  mutable roar::VisitedPool visited_pool_;
};

}  // namespace kvrecall::index
