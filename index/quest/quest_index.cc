#include "index/quest/quest_index.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/distance.h"
#include "index/flat/search_input.h"
#include "index/index_format.h"

namespace kvrecall::index::quest {
namespace {

constexpr uint32_t kQuestPayloadVersion = 1;

// The runs of [0, n) outside `exclude`: the positions a search may return.
std::vector<PositionRange> IncludedRuns(const ExcludeSet& exclude, int64_t n) {
  std::vector<PositionRange> runs;
  int64_t pos = 0;
  for (const PositionRange& r : exclude.ranges()) {
    if (r.begin > pos) runs.push_back({pos, r.begin});
    pos = r.end;
  }
  if (pos < n) runs.push_back({pos, n});
  return runs;
}


}  // namespace

absl::StatusOr<QuestOptions> QuestOptions::FromBuild(const ParamMap& params) {
  KVR_RETURN_IF_ERROR(params.CheckKnown("quest", {"page_size"}));
  QuestOptions options;
  KVR_ASSIGN_OR_RETURN(int64_t page_size, params.GetInt("page_size", 16, 1, kMaxPageSize));
  options.page_size = static_cast<int32_t>(page_size);
  return options;
}

QuestIndex::QuestIndex(int32_t dim, int32_t page_size, DType dtype, ParamMap build_params)
    : dim_(dim), page_size_(page_size), dtype_(dtype), build_params_(std::move(build_params)) {}

absl::StatusOr<std::unique_ptr<QuestIndex>> QuestIndex::Create(const VectorView& keys,
                                                              const QuestOptions& options) {
  KVR_RETURN_IF_ERROR(ValidateVectors("quest keys", keys, -1));
  if (options.page_size < 1 || options.page_size > kMaxPageSize) {
    return absl::InvalidArgumentError(absl::StrCat("quest: page_size ", options.page_size,
                                                   " is outside [1, ", kMaxPageSize, "]"));
  }
  ParamMap params;
  params.SetInt("page_size", options.page_size);
  std::unique_ptr<QuestIndex> index(
      new QuestIndex(keys.dim, options.page_size, keys.dtype, std::move(params)));
  KVR_RETURN_IF_ERROR(index->AppendRows(keys, options.num_threads, options.progress));
  return index;
}

absl::Status QuestIndex::AppendRows(const VectorView& keys, int num_threads,
                                    const ProgressCallback& progress) {
  const int64_t n = keys.rows;
  if (n == 0) return absl::OkStatus();
  const int32_t d = dim_;
  const size_t esize = DTypeSize(dtype_);
  const size_t row_bytes = static_cast<size_t>(d) * esize;
  // Validate everything before changing anything.
  {
    std::vector<float> x(static_cast<size_t>(d));
    for (int64_t i = 0; i < n; ++i) {
      ConvertToFloat(keys.row(i), dtype_, x.size(), x.data());
      for (float v : x) {
        if (!std::isfinite(v)) return absl::InvalidArgumentError("quest: keys contain NaN or Inf");
      }
    }
  }
  // From here on nothing fails except a cancelled Create(), whose index is
  // discarded, so the arrays grow in place.
  const int64_t old_size = size_;
  const int64_t new_size = old_size + n;
  keys_.resize(static_cast<size_t>(new_size) * row_bytes);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(keys_.data() + (old_size + i) * row_bytes, keys.row(i), row_bytes);
  }
  const int64_t first_page = old_size / page_size_;  // a partial last page is recomputed
  const int64_t new_pages = (new_size + page_size_ - 1) / page_size_;
  max_.resize(static_cast<size_t>(new_pages) * row_bytes);
  min_.resize(static_cast<size_t>(new_pages) * row_bytes);
  std::atomic<bool> cancelled{false};
  absl::Mutex progress_mu;
  int64_t pages_done = 0;  // guarded by progress_mu
  const int64_t todo = new_pages - first_page;
  ThreadPool::Default()->ParallelFor(
      todo, std::max<int64_t>(1, 4096 / page_size_),
      [&](int64_t begin, int64_t end) {
        if (cancelled.load(std::memory_order_relaxed)) return;
        std::vector<float> x(static_cast<size_t>(d)), hi(static_cast<size_t>(d)),
            lo(static_cast<size_t>(d));
        for (int64_t p = first_page + begin; p < first_page + end; ++p) {
          std::fill(hi.begin(), hi.end(), -std::numeric_limits<float>::infinity());
          std::fill(lo.begin(), lo.end(), std::numeric_limits<float>::infinity());
          const int64_t t_end = std::min<int64_t>(new_size, (p + 1) * page_size_);
          for (int64_t t = p * page_size_; t < t_end; ++t) {
            ConvertToFloat(keys_.data() + t * row_bytes, dtype_, x.size(), x.data());
            for (int32_t j = 0; j < d; ++j) {
              hi[static_cast<size_t>(j)] = std::max(hi[static_cast<size_t>(j)], x[static_cast<size_t>(j)]);
              lo[static_cast<size_t>(j)] = std::min(lo[static_cast<size_t>(j)], x[static_cast<size_t>(j)]);
            }
          }
          ConvertFromFloat(hi.data(), hi.size(), dtype_, max_.data() + p * row_bytes);
          ConvertFromFloat(lo.data(), lo.size(), dtype_, min_.data() + p * row_bytes);
        }
        if (progress) {
          absl::MutexLock lock(&progress_mu);
          pages_done += end - begin;
          if (!progress(Progress{"bounds", pages_done, todo, pages_done / double(todo)})) {
            cancelled.store(true);
          }
        }
      },
      ResolveThreads(num_threads));
  size_ = new_size;
  if (cancelled.load()) return absl::CancelledError("quest build cancelled");
  return absl::OkStatus();
}

