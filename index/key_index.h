#pragma once

// KeyIndex: the one interface of every key index of kvrecall (FAISS-like,
// batched, row-major). An index covers the keys of one context for one
// (layer, KV head); the G query heads of that KV head's group are searched in
// one call (GQA). Keys are identified by their position: Build() indexes
// positions 0..n-1, each Add() appends the next positions.
//
// Scores are raw inner products q·k (no 1/sqrt(d) scaling): the attention
// logit times sqrt(d). Search returns, per query, the k keys with the largest
// (approximate) score, in descending order of their exact score.
//
// Kinds (index_factory.h): flat, roar, loki, inverted, quest, faiss_hnsw,
// faiss_ivf. Formats of Serialize() are documented in docs/formats/.

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/progress.h"
#include "common/types.h"
#include "index/params.h"

namespace kvrecall::index {

// A borrowed matrix of vectors: [rows, dim], row-major, `dtype`, rows
// `stride` elements apart (stride == dim for dense matrices).
struct VectorView {
  const void* data = nullptr;  // [rows, stride] elements of dtype; may be null when rows == 0
  int64_t rows = 0;
  int32_t dim = 0;
  DType dtype = DType::kF32;
  int64_t stride = 0;  // elements between consecutive rows; 0 means dim

  int64_t row_stride() const { return stride == 0 ? dim : stride; }
  const void* row(int64_t i) const {
    return static_cast<const char*>(data) + i * row_stride() * DTypeSize(dtype);
  }
  static VectorView F32(const float* data, int64_t rows, int32_t dim) {
    return VectorView{data, rows, dim, DType::kF32, 0};
  }
  static VectorView Empty(int32_t dim) { return VectorView{nullptr, 0, dim, DType::kF32, 0}; }
};

// A half-open range [begin, end) of key positions.
struct PositionRange {
  int64_t begin = 0;
  int64_t end = 0;
};

struct SearchParams {
  // Kind-specific knobs by name; unset knobs take the index's defaults.
  // The effort knob of each kind (SearchEffortKnob()) trades speed for recall
  // and, at its maximum, gives exactly the flat result.
  ParamMap knobs;
  // Results never contain positions in these ranges (e.g. positions resident
  // on the GPU, which the caller attends to itself). Sorted, disjoint.
  std::vector<PositionRange> exclude;
  // Threads used for a batch of queries; 0 = the default pool, 1 = caller only.
  int num_threads = 0;
};

struct SearchStats {
  // Keys whose score (full or approximate, e.g. a Loki r-dim score or a Quest
  // page bound counted per key of the page) was computed, summed over queries.
  // Divided by (queries × size()) it is the fraction of keys scanned.
  int64_t keys_scanned = 0;
  // Full-dimension exact scores computed (reranks), summed over queries.
  int64_t exact_scores = 0;
  // Graph hops / pages / posting entries visited, summed (kind-specific).
  int64_t visited = 0;
};

struct SearchResult {
  int64_t num_queries = 0;
  int32_t k = 0;
  std::vector<int64_t> ids;   // [num_queries, k] positions; -1 pads when fewer than k qualify
  std::vector<float> scores;  // [num_queries, k] exact q·k of ids, descending; -inf pads
  SearchStats stats;

  // num_queries rows of k padding entries (-1 / -inf), for a search to fill.
  static SearchResult Padded(int64_t num_queries, int32_t k) {
    SearchResult result;
    result.num_queries = num_queries;
    result.k = k;
    const size_t entries = static_cast<size_t>(num_queries) * static_cast<size_t>(k);
    result.ids.assign(entries, -1);
    result.scores.assign(entries, -std::numeric_limits<float>::infinity());
    return result;
  }
};

// Thread-compatible: const methods (Search, Serialize, ...) may run
// concurrently; Add() needs external synchronization against everything else.
class KeyIndex {
 public:
  virtual ~KeyIndex() = default;

  // "flat", "roar", ...
  virtual absl::string_view kind() const = 0;
  virtual int32_t dim() const = 0;
  // Keys indexed (positions 0..size()-1).
  virtual int64_t size() const = 0;

  // Appends keys as positions size()..size()+keys.rows-1 (decode-time tokens).
  // INVALID_ARGUMENT when keys.dim != dim(); UNIMPLEMENTED for kinds that
  // cannot grow (they say so and how to rebuild).
  virtual absl::Status Add(const VectorView& keys) = 0;

  // Top-k by score for each query row. INVALID_ARGUMENT when queries.dim !=
  // dim(), k < 1, or a knob is unknown/out of range. Queries with NaN/Inf are
  // rejected by callers, not here.
  virtual absl::StatusOr<SearchResult> Search(const VectorView& queries, int32_t k,
                                              const SearchParams& params) const = 0;

  // The name of the knob that trades speed for recall ("ef", "candidates",
  // "pages", "nprobe", ...), or "" for exact kinds.
  virtual absl::string_view SearchEffortKnob() const = 0;
  // The knob value at which Search returns exactly the flat result.
  virtual int64_t MaxSearchEffort() const = 0;

  // Bytes of index structure in memory beyond the keys themselves (graph
  // edges, codes, bounds, postings), and bytes of the keys as stored.
  virtual int64_t IndexBytes() const = 0;
  virtual int64_t KeyBytes() const = 0;

  // The parameters the index was built with (recorded in the file header).
  virtual const ParamMap& build_params() const = 0;

  // The whole index as bytes: the common header (index_format.h) and the
  // kind's payload. LoadIndex() restores it.
  virtual absl::StatusOr<std::string> Serialize() const = 0;
};

}  // namespace kvrecall::index
