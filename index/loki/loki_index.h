#pragma once

// Loki (Singhania et al., arXiv 2406.02542): keys scored in the first r dimensions of their PCA
// rotation, then the top k' candidates reranked with exact scores.
//
// Storage. The index keeps
//   - the rotated key plane K'[:, :R] = (K P^T)[:, :R] in the keys' dtype, in
//     the transposed 16-key tiles of index/tile_scoring.h ([ceil(n/16),
//     R, 16]): the first r <= R rotated dims of every key are contiguous
//     within its tile, and the approximate pass reads r/d of the key bytes
//     with the register-blocked tile kernels (4 queries share each load);
//   - the keys as given, [n, d] in their dtype, row-major: the exact rerank
//     reads the k' candidate rows from here, so exact scores are the same q·k,
//     bit for bit, that the flat index computes (a rotated f32 tail plane
//     [n, d-R] would cost more bytes than f16/bf16 keys and give scores that
//     differ from q·k in the last bits);
//   - the basis P (d x d) and R.
// The basis comes from the "loki_basis" artifact (pca_basis.h) or, when none
// is given, is fitted from the keys being indexed (centred PCA).
//
// Search, per query row q (G query heads of a group are G rows):
//   q' = P[:r] q;  approximate score of every eligible key = q'·K'[t, :r];
//   the k' = max(candidates, k) keys with the best approximate scores get an
//   exact score q·k_t; the top k of those are returned, exact scores
//   descending (ties: smaller position first).
// Knobs (SearchParams::knobs):
//   rank        r, in [1, R]; default R.
//   candidates  k' (the effort knob); >= 1, default 8·k. At or above the number
//               of eligible keys every key is scored exactly: the flat result.
// Stats, per query: keys_scanned += every key that got an r-dim score (Loki
// saves bytes and flops, not keys): the keys of the plane tiles holding
// eligible positions, i.e. all eligible keys plus the excluded ones that share
// a 16-key tile with them; exact_scores += k'. When all eligible keys are
// scored exactly no r-dim pass runs: keys_scanned = exact_scores = eligible.
// visited stays 0.
//
// Build params (BuildIndex): rank (R, default d/4, range [1, d]); layer,
// kv_head (pick one basis from a multi-basis artifact). Format of Serialize():
// docs/formats/loki.md.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/progress.h"
#include "index/aligned_vector.h"
#include "index/index_format.h"
#include "index/key_index.h"
#include "index/loki/pca_basis.h"
#include "index/params.h"

namespace kvrecall::index::loki {

struct LokiOptions {
  // R: width of the stored rotated plane and the default search rank; 0 means
  // d/4 (at least 1). Range [0, d].
  int32_t rank = 0;
  // The rotation. When absent it is fitted from the keys being indexed
  // (centred PCA, FitPcaBasis). REQUIRES when present: basis->dim == key dim.
  std::optional<PcaBasis> basis;
  // Threads for fitting and rotating; 0 = the default pool, 1 = caller only.
  int num_threads = 0;
  // Progress ("fit", "rotate"); may be empty; returning false cancels.
  ProgressCallback progress;

  // Options from BuildIndex's build params (rank, layer, kv_head) and named
  // artifacts ("loki_basis": SerializePcaBases bytes; others are ignored).
  // INVALID_ARGUMENT on an unknown or bad param; DATA_LOSS /
  // FAILED_PRECONDITION / NOT_FOUND from parsing and selecting the basis.
  static absl::StatusOr<LokiOptions> FromBuild(
      const ParamMap& params, const std::vector<std::pair<std::string, std::string>>& artifacts);
};

// Thread-compatible (see KeyIndex): const methods may run concurrently.
class LokiIndex final : public KeyIndex {
 public:
  static constexpr absl::string_view kKind = "loki";

