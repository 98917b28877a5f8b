#pragma once

// The pieces of a proximity graph over keys shared by RoarIndex's build and
// search: fixed-capacity adjacency lists, a row-major key store, a pool of
// epoch-tagged visited sets, best-first beam search and occlusion pruning.
// Scores are inner products q·k computed with DotRow (index/distance.h), so a
// search that visits every key returns exactly the flat result.

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/types.h"
#include "index/aligned_vector.h"
#include "index/search_input.h"

namespace kvrecall::index::roar {

// Keys as dense rows in one dtype (f32, f16 or bf16). Thread-compatible.
class KeyStore {
 public:
  KeyStore(int32_t dim, DType dtype) : dim_(dim), dtype_(dtype), row_bytes_(dim * DTypeSize(dtype)) {}

  int32_t dim() const { return dim_; }
  DType dtype() const { return dtype_; }
  int64_t size() const { return size_; }
  size_t row_bytes() const { return row_bytes_; }
  const char* row(int64_t i) const { return data_.data() + i * row_bytes_; }
  int64_t bytes() const { return size_ * static_cast<int64_t>(row_bytes_); }

  // Appends rows of `src` (any dtype; converted exactly when the store is
  // f32, else REQUIRES src dtype == dtype()).
  //   src: [rows, src_stride] elements of src_dtype
  void Append(const void* src, DType src_dtype, int64_t rows, int64_t src_stride);

  // q · key i.  q: [dim] f32
  float Score(const float* q, int64_t i) const;
  // Key i as f32.  out: [dim] f32
  void ToF32(int64_t i, float* out) const;
  // Prefetches the cache lines of key i.
  void Prefetch(int64_t i) const {
    const char* p = row(i);
    for (size_t off = 0; off < row_bytes_; off += 64) __builtin_prefetch(p + off);
  }

 private:
  int32_t dim_;
  DType dtype_;
  size_t row_bytes_;
  int64_t size_ = 0;
  AlignedVector<char> data_;  // [size, dim] of dtype
};

// Adjacency lists of at most `capacity` neighbours per node, stored with a
// fixed stride (count + capacity slots) so that a node's list is one
// contiguous read. Thread-compatible; distinct nodes may be written
// concurrently.
class AdjacencyLists {
 public:
  explicit AdjacencyLists(int32_t capacity) : capacity_(capacity) {}

  int32_t capacity() const { return capacity_; }
  int64_t size() const { return size_; }
  // Grows to n nodes (new nodes have no neighbours).
  void Resize(int64_t n);
  absl::Span<const uint32_t> Neighbors(int64_t i) const {
    const uint32_t* base = slots_.data() + i * Stride();
    return absl::Span<const uint32_t>(base + 1, base[0]);
  }
  // REQUIRES: neighbors.size() <= capacity().
  void Set(int64_t i, absl::Span<const uint32_t> neighbors);
  // Appends one neighbour; false (and no change) when the list is full.
  bool Append(int64_t i, uint32_t id);
  void PrefetchList(int64_t i) const {
    const char* p = reinterpret_cast<const char*>(slots_.data() + i * Stride());
    for (int64_t off = 0; off < Stride() * 4; off += 64) __builtin_prefetch(p + off);
  }
  // Bytes of the slot array.
  int64_t bytes() const { return static_cast<int64_t>(slots_.size() * sizeof(uint32_t)); }
  int64_t TotalEdges() const;

 private:
  int64_t Stride() const { return static_cast<int64_t>(capacity_) + 1; }
  int32_t capacity_;
  int64_t size_ = 0;
  std::vector<uint32_t> slots_;  // [size, 1 + capacity]: count, then neighbour ids
};

// A visited set over n nodes, cleared in O(1) by bumping an epoch.
// Not thread-safe; VisitedPool hands one to each searching thread.
class VisitedSet {
 public:
  explicit VisitedSet(int64_t n) : marks_(n, 0) {}
  int64_t capacity() const { return static_cast<int64_t>(marks_.size()); }
  void Clear() {
    if (++epoch_ == 0) {  // wrapped: really clear
      std::fill(marks_.begin(), marks_.end(), 0);
      epoch_ = 1;
    }
  }
  // Marks i; true when it was not marked yet.
  bool Insert(int64_t i) {
    if (marks_[i] == epoch_) return false;
    marks_[i] = epoch_;
    return true;
  }

 private:
  std::vector<uint16_t> marks_;
  uint16_t epoch_ = 0;
};

// Reusable visited sets (one per concurrent search). Thread-safe.
class VisitedPool {
 public:
  // A set with capacity >= n, cleared.
  std::unique_ptr<VisitedSet> Get(int64_t n);
  void Release(std::unique_ptr<VisitedSet> set);

 private:
  absl::Mutex mu_;
  std::vector<std::unique_ptr<VisitedSet>> free_ ABSL_GUARDED_BY(mu_);
};

// A scored node.
struct Scored {
  float score;
  uint32_t id;
};

struct SearchCounters {
  int64_t scored = 0;    // distinct nodes whose score was computed
  int64_t expanded = 0;  // nodes whose neighbour list was read
};

// Best-first beam search (HNSW/NSG style) for one query from the entry
// points: a candidate queue ordered by score and a result set of the best
// `ef` nodes; stops when the best unexpanded candidate scores below the
// worst of a full result set. Nodes in `exclude` (may be null) are scored
// and expanded but never enter the result set. Writes the result set into
// `out`, best first (ties: smaller id first), at most ef entries.
//   query: [dim] f32
void BeamSearch(const KeyStore& keys, const AdjacencyLists& graph,
                absl::Span<const uint32_t> entry_points, const float* query, int32_t ef,
                const ExcludeSet* exclude, VisitedSet* visited, std::vector<Scored>* out,
                SearchCounters* counters);

// Occlusion (relative-neighbourhood) pruning of the candidates of `target`
// for inner-product similarity: walking the candidates best first, p is kept
// unless a kept r has p·r > p·target; then, when `top_up`, skipped
// candidates fill the list up to max_degree in their order.
//   candidates: scored against target, best first, unique, target excluded
//   out: at most max_degree ids
void OcclusionPrune(const KeyStore& keys, const std::vector<Scored>& candidates,
                    int32_t max_degree, bool top_up, std::vector<uint32_t>* out);

// Sorts best first: larger score, then smaller id.
void SortBestFirst(std::vector<Scored>* v);

}  // namespace kvrecall::index::roar
