#include "index/roar/graph.h"

#include <algorithm>
#include <cstring>

#include "common/half.h"
#include "common/logging.h"
#include "index/distance.h"

namespace kvrecall::index::roar {
namespace {

// a ranks above b: larger score, then smaller id. A functor, so that the
// heap algorithms inline it.
struct BetterFn {
  bool operator()(const Scored& a, const Scored& b) const {
    return a.score > b.score || (a.score == b.score && a.id < b.id);
  }
};
constexpr BetterFn Better;

struct LowerScoreFn {
  bool operator()(const Scored& a, const Scored& b) const { return a.score < b.score; }
};

}  // namespace

void KeyStore::Append(const void* src, DType src_dtype, int64_t rows, int64_t src_stride) {
  KVR_CHECK(src_dtype == dtype_ || dtype_ == DType::kF32);
  data_.resize((size_ + rows) * row_bytes_);
  const size_t src_row_bytes = static_cast<size_t>(src_stride) * DTypeSize(src_dtype);
  for (int64_t i = 0; i < rows; ++i) {
    const char* s = static_cast<const char*>(src) + i * src_row_bytes;
    char* d = data_.data() + (size_ + i) * row_bytes_;
    if (src_dtype == dtype_) {
      std::memcpy(d, s, row_bytes_);
    } else {
      ConvertToFloat(s, src_dtype, dim_, reinterpret_cast<float*>(d));
    }
  }
  size_ += rows;
}

float KeyStore::Score(const float* q, int64_t i) const { return DotRow(q, row(i), dtype_, dim_); }

void KeyStore::ToF32(int64_t i, float* out) const { ConvertToFloat(row(i), dtype_, dim_, out); }

void AdjacencyLists::Resize(int64_t n) {
  slots_.resize(n * Stride(), 0);
  for (int64_t i = size_; i < n; ++i) slots_[i * Stride()] = 0;
  size_ = n;
}

void AdjacencyLists::Set(int64_t i, absl::Span<const uint32_t> neighbors) {
  KVR_CHECK(static_cast<int64_t>(neighbors.size()) <= capacity_);
  uint32_t* base = slots_.data() + i * Stride();
  base[0] = static_cast<uint32_t>(neighbors.size());
  std::copy(neighbors.begin(), neighbors.end(), base + 1);
}

bool AdjacencyLists::Append(int64_t i, uint32_t id) {
  uint32_t* base = slots_.data() + i * Stride();
  if (static_cast<int32_t>(base[0]) >= capacity_) return false;
  base[1 + base[0]] = id;
  ++base[0];
  return true;
}

int64_t AdjacencyLists::TotalEdges() const {
  int64_t total = 0;
  for (int64_t i = 0; i < size_; ++i) total += slots_[i * Stride()];
  return total;
}

std::unique_ptr<VisitedSet> VisitedPool::Get(int64_t n) {
  std::unique_ptr<VisitedSet> set;
  {
    absl::MutexLock lock(&mu_);
    if (!free_.empty()) {
      set = std::move(free_.back());
      free_.pop_back();
    }
  }
  if (set == nullptr || set->capacity() < n) set = std::make_unique<VisitedSet>(n);
  set->Clear();
  return set;
}

void VisitedPool::Release(std::unique_ptr<VisitedSet> set) {
  absl::MutexLock lock(&mu_);
  free_.push_back(std::move(set));
}

void SortBestFirst(std::vector<Scored>* v) { std::sort(v->begin(), v->end(), Better); }

void BeamSearch(const KeyStore& keys, const AdjacencyLists& graph,
                absl::Span<const uint32_t> entry_points, const float* query, int32_t ef,
                const ExcludeSet* exclude, VisitedSet* visited, std::vector<Scored>* out,
                SearchCounters* counters) {
  // candidates: max-heap by score; results: heap whose top is the worst kept.
  constexpr LowerScoreFn cand_less;
  std::vector<Scored> candidates;
  std::vector<Scored>& results = *out;
  results.clear();
  candidates.reserve(4 * static_cast<size_t>(ef));
  results.reserve(static_cast<size_t>(ef) + 1);
  const bool filter = exclude != nullptr && !exclude->empty();

  auto offer = [&](uint32_t id, float s) {
    if (static_cast<int32_t>(results.size()) < ef || Better({s, id}, results.front())) {
      candidates.push_back({s, id});
      std::push_heap(candidates.begin(), candidates.end(), cand_less);
      if (!filter || !exclude->Contains(id)) {
        results.push_back({s, id});
        std::push_heap(results.begin(), results.end(), Better);
        if (static_cast<int32_t>(results.size()) > ef) {
          std::pop_heap(results.begin(), results.end(), Better);
          results.pop_back();
        }
      }
    }
  };

  for (uint32_t ep : entry_points) {
    if (!visited->Insert(ep)) continue;
    ++counters->scored;
    offer(ep, keys.Score(query, ep));
  }
  std::vector<uint32_t> fresh(graph.capacity());
  while (!candidates.empty()) {
    const Scored c = candidates.front();
    if (static_cast<int32_t>(results.size()) >= ef && c.score < results.front().score) break;
    std::pop_heap(candidates.begin(), candidates.end(), cand_less);
    candidates.pop_back();
    ++counters->expanded;
    const absl::Span<const uint32_t> nbrs = graph.Neighbors(c.id);
    int32_t m = 0;
    for (uint32_t v : nbrs) {
      if (visited->Insert(v)) {
        keys.Prefetch(v);
        fresh[m++] = v;
      }
    }
    if (!candidates.empty()) graph.PrefetchList(candidates.front().id);
    counters->scored += m;
    for (int32_t j = 0; j < m; ++j) offer(fresh[j], keys.Score(query, fresh[j]));
  }
  std::sort(results.begin(), results.end(), Better);
}

void OcclusionPrune(const KeyStore& keys, const std::vector<Scored>& candidates,
                    int32_t max_degree, bool top_up, std::vector<uint32_t>* out) {
  out->clear();
  std::vector<uint32_t> skipped;
  std::vector<float> p(keys.dim());
  size_t i = 0;
  for (; i < candidates.size() && static_cast<int32_t>(out->size()) < max_degree; ++i) {
    const Scored& cand = candidates[i];
    keys.ToF32(cand.id, p.data());
    bool occluded = false;
    for (uint32_t r : *out) {
      if (keys.Score(p.data(), r) > cand.score) {
        occluded = true;
        break;
      }
    }
    if (occluded) {
      skipped.push_back(cand.id);
    } else {
      out->push_back(cand.id);
    }
  }
  if (!top_up) return;
  for (size_t j = 0; j < skipped.size() && static_cast<int32_t>(out->size()) < max_degree; ++j) {
    out->push_back(skipped[j]);
  }
}

}  // namespace kvrecall::index::roar
