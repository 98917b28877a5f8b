#pragma once

// FlatIndex: exact maximum-inner-product search over all keys, the ground
// truth of every other kind and its baseline.
//
// Keys are kept in transposed tiles of 16 (tile_scoring.h) so that one vector
// load serves 16 keys and up to 4 queries share it; a search scores chunks of
// 1024 keys (L2-resident) against groups of 4 queries and streams the scores
// through a per-query top-k with a threshold check. Work is split over key
// ranges and query blocks on the thread pool. Scores are bit-identical to
// DotRow() (index/distance.h).
//
// Build parameters (docs/formats/flat.md):
//   storage = native | f32   element type of the stored tiles (default native:
//                            f16/bf16 keys stay 2 bytes; f32 converts them)
// Search knobs: none (exact); SearchEffortKnob() is "".

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "index/aligned_vector.h"
#include "index/search_input.h"
#include "index/index_format.h"
#include "index/key_index.h"

namespace kvrecall::index {

class StreamingTopK;

struct FlatOptions {
  // Store the key tiles as f32 (true) or in the keys' own dtype (false).
  // f32 doubles the memory of f16/bf16 keys and saves the conversion on
  // every load; bench/index measures both. Default false.
  bool store_f32 = false;

  // From build params ("storage=native|f32"); INVALID_ARGUMENT on unknown
  // keys or values.
  static absl::StatusOr<FlatOptions> FromParams(const ParamMap& params);
  ParamMap ToParams() const;
};

// Thread-compatible (see KeyIndex).
class FlatIndex final : public KeyIndex {
 public:
  // Indexes keys [n, d] (n may be 0). INVALID_ARGUMENT on a malformed view.
  static absl::StatusOr<std::unique_ptr<FlatIndex>> Build(const VectorView& keys,
                                                          const FlatOptions& options);
  // Restores Serialize() output (header already decoded by DecodeIndex).
  // DATA_LOSS when the payload does not match the header.
  static absl::StatusOr<std::unique_ptr<FlatIndex>> Load(const IndexHeader& header,
                                                         absl::string_view payload);

  absl::string_view kind() const override { return "flat"; }
  int32_t dim() const override { return dim_; }
  int64_t size() const override { return size_; }
  // REQUIRES keys.dtype == the dtype of the built keys (else INVALID_ARGUMENT).
  absl::Status Add(const VectorView& keys) override;
  absl::StatusOr<SearchResult> Search(const VectorView& queries, int32_t k,
                                      const SearchParams& params) const override;
  absl::string_view SearchEffortKnob() const override { return ""; }
  int64_t MaxSearchEffort() const override { return 0; }
  int64_t IndexBytes() const override;
  int64_t KeyBytes() const override;
  const ParamMap& build_params() const override { return build_params_; }
  absl::StatusOr<std::string> Serialize() const override;

  // Exact top-k of f32 queries, the core of Search() without input checks;
  // used by other kinds (graph construction, reranking).
  //   queries: [num_queries, dim()] f32, row-major
  // REQUIRES: 1 <= k; `exclude` built for size().
  SearchResult SearchF32(const float* queries, int64_t num_queries, int32_t k,
                         const ExcludeSet& exclude, int num_threads) const;

  DType key_dtype() const { return key_dtype_; }

 private:
  FlatIndex(int32_t dim, DType key_dtype, const FlatOptions& options);
  absl::Status AppendRows(const VectorView& keys);
  int64_t NumTiles() const { return (size_ + kTileKeysPerTile - 1) / kTileKeysPerTile; }
  size_t TileBytes() const;
  // One work unit of SearchF32: tiles [tile_begin, tile_end) against queries
  // [q_begin, q_end), into their heaps (`heaps`, one per query). Returns keys
  // scored times queries.
  int64_t SearchUnit(const float* queries, int32_t k, const ExcludeSet& exclude,
                     int64_t tile_begin, int64_t tile_end, int64_t q_begin, int64_t q_end,
                     std::vector<StreamingTopK>* heaps) const;

  static constexpr int64_t kTileKeysPerTile = 16;

  const int32_t dim_;
  const DType key_dtype_;   // dtype of the keys given to Build/Add
  const DType tile_dtype_;  // key_dtype_ or kF32
  ParamMap build_params_;
  int64_t size_ = 0;
  AlignedVector<char> tiles_;  // [NumTiles(), dim, 16] of tile_dtype_, zero padded
};

}  // namespace kvrecall::index