absl::Status QuestIndex::Add(const VectorView& keys) {
  KVR_RETURN_IF_ERROR(ValidateVectors("quest keys", keys, dim_));
  if (keys.rows > 0 && keys.dtype != dtype_) {
    return absl::InvalidArgumentError(absl::StrCat("quest: keys are ", DTypeName(keys.dtype),
                                                   ", the index holds ", DTypeName(dtype_)));
  }
  return AppendRows(keys, /*num_threads=*/0, nullptr);
}

absl::StatusOr<SearchResult> QuestIndex::Search(const VectorView& queries, int32_t k,
                                                const SearchParams& params) const {
  const int32_t d = dim_;
  KVR_RETURN_IF_ERROR(ValidateVectors("quest queries", queries, d));
  KVR_RETURN_IF_ERROR(ValidateK(k));
  KVR_RETURN_IF_ERROR(params.knobs.CheckKnown("quest", {"pages"}));
  const int64_t min_pages = (static_cast<int64_t>(k) + page_size_ - 1) / page_size_;
  KVR_ASSIGN_OR_RETURN(const int64_t pages_knob, params.knobs.GetInt("pages", 8 * min_pages, 1));
  KVR_ASSIGN_OR_RETURN(const ExcludeSet exclude, ExcludeSet::Create(params.exclude, size_));
  const std::vector<PositionRange> runs = IncludedRuns(exclude, size_);
  // Runs of pages holding at least one eligible position.
  std::vector<PositionRange> page_runs;
  int64_t eligible_pages = 0;
  for (const PositionRange& r : runs) {
    const int64_t pb = r.begin / page_size_;
    const int64_t pe = (r.end - 1) / page_size_ + 1;
    if (!page_runs.empty() && pb < page_runs.back().end) {
      eligible_pages += pe - page_runs.back().end;
      page_runs.back().end = pe;
    } else {
      eligible_pages += pe - pb;
      page_runs.push_back({pb, pe});
    }
  }
  const int64_t selected = std::min(std::max(pages_knob, min_pages), eligible_pages);
  const bool all_pages = selected >= eligible_pages;

  const int64_t m = queries.rows;
  SearchResult result;
  result.num_queries = m;
  result.k = k;
  result.ids.assign(static_cast<size_t>(m) * k, -1);
  result.scores.assign(static_cast<size_t>(m) * k, -std::numeric_limits<float>::infinity());
  if (m == 0) return result;
  const std::vector<float> q32 = VectorsToF32(queries);
  const size_t row_bytes = static_cast<size_t>(d) * DTypeSize(dtype_);
  std::vector<int64_t> exact_per_query(static_cast<size_t>(m), 0);

  auto search_rows = [&](int64_t begin, int64_t end) {
    std::vector<float> qpos(static_cast<size_t>(d)), qneg(static_cast<size_t>(d));
    std::vector<float> upper, lower_part, scores;
    std::vector<int64_t> page_ids;
    TopK top(k);
    // Scores eligible positions of [b, e) exactly into `top`.
    auto score_range = [&](const float* q, int64_t b, int64_t e) -> int64_t {
      int64_t scored = 0;
      auto it = std::upper_bound(runs.begin(), runs.end(), b,
                                 [](int64_t pos, const PositionRange& r) { return pos < r.end; });
      for (; it != runs.end() && it->begin < e; ++it) {
        const int64_t sb = std::max(b, it->begin);
        const int64_t se = std::min(e, it->end);
        if (sb >= se) continue;
        scores.resize(static_cast<size_t>(se - sb));
        ScoreRows(q, keys_.data() + sb * row_bytes, dtype_, se - sb, d, d, scores.data());
        for (int64_t t = sb; t < se; ++t) top.Push(scores[static_cast<size_t>(t - sb)], t);
        scored += se - sb;
      }
      return scored;
    };
    for (int64_t qi = begin; qi < end; ++qi) {
      const float* q = q32.data() + qi * d;
      int64_t exact = 0;
      if (all_pages) {
        for (const PositionRange& r : runs) exact += score_range(q, r.begin, r.end);
      } else {
        for (int32_t j = 0; j < d; ++j) {
          qpos[static_cast<size_t>(j)] = std::max(q[j], 0.0f);
          qneg[static_cast<size_t>(j)] = std::min(q[j], 0.0f);
        }
        upper.resize(static_cast<size_t>(eligible_pages));
        lower_part.resize(static_cast<size_t>(eligible_pages));
        page_ids.clear();
        int64_t at = 0;
        for (const PositionRange& pr : page_runs) {
          const int64_t len = pr.end - pr.begin;
          ScoreRows(qpos.data(), max_.data() + pr.begin * row_bytes, dtype_, len, d, d,
                    upper.data() + at);
          ScoreRows(qneg.data(), min_.data() + pr.begin * row_bytes, dtype_, len, d, d,
                    lower_part.data() + at);
          for (int64_t p = pr.begin; p < pr.end; ++p) page_ids.push_back(p);
          at += len;
        }
        for (int64_t i = 0; i < eligible_pages; ++i) {
          upper[static_cast<size_t>(i)] += lower_part[static_cast<size_t>(i)];
        }
        std::vector<int64_t> order(static_cast<size_t>(eligible_pages));
        for (int64_t i = 0; i < eligible_pages; ++i) order[static_cast<size_t>(i)] = i;
        std::nth_element(order.begin(), order.begin() + (selected - 1), order.end(),
                         [&](int64_t a, int64_t b) {
                           return upper[static_cast<size_t>(a)] > upper[static_cast<size_t>(b)];
                         });
        order.resize(static_cast<size_t>(selected));
        std::sort(order.begin(), order.end());
        for (int64_t i : order) {
          const int64_t p = page_ids[static_cast<size_t>(i)];
          exact += score_range(q, p * page_size_, std::min<int64_t>(size_, (p + 1) * page_size_));
        }
      }
      exact_per_query[static_cast<size_t>(qi)] = exact;
      top.Drain(result.ids.data() + qi * k, result.scores.data() + qi * k);
    }
  };
  if (params.num_threads == 1 || m == 1) {
    search_rows(0, m);
  } else {
    ThreadPool::Default()->ParallelFor(m, 1, search_rows, ResolveThreads(params.num_threads));
  }
  int64_t exact_total = 0;
  for (int64_t e : exact_per_query) exact_total += e;
  result.stats.exact_scores = exact_total;
  result.stats.keys_scanned = exact_total + (all_pages ? 0 : 2 * eligible_pages * m);
  result.stats.visited = selected * m;
  return result;
}

