#pragma once

// Quest (Tang et al., arXiv 2406.10774): keys grouped in pages of `page_size` consecutive
// positions; per page the element-wise max M_p and min m_p of its keys. A
// query ranks pages by the upper bound
//   U_p = Σ_j max(q_j·M_{p,j}, q_j·m_{p,j}) = q⁺·M_p + q⁻·m_p
// (q⁺ = max(q, 0), q⁻ = min(q, 0)), which is >= q·k for every key k of the
// page, scores the keys of the top pages exactly, and returns the top k.
//
// Storage: the keys as given (their dtype) and the bounds M, m (one d-vector
// per page each, in the keys' dtype: a min or max of representable values is
// representable, so the bounds are exact), all in the transposed 16-vector
// tiles of index/tile_scoring.h: the bound pass scores 16 pages and the
// exact pass 16 keys per vector load, bit-identical to DotRow (so exact scores
// equal flat's). Pages are aligned to positions: page p holds
// [p·page_size, (p+1)·page_size); the last page may be partial and Add()
// widens it before opening new pages.
//
// Knobs (SearchParams::knobs):
//   pages  the effort knob: pages scored exactly, >= 1; default
//          8·ceil(k / page_size). Raised to ceil(k / page_size) so that k keys
//          can be returned; at or above the number of eligible pages every
//          eligible key is scored exactly, which is the flat result.
// Exclusions: a page wholly inside excluded ranges is skipped (no bound); a
// partly excluded page keeps its bound (still an upper bound of its eligible
// keys) and only its eligible keys are scored.
// Stats, per query: a bound reads two d-vectors, so keys_scanned counts 2 per
// computed page bound plus 1 per exactly scored key; exact_scores counts the
// exactly scored keys; visited counts the pages whose keys were scored
// exactly. The kernels work on whole tiles, and what they compute is counted:
// bounds of the 16-page tiles holding eligible pages, keys of the 16-key
// tiles covering the selected pages (both clipped to the index). When every
// eligible page is selected no bound is computed (the selection would be
// moot) and keys_scanned = exact_scores = the keys of the tiles covering the
// eligible positions.
//
// Build params (BuildIndex): page_size (default 16, range [1, 65536]).
// Format of Serialize(): docs/formats/quest.md.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/progress.h"
#include "index/index_format.h"
#include "index/aligned_vector.h"
#include "index/key_index.h"
#include "index/params.h"

namespace kvrecall::index::quest {

inline constexpr int32_t kMaxPageSize = 65536;

struct QuestOptions {
  // Positions per page, [1, kMaxPageSize]; default 16 (Quest's chunk size).
  int32_t page_size = 16;
  // Threads for computing bounds; 0 = the default pool, 1 = caller only.
  int num_threads = 0;
  // Progress ("bounds"); may be empty; returning false cancels.
  ProgressCallback progress;

  // Options from BuildIndex's build params (page_size). INVALID_ARGUMENT on
  // an unknown key or a value out of range.
  static absl::StatusOr<QuestOptions> FromBuild(const ParamMap& params);
};

// Thread-compatible (see KeyIndex): const methods may run concurrently.
class QuestIndex final : public KeyIndex {
 public:
  static constexpr absl::string_view kKind = "quest";

  // Indexes `keys` [n, d] (f16, bf16 or f32; n may be 0). INVALID_ARGUMENT on
  // a bad page size, d < 1, or non-finite keys; CANCELLED.
  static absl::StatusOr<std::unique_ptr<QuestIndex>> Create(const VectorView& keys,
                                                           const QuestOptions& options);

  // Restores Serialize() bytes (kind "quest"). DATA_LOSS on corrupt bytes;
  // FAILED_PRECONDITION on unsupported versions; INVALID_ARGUMENT for another kind.
  static absl::StatusOr<std::unique_ptr<QuestIndex>> Load(absl::string_view bytes);
  // The same from a header and payload already split by DecodeIndex().
  static absl::StatusOr<std::unique_ptr<QuestIndex>> Load(const IndexHeader& header,
                                                      absl::string_view payload);

