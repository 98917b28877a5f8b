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
#include "index/search_input.h"
#include "index/tile_scoring.h"
#include "index/index_format.h"

namespace kvrecall::index::quest {
namespace {

constexpr uint32_t kQuestPayloadVersion = 1;
// Queries of a search block, which share each bound tile load.
constexpr int64_t kBlock = 4;

// The runs of units of `unit` positions (pages, tiles) that cover `runs`.
std::vector<PositionRange> CoveringRuns(const std::vector<PositionRange>& runs, int64_t unit) {
  std::vector<PositionRange> out;
  for (const PositionRange& r : runs) {
    const int64_t b = r.begin / unit, e = (r.end - 1) / unit + 1;
    if (!out.empty() && b <= out.back().end) {
      out.back().end = std::max(out.back().end, e);
    } else {
      out.push_back({b, e});
    }
  }
  return out;
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
  const size_t tile_bytes = static_cast<size_t>(d) * kTileKeys * esize;
  key_tiles_.resize(static_cast<size_t>((new_size + kTileKeys - 1) / kTileKeys) * tile_bytes);
  PackIntoTiles(keys.data, dtype_, n, d, keys.row_stride(), old_size, key_tiles_.data(), dtype_);
  const int64_t first_page = old_size / page_size_;  // a partial last page is recomputed
  const int64_t new_pages = (new_size + page_size_ - 1) / page_size_;
  const size_t bound_tiles = static_cast<size_t>((new_pages + kTileKeys - 1) / kTileKeys);
  max_tiles_.resize(bound_tiles * tile_bytes);
  min_tiles_.resize(bound_tiles * tile_bytes);
  std::atomic<bool> cancelled{false};
  absl::Mutex progress_mu;
  int64_t pages_done = 0;  // guarded by progress_mu
  const int64_t todo = new_pages - first_page;
  ThreadPool::Default()->ParallelFor(
      todo, std::max<int64_t>(kTileKeys, 4096 / page_size_),
      [&](int64_t begin, int64_t end) {
        if (cancelled.load(std::memory_order_relaxed)) return;
        std::vector<char> row(static_cast<size_t>(d) * esize);
        std::vector<float> x(static_cast<size_t>(d)), hi(static_cast<size_t>(d)),
            lo(static_cast<size_t>(d));
        for (int64_t p = first_page + begin; p < first_page + end; ++p) {
          std::fill(hi.begin(), hi.end(), -std::numeric_limits<float>::infinity());
          std::fill(lo.begin(), lo.end(), std::numeric_limits<float>::infinity());
          const int64_t t_end = std::min<int64_t>(new_size, (p + 1) * page_size_);
          for (int64_t t = p * page_size_; t < t_end; ++t) {
            UnpackFromTiles(key_tiles_.data(), dtype_, d, t, row.data());
            ConvertToFloat(row.data(), dtype_, x.size(), x.data());
            for (int32_t j = 0; j < d; ++j) {
              hi[static_cast<size_t>(j)] = std::max(hi[static_cast<size_t>(j)], x[static_cast<size_t>(j)]);
              lo[static_cast<size_t>(j)] = std::min(lo[static_cast<size_t>(j)], x[static_cast<size_t>(j)]);
            }
          }
          // Lanes of different pages: threads write disjoint bytes.
          ConvertFromFloat(hi.data(), hi.size(), dtype_, row.data());
          PackIntoTiles(row.data(), dtype_, 1, d, d, p, max_tiles_.data(), dtype_);
          ConvertFromFloat(lo.data(), lo.size(), dtype_, row.data());
          PackIntoTiles(row.data(), dtype_, 1, d, d, p, min_tiles_.data(), dtype_);
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

// The pages a search may select: from the eligible positions, the pages that
// hold one and the bound tiles that hold those pages.
struct QuestIndex::PagePlan {
  std::vector<PositionRange> runs;             // eligible positions
  std::vector<PositionRange> page_runs;        // pages holding an eligible position
  std::vector<PositionRange> bound_tile_runs;  // bound tiles holding those pages
  int64_t bound_lanes = 0;                     // bound lanes in those tiles
  int64_t selected = 0;                        // pages each query scores exactly
  bool all_pages = false;                      // every eligible page: no bounds needed
  int64_t bound_stride = 0;                    // bound lanes per query (whole tiles)
};

// One thread's buffers for a run of query blocks.
struct QuestIndex::BlockScratch {
  BlockScratch(const PagePlan& plan, int32_t d)
      : qpos(static_cast<size_t>(kBlock * d)),
        qneg(static_cast<size_t>(kBlock * d)),
        upper(plan.all_pages ? 0 : static_cast<size_t>(kBlock * plan.bound_stride)),
        lower(upper.size()) {}
  std::vector<float> qpos, qneg;  // the block's queries' positive and negative parts
  std::vector<float> upper, lower;  // [kBlock, bound_stride] page bounds of each part
  std::vector<float> lane_scores;
  std::vector<float> exact;  // the scores of `ids`
  std::vector<int64_t> ids;  // the eligible positions scored for a query
  std::vector<std::pair<float, int64_t>> ranked_pages;  // (bound, page)
  std::vector<int32_t> order;
};

absl::StatusOr<QuestIndex::PagePlan> QuestIndex::PlanPages(int32_t k,
                                                           const SearchParams& params) const {
  const int64_t min_pages = (static_cast<int64_t>(k) + page_size_ - 1) / page_size_;
  KVR_ASSIGN_OR_RETURN(const int64_t pages_knob, params.knobs.GetInt("pages", 8 * min_pages, 1));
  KVR_ASSIGN_OR_RETURN(const ExcludeSet exclude, ExcludeSet::Create(params.exclude, size_));
  PagePlan plan;
  plan.runs = exclude.IncludedRuns();
  plan.page_runs = CoveringRuns(plan.runs, page_size_);
  plan.bound_tile_runs = CoveringRuns(plan.page_runs, kTileKeys);
  int64_t eligible_pages = 0;
  for (const PositionRange& r : plan.page_runs) eligible_pages += r.end - r.begin;
  const int64_t pages = num_pages();
  for (const PositionRange& r : plan.bound_tile_runs) {
    plan.bound_lanes += std::min(pages, r.end * kTileKeys) - r.begin * kTileKeys;
  }
  plan.selected = std::min(std::max(pages_knob, min_pages), eligible_pages);
  plan.all_pages = plan.selected >= eligible_pages;
  plan.bound_stride = ((pages + kTileKeys - 1) / kTileKeys) * kTileKeys;
  return plan;
}

int64_t QuestIndex::ScoreSpan(const PagePlan& plan, const float* q, int64_t b, int64_t e,
                              BlockScratch* s) const {
  const size_t tile_bytes = static_cast<size_t>(dim_) * kTileKeys * DTypeSize(dtype_);
  const int64_t t0 = b / kTileKeys, t1 = (e - 1) / kTileKeys + 1;
  s->lane_scores.resize(static_cast<size_t>((t1 - t0) * kTileKeys));
  ScoreTiles(q, 1, key_tiles_.data() + t0 * tile_bytes, dtype_, dim_, t1 - t0,
             s->lane_scores.data(), (t1 - t0) * kTileKeys);
  auto it = std::upper_bound(plan.runs.begin(), plan.runs.end(), b,
                             [](int64_t pos, const PositionRange& r) { return pos < r.end; });
  for (; it != plan.runs.end() && it->begin < e; ++it) {
    for (int64_t t = std::max(b, it->begin); t < std::min(e, it->end); ++t) {
      s->ids.push_back(t);
      s->exact.push_back(s->lane_scores[static_cast<size_t>(t - t0 * kTileKeys)]);
    }
  }
  return std::min(size_, t1 * kTileKeys) - t0 * kTileKeys;
}

void QuestIndex::BoundPages(const PagePlan& plan, const float* q, int32_t nb,
                            BlockScratch* s) const {
  const int32_t d = dim_;
  const size_t tile_bytes = static_cast<size_t>(d) * kTileKeys * DTypeSize(dtype_);
  for (int64_t j = 0; j < nb * d; ++j) {
    s->qpos[static_cast<size_t>(j)] = std::max(q[j], 0.0f);
    s->qneg[static_cast<size_t>(j)] = std::min(q[j], 0.0f);
  }
  for (const PositionRange& t : plan.bound_tile_runs) {
    ScoreTiles(s->qpos.data(), nb, max_tiles_.data() + t.begin * tile_bytes, dtype_, d,
               t.end - t.begin, s->upper.data() + t.begin * kTileKeys, plan.bound_stride);
    ScoreTiles(s->qneg.data(), nb, min_tiles_.data() + t.begin * tile_bytes, dtype_, d,
               t.end - t.begin, s->lower.data() + t.begin * kTileKeys, plan.bound_stride);
  }
}

void QuestIndex::SelectPages(const PagePlan& plan, int32_t b, BlockScratch* s) const {
  s->ranked_pages.clear();
  const float* up = s->upper.data() + b * plan.bound_stride;
  const float* lo = s->lower.data() + b * plan.bound_stride;
  for (const PositionRange& r : plan.page_runs) {
    for (int64_t p = r.begin; p < r.end; ++p) s->ranked_pages.emplace_back(up[p] + lo[p], p);
  }
  std::nth_element(s->ranked_pages.begin(), s->ranked_pages.begin() + (plan.selected - 1),
                   s->ranked_pages.end(),
                   [](const auto& x, const auto& y) { return x.first > y.first; });
  s->ranked_pages.resize(static_cast<size_t>(plan.selected));
  std::sort(s->ranked_pages.begin(), s->ranked_pages.end(),
            [](const auto& x, const auto& y) { return x.second < y.second; });
}

void QuestIndex::SearchBlocks(const PagePlan& plan, const std::vector<float>& q32, int32_t k,
                              int64_t block_begin, int64_t block_end, SearchResult* result,
                              std::vector<int64_t>* lanes_per_query) const {
  const int32_t d = dim_;
  const int64_t m = result->num_queries;
  BlockScratch s(plan, d);
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t q0 = block * kBlock;
    const int32_t nb = static_cast<int32_t>(std::min(kBlock, m - q0));
    if (!plan.all_pages) BoundPages(plan, q32.data() + q0 * d, nb, &s);
    for (int32_t b = 0; b < nb; ++b) {
      const int64_t qi = q0 + b;
      const float* q = q32.data() + qi * d;
      s.ids.clear();
      s.exact.clear();
      int64_t lanes = 0;
      if (plan.all_pages) {
        for (const PositionRange& r : plan.runs) lanes += ScoreSpan(plan, q, r.begin, r.end, &s);
      } else {
        SelectPages(plan, b, &s);
        for (const auto& [bound, p] : s.ranked_pages) {
          lanes += ScoreSpan(plan, q, p * page_size_,
                             std::min<int64_t>(size_, (p + 1) * page_size_), &s);
        }
      }
      (*lanes_per_query)[static_cast<size_t>(qi)] = lanes;
      WriteTopK(s.exact, s.ids, k, &s.order, result->ids.data() + qi * k,
                result->scores.data() + qi * k);
    }
  }
}

absl::StatusOr<SearchResult> QuestIndex::Search(const VectorView& queries, int32_t k,
                                                const SearchParams& params) const {
  KVR_RETURN_IF_ERROR(ValidateVectors("quest queries", queries, dim_));
  KVR_RETURN_IF_ERROR(ValidateK(k));
  KVR_RETURN_IF_ERROR(params.knobs.CheckKnown("quest", {"pages"}));
  KVR_ASSIGN_OR_RETURN(const PagePlan plan, PlanPages(k, params));
  const int64_t m = queries.rows;
  SearchResult result = SearchResult::Padded(m, k);
  if (m == 0) return result;
  const std::vector<float> q32 = VectorsToF32(queries);
  const int64_t num_blocks = (m + kBlock - 1) / kBlock;
  std::vector<int64_t> lanes_per_query(static_cast<size_t>(m), 0);
  ParallelForChunks(num_blocks, params.num_threads, [&](int64_t begin, int64_t end) {
    SearchBlocks(plan, q32, k, begin, end, &result, &lanes_per_query);
  });
  int64_t lanes_total = 0;
  for (int64_t e : lanes_per_query) lanes_total += e;
  result.stats.exact_scores = lanes_total;
  result.stats.keys_scanned = lanes_total + (plan.all_pages ? 0 : 2 * plan.bound_lanes * m);
  result.stats.visited = plan.selected * m;
  return result;
}

void QuestIndex::PageUpperBounds(const float* query, float* bounds) const {
  const int64_t pages = num_pages();
  const int64_t tiles = (pages + kTileKeys - 1) / kTileKeys;
  std::vector<float> qpos(static_cast<size_t>(dim_)), qneg(static_cast<size_t>(dim_));
  for (int32_t j = 0; j < dim_; ++j) {
    qpos[static_cast<size_t>(j)] = std::max(query[j], 0.0f);
    qneg[static_cast<size_t>(j)] = std::min(query[j], 0.0f);
  }
  std::vector<float> upper(static_cast<size_t>(tiles * kTileKeys)), lower(upper.size());
  ScoreTiles(qpos.data(), 1, max_tiles_.data(), dtype_, dim_, tiles, upper.data(), tiles * kTileKeys);
  ScoreTiles(qneg.data(), 1, min_tiles_.data(), dtype_, dim_, tiles, lower.data(), tiles * kTileKeys);
  for (int64_t p = 0; p < pages; ++p) bounds[p] = upper[static_cast<size_t>(p)] + lower[static_cast<size_t>(p)];
}

absl::StatusOr<std::string> QuestIndex::Serialize() const {
  std::string payload;
  ByteWriter w(&payload);
  w.Put<uint32_t>(kQuestPayloadVersion);
  w.Put<uint32_t>(static_cast<uint32_t>(page_size_));
  w.Put<uint64_t>(static_cast<uint64_t>(size_));
  // Row-major arrays (the tiles are an in-memory layout): keys, max, min.
  std::vector<char> row(static_cast<size_t>(dim_) * DTypeSize(dtype_));
  for (int64_t t = 0; t < size_; ++t) {
    UnpackFromTiles(key_tiles_.data(), dtype_, dim_, t, row.data());
    w.PutBytes(row.data(), row.size());
  }
  for (const AlignedVector<char>* tiles : {&max_tiles_, &min_tiles_}) {
    for (int64_t p = 0; p < num_pages(); ++p) {
      UnpackFromTiles(tiles->data(), dtype_, dim_, p, row.data());
      w.PutBytes(row.data(), row.size());
    }
  }
  return EncodeIndex(IndexHeader{std::string(kKind), dim_, size_, dtype_, build_params_}, payload);
}

absl::StatusOr<std::unique_ptr<QuestIndex>> QuestIndex::Load(absl::string_view bytes) {
  KVR_ASSIGN_OR_RETURN(auto decoded, DecodeIndex(bytes));
  return Load(decoded.first, decoded.second);
}

absl::StatusOr<std::unique_ptr<QuestIndex>> QuestIndex::Load(const IndexHeader& header,
                                                      absl::string_view payload) {
  ByteReader r(payload);
  KVR_RETURN_IF_ERROR(ReadPayloadVersion(header, kKind, kQuestPayloadVersion, &r));
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
  const size_t tile_bytes = row_bytes * kTileKeys;
  index->key_tiles_.resize((n + kTileKeys - 1) / kTileKeys * tile_bytes);
  index->max_tiles_.resize((pages + kTileKeys - 1) / kTileKeys * tile_bytes);
  index->min_tiles_.resize(index->max_tiles_.size());
  std::vector<char> rows(std::max<uint64_t>(n, pages) * row_bytes);
  KVR_RETURN_IF_ERROR(r.GetBytes(rows.data(), n * row_bytes));
  PackIntoTiles(rows.data(), header.key_dtype, static_cast<int64_t>(n), header.dim, header.dim, 0,
                index->key_tiles_.data(), header.key_dtype);
  for (AlignedVector<char>* tiles : {&index->max_tiles_, &index->min_tiles_}) {
    KVR_RETURN_IF_ERROR(r.GetBytes(rows.data(), pages * row_bytes));
    PackIntoTiles(rows.data(), header.key_dtype, static_cast<int64_t>(pages), header.dim,
                  header.dim, 0, tiles->data(), header.key_dtype);
  }
  if (r.remaining() != 0) return absl::DataLossError("quest payload has trailing bytes");
  return index;
}

}  // namespace kvrecall::index::quest