void QuestIndex::PageUpperBounds(const float* query, float* bounds) const {
  const int64_t pages = num_pages();
  std::vector<float> qpos(static_cast<size_t>(dim_)), qneg(static_cast<size_t>(dim_));
  for (int32_t j = 0; j < dim_; ++j) {
    qpos[static_cast<size_t>(j)] = std::max(query[j], 0.0f);
    qneg[static_cast<size_t>(j)] = std::min(query[j], 0.0f);
  }
  std::vector<float> lower(static_cast<size_t>(pages));
  ScoreRows(qpos.data(), max_.data(), dtype_, pages, dim_, dim_, bounds);
  ScoreRows(qneg.data(), min_.data(), dtype_, pages, dim_, dim_, lower.data());
  for (int64_t p = 0; p < pages; ++p) bounds[p] += lower[static_cast<size_t>(p)];
}

absl::StatusOr<std::string> QuestIndex::Serialize() const {
  std::string payload;
  ByteWriter w(&payload);
  w.Put<uint32_t>(kQuestPayloadVersion);
  w.Put<uint32_t>(static_cast<uint32_t>(page_size_));
  w.Put<uint64_t>(static_cast<uint64_t>(size_));
  w.PutBytes(keys_.data(), keys_.size());
  w.PutBytes(max_.data(), max_.size());
  w.PutBytes(min_.data(), min_.size());
  IndexHeader header;
  header.kind = std::string(kKind);
  header.dim = dim_;
  header.size = size_;
  header.key_dtype = dtype_;
  header.build_params = build_params_;
  return EncodeIndex(header, payload);
}