  absl::string_view kind() const override { return kKind; }
  int32_t dim() const override { return dim_; }
  int64_t size() const override { return size_; }

  // Widens the last page's bounds and appends pages. INVALID_ARGUMENT when
  // keys.dim != dim(), the dtype differs from the indexed keys', or a key is
  // not finite; the index is unchanged then.
  absl::Status Add(const VectorView& keys) override;

  absl::StatusOr<SearchResult> Search(const VectorView& queries, int32_t k,
                                      const SearchParams& params) const override;

  absl::string_view SearchEffortKnob() const override { return "pages"; }
  // num_pages(): every page scored exactly.
  int64_t MaxSearchEffort() const override { return num_pages(); }

  // The page bounds.
  int64_t IndexBytes() const override {
    return static_cast<int64_t>(max_tiles_.size() + min_tiles_.size());
  }
  int64_t KeyBytes() const override { return static_cast<int64_t>(key_tiles_.size()); }
  const ParamMap& build_params() const override { return build_params_; }
  absl::StatusOr<std::string> Serialize() const override;

  // U_p of every page for one query (the page-scoring step of Search, also
  // the CPU reference of a page-scoring kernel).
  //   query:  [dim()] f32
  //   bounds: [num_pages()] f32, U_p = q⁺·M_p + q⁻·m_p
  void PageUpperBounds(const float* query, float* bounds) const;

  int32_t page_size() const { return page_size_; }
  int64_t num_pages() const { return (size_ + page_size_ - 1) / page_size_; }
  DType key_dtype() const { return dtype_; }

 private:
  QuestIndex(int32_t dim, int32_t page_size, DType dtype, ParamMap build_params);

  // Appends keys and updates/creates the bounds of the pages they fall in.
  absl::Status AppendRows(const VectorView& keys, int num_threads,
                          const ProgressCallback& progress);

  // Search, in parts (quest_index.cc): the pages a search may select, one
  // thread's buffers, and what each query block does with them.
  struct PagePlan;
  struct BlockScratch;
  absl::StatusOr<PagePlan> PlanPages(int32_t k, const SearchParams& params) const;
  // Searches the query blocks [block_begin, block_end) of `q32` into `result`
  // (its top-k) and `lanes_per_query` (keys scored exactly).
  void SearchBlocks(const PagePlan& plan, const std::vector<float>& q32, int32_t k,
                    int64_t block_begin, int64_t block_end, SearchResult* result,
                    std::vector<int64_t>* lanes_per_query) const;
  // The bounds of every planned page for the block's `nb` queries at `q`.
  void BoundPages(const PagePlan& plan, const float* q, int32_t nb, BlockScratch* s) const;
  // The planned number of pages of highest bound for query `b` of the block,
  // in page order, into s->ranked_pages.
  void SelectPages(const PagePlan& plan, int32_t b, BlockScratch* s) const;
  // Scores the key tiles covering [b, e) for `q`, appends the eligible
  // positions of [b, e) and their scores to s->ids / s->exact, and returns
  // the number of keys (tile lanes within size_) scored.
  int64_t ScoreSpan(const PagePlan& plan, const float* q, int64_t b, int64_t e,
                    BlockScratch* s) const;

  int32_t dim_;
  int32_t page_size_;
  DType dtype_;
  ParamMap build_params_;
  int64_t size_ = 0;
  // In the transposed 16-vector tiles of index/tile_scoring.h, zero padded:
  AlignedVector<char> key_tiles_;  // keys: [ceil(size_ / 16), dim_, 16] of dtype_
  AlignedVector<char> max_tiles_;  // page maxima: [ceil(num_pages() / 16), dim_, 16] of dtype_
  AlignedVector<char> min_tiles_;  // page minima: same shape
};

}  // namespace kvrecall::index::quest
