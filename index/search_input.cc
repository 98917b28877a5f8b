#include "index/search_input.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"

namespace kvrecall::index {

absl::Status ValidateVectors(absl::string_view what, const VectorView& view, int32_t dim) {
  if (view.dtype != DType::kF16 && view.dtype != DType::kBf16 && view.dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(what, " have an unknown dtype"));
  }
  if (view.rows < 0) return absl::InvalidArgumentError(absl::StrCat(what, " have rows < 0"));
  if (dim >= 0 ? view.dim != dim : view.dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, " have dim ", view.dim, ", expected ",
                                                   dim >= 0 ? absl::StrCat(dim) : "> 0"));
  }
  if (view.stride != 0 && view.stride < view.dim) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " have stride ", view.stride, " < dim ", view.dim));
  }
  if (view.rows > 0 && view.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(what, " have rows but no data"));
  }
  return absl::OkStatus();
}

absl::Status ValidateAddedKeys(absl::string_view kind, const VectorView& keys, int32_t dim,
                               DType index_dtype) {
  KVR_RETURN_IF_ERROR(ValidateVectors("keys", keys, dim));
  if (keys.dtype != index_dtype) {
    return absl::InvalidArgumentError(absl::StrCat(kind, ": Add got ", DTypeName(keys.dtype),
                                                   " keys, the index holds ",
                                                   DTypeName(index_dtype)));
  }
  return absl::OkStatus();
}

std::vector<float> VectorsToF32(const VectorView& view) {
  std::vector<float> out(static_cast<size_t>(view.rows) * view.dim);
  for (int64_t i = 0; i < view.rows; ++i) {
    ConvertToFloat(view.row(i), view.dtype, view.dim, out.data() + i * view.dim);
  }
  return out;
}

std::string VectorsToDenseBytes(const VectorView& view) {
  const size_t row_bytes = static_cast<size_t>(view.dim) * DTypeSize(view.dtype);
  std::string out(static_cast<size_t>(view.rows) * row_bytes, '\0');
  for (int64_t i = 0; i < view.rows; ++i) {
    std::memcpy(out.data() + i * row_bytes, view.row(i), row_bytes);
  }
  return out;
}

absl::StatusOr<ExcludeSet> ExcludeSet::Create(const std::vector<PositionRange>& ranges,
                                              int64_t n) {
  ExcludeSet set;
  set.n_ = n;
  int64_t prev_end = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const PositionRange& r = ranges[i];
    if (r.begin < 0 || r.begin >= r.end) {
      return absl::InvalidArgumentError(
          absl::StrCat("exclude range [", r.begin, ", ", r.end, ") is empty or negative"));
    }
    if (i > 0 && r.begin < prev_end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "exclude ranges must be sorted and disjoint; [", r.begin, ", ", r.end,
          ") starts before the previous range ends at ", prev_end));
    }
    prev_end = r.end;
    const int64_t b = std::min(r.begin, n), e = std::min(r.end, n);
    if (b < e) {
      set.ranges_.push_back({b, e});
      set.excluded_ += e - b;
    }
  }
  return set;
}

bool ExcludeSet::Contains(int64_t pos) const {
  // First range whose end is beyond pos.
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), pos,
                             [](int64_t p, const PositionRange& r) { return p < r.end; });
  return it != ranges_.end() && it->begin <= pos;
}

std::vector<PositionRange> ExcludeSet::IncludedRuns() const {
  std::vector<PositionRange> runs;
  int64_t pos = 0;
  for (const PositionRange& r : ranges_) {
    if (r.begin > pos) runs.push_back({pos, r.begin});
    pos = r.end;
  }
  if (pos < n_) runs.push_back({pos, n_});
  return runs;
}

int64_t ExcludeSet::CountExcluded(int64_t begin, int64_t end) const {
  int64_t count = 0;
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), begin,
                             [](int64_t p, const PositionRange& r) { return p < r.end; });
  for (; it != ranges_.end() && it->begin < end; ++it) {
    count += std::min(end, it->end) - std::max(begin, it->begin);
  }
  return count;
}

absl::Status ValidateK(int32_t k) {
  if (k < 1 || k > kMaxSearchK) {
    return absl::InvalidArgumentError(absl::StrCat("k=", k, " is outside [1, ", kMaxSearchK, "]"));
  }
  return absl::OkStatus();
}

int ResolveThreads(int num_threads) {
  if (num_threads > 0) return num_threads;
  return ThreadPool::Default()->num_threads();
}

void ParallelForChunks(int64_t n, int num_threads,
                       const std::function<void(int64_t, int64_t)>& fn) {
  if (num_threads == 1 || n == 1) {
    fn(0, n);
    return;
  }
  const int threads = ResolveThreads(num_threads);
  ThreadPool::Default()->ParallelFor(n, std::max<int64_t>(1, n / (4 * threads)), fn, threads);
}

}  // namespace kvrecall::index