  // Indexes `keys` [n, d] (f16, bf16 or f32; n may be 0 when a basis is
  // given). INVALID_ARGUMENT on a bad rank, a basis of another dimension,
  // non-finite keys, or no basis and no keys to fit one; CANCELLED.
  static absl::StatusOr<std::unique_ptr<LokiIndex>> Create(const VectorView& keys,
                                                          const LokiOptions& options);

  // Restores Serialize() bytes (kind "loki"). DATA_LOSS on corrupt bytes;
  // FAILED_PRECONDITION on unsupported versions; INVALID_ARGUMENT when the
  // bytes hold another kind.
  static absl::StatusOr<std::unique_ptr<LokiIndex>> Load(absl::string_view bytes);
  // The same from a header and payload already split by DecodeIndex().
  static absl::StatusOr<std::unique_ptr<LokiIndex>> Load(const IndexHeader& header,
                                                      absl::string_view payload);

  absl::string_view kind() const override { return kKind; }
  int32_t dim() const override { return basis_.dim; }
  int64_t size() const override { return size_; }

  // Rotates and appends. INVALID_ARGUMENT when keys.dim != dim(), the dtype
  // differs from the indexed keys' dtype, or a key is not finite; the index
  // is unchanged then.
  absl::Status Add(const VectorView& keys) override;

  absl::StatusOr<SearchResult> Search(const VectorView& queries, int32_t k,
                                      const SearchParams& params) const override;

  absl::string_view SearchEffortKnob() const override { return "candidates"; }
  // size(): every key is reranked exactly.
  int64_t MaxSearchEffort() const override { return size_; }

  // The rotated plane and the basis.
  int64_t IndexBytes() const override;
  int64_t KeyBytes() const override { return static_cast<int64_t>(keys_.size()); }
  const ParamMap& build_params() const override { return build_params_; }
  absl::StatusOr<std::string> Serialize() const override;

  const PcaBasis& basis() const { return basis_; }
  // R, the width of the stored rotated plane.
  int32_t rank() const { return rank_; }
  DType key_dtype() const { return dtype_; }

 private:
  LokiIndex(PcaBasis basis, int32_t rank, DType dtype, ParamMap build_params);

  // Rotates rows of `keys` into plane rows [size_, size_ + keys.rows) and
  // copies the keys; on an error (non-finite keys, cancellation) nothing
  // changes. REQUIRES: keys.dtype == dtype_, keys.dim == dim().
  absl::Status AppendRows(const VectorView& keys, int num_threads,
                          const ProgressCallback& progress);

  // Search, in parts (loki_index.cc): what a search scores, one thread's
  // buffers, and what each query block does with them.
  struct CandidatePlan;
  struct BlockScratch;
  absl::StatusOr<CandidatePlan> PlanCandidates(int32_t k, const SearchParams& params) const;
  // The r-dim pass: the block's `nb` queries at `q`, rotated, against the
  // planned plane tiles, into s->approx.
  void ApproximateScores(const CandidatePlan& plan, const float* q, int32_t nb,
                         BlockScratch* s) const;
  // Every eligible key scored exactly for `q`, into s->ids / s->exact.
  void ScoreAllEligible(const CandidatePlan& plan, const float* q, BlockScratch* s) const;
  // The planned number of candidates of query `b` of the block (highest
  // approximate scores), in position order, scored exactly into s->ids /
  // s->exact.
  void ScoreCandidates(const CandidatePlan& plan, const float* q, int32_t b,
                       BlockScratch* s) const;

  PcaBasis basis_;
  int32_t rank_;  // R
  DType dtype_;
  ParamMap build_params_;
  int64_t size_ = 0;
  std::vector<char> keys_;   // [size_, d] elements of dtype_, row-major
  // (P k)[:rank_] of every key in transposed tiles of 16 keys
  // (index/tile_scoring.h): [ceil(size_ / 16), rank_, 16] elements of
  // dtype_, zero padded; the first r rows of a tile are the first r rotated
  // dims of its 16 keys.
  AlignedVector<char> plane_tiles_;
};

}  // namespace kvrecall::index::loki