absl::StatusOr<std::unique_ptr<QuestIndex>> QuestIndex::Load(absl::string_view bytes) {
  KVR_ASSIGN_OR_RETURN(auto decoded, DecodeIndex(bytes));
  return Load(decoded.first, decoded.second);
}

absl::StatusOr<std::unique_ptr<QuestIndex>> QuestIndex::Load(const IndexHeader& header,
                                                      absl::string_view payload) {
  if (header.kind != kKind) {
    return absl::InvalidArgumentError(
        absl::StrCat("index bytes hold kind '", header.kind, "', not 'quest'"));
  }
  ByteReader r(payload);
  KVR_ASSIGN_OR_RETURN(uint32_t version, r.Get<uint32_t>());
  if (version != kQuestPayloadVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("quest payload version ", version, " is not supported (this build reads ",
                     kQuestPayloadVersion, ")"));
  }
  KVR_ASSIGN_OR_RETURN(uint32_t page_size, r.Get<uint32_t>());
  KVR_ASSIGN_OR_RETURN(uint64_t n, r.Get<uint64_t>());
  if (page_size < 1 || page_size > static_cast<uint32_t>(kMaxPageSize) || header.dim < 1 ||
      static_cast<int64_t>(n) != header.size) {
    return absl::DataLossError("quest payload does not match its header");
  }
  const size_t row_bytes = static_cast<size_t>(header.dim) * DTypeSize(header.key_dtype);
  const uint64_t pages = (n + page_size - 1) / page_size;
  if (n > r.remaining() / row_bytes || pages * 2 > (r.remaining() - n * row_bytes) / row_bytes) {
    return absl::DataLossError("quest payload is truncated");
  }
  std::unique_ptr<QuestIndex> index(new QuestIndex(header.dim, static_cast<int32_t>(page_size),
                                                   header.key_dtype, header.build_params));
  index->size_ = static_cast<int64_t>(n);
  index->keys_.resize(n * row_bytes);
  index->max_.resize(pages * row_bytes);
  index->min_.resize(pages * row_bytes);
  KVR_RETURN_IF_ERROR(r.GetBytes(index->keys_.data(), index->keys_.size()));
  KVR_RETURN_IF_ERROR(r.GetBytes(index->max_.data(), index->max_.size()));
  KVR_RETURN_IF_ERROR(r.GetBytes(index->min_.data(), index->min_.size()));
  if (r.remaining() != 0) return absl::DataLossError("quest payload has trailing bytes");
  return index;
}

}  // namespace kvrecall::index::quest
