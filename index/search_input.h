#pragma once

// Validation and normalisation of the inputs every key index shares: key and
// query matrices (VectorView), k, and the `exclude` ranges of SearchParams.
// Used by flat, roar and the FAISS adapters so that they reject the same bad
// input with the same status.

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "index/key_index.h"

namespace kvrecall::index {

// INVALID_ARGUMENT unless `view` is a well-formed matrix of `what` with
// dimension `dim` (dim > 0 when dim == -1 is passed: any positive dim):
// data non-null when rows > 0, rows >= 0, stride >= dim, a known dtype.
absl::Status ValidateVectors(absl::string_view what, const VectorView& view, int32_t dim);

// The checks of KeyIndex::Add: a well-formed view of dimension `dim` in the
// dtype the index was built with (INVALID_ARGUMENT naming `kind` otherwise).
absl::Status ValidateAddedKeys(absl::string_view kind, const VectorView& keys, int32_t dim,
                               DType index_dtype);

// Copies rows of `view` into a dense f32 matrix.
//   returns: [view.rows, view.dim] f32, row-major
// REQUIRES: ValidateVectors(view) is OK.
std::vector<float> VectorsToF32(const VectorView& view);

// Copies rows of `view` into a dense matrix of `view.dtype` (stride removed).
//   returns: [view.rows, view.dim] elements of view.dtype as bytes
std::string VectorsToDenseBytes(const VectorView& view);

// The positions of [0, n) a search may return: all of them minus the
// `exclude` ranges. Value type; thread-compatible.
class ExcludeSet {
 public:
  // INVALID_ARGUMENT unless the ranges are sorted, disjoint, non-empty
  // (begin < end) and non-negative. Ranges may extend beyond n (clipped).
  static absl::StatusOr<ExcludeSet> Create(const std::vector<PositionRange>& ranges, int64_t n);

  bool empty() const { return ranges_.empty(); }
  // True when `pos` lies in an excluded range. O(log ranges).
  bool Contains(int64_t pos) const;
  // Positions of [0, n) not excluded.
  int64_t included() const { return n_ - excluded_; }
  // Excluded positions within [begin, end).
  int64_t CountExcluded(int64_t begin, int64_t end) const;
  // Clipped to [0, n), sorted, disjoint.
  const std::vector<PositionRange>& ranges() const { return ranges_; }
  // The complement: the runs of [0, n) outside the ranges, the positions a
  // search may return. Sorted, disjoint, non-empty.
  std::vector<PositionRange> IncludedRuns() const;

 private:
  std::vector<PositionRange> ranges_;
  int64_t n_ = 0;
  int64_t excluded_ = 0;
};

// INVALID_ARGUMENT unless 1 <= k <= kMaxSearchK.
inline constexpr int32_t kMaxSearchK = 1 << 20;
absl::Status ValidateK(int32_t k);

// The parallelism for `num_threads` of SearchParams / BuildOptions: 0 means
// one thread per hardware thread (the default pool's size), otherwise the
// number itself. Pass it as ParallelFor's max_parallelism.
int ResolveThreads(int num_threads);

// Calls fn(begin, end) over [0, n): inline when num_threads is 1 or n is 1,
// else on the default pool in chunks of several items (about 4 chunks per
// thread), so that the items of a chunk share its scratch arrays.
void ParallelForChunks(int64_t n, int num_threads,
                       const std::function<void(int64_t, int64_t)>& fn);

}  // namespace kvrecall::index
