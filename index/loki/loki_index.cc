#include "index/loki/loki_index.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
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

namespace kvrecall::index::loki {
namespace {

constexpr uint32_t kLokiPayloadVersion = 1;
// Queries of a search block, which share each plane tile load.
constexpr int64_t kBlock = 4;

// Appends to `out` the positions of the `m` best scores among the positions
// of `runs` (s is indexed by position); all of them when there are no more
// than m. A threshold estimated from a sample of about 2048 scores (with a
// margin) lets the vectorised CollectAtLeast skip most positions; the exact
// top m of the survivors is then taken. Ties at the m-th score are broken
// arbitrarily (the candidates only feed the exact rerank).
void SelectTopPositions(const float* s, const std::vector<PositionRange>& runs, int64_t eligible,
                        int64_t m, std::vector<float>* sample, std::vector<int32_t>* hits,
                        std::vector<std::pair<float, int64_t>>* ranked, std::vector<int64_t>* out) {
  ranked->clear();
  float tau = -std::numeric_limits<float>::infinity();
  if (m < eligible) {
    const int64_t step = std::max<int64_t>(1, eligible / 2048);
    sample->clear();
    for (const PositionRange& r : runs) {
      for (int64_t t = r.begin; t < r.end; t += step) sample->push_back(s[t]);
    }
    const double want = static_cast<double>(m) / eligible * static_cast<double>(sample->size());
    const int64_t j = std::min<int64_t>(static_cast<int64_t>(sample->size()) - 1,
                                        static_cast<int64_t>(want * 1.25) + 8);
    std::nth_element(sample->begin(), sample->begin() + j, sample->end(), std::greater<float>());
    tau = (*sample)[static_cast<size_t>(j)];
  }
  for (int pass = 0; pass < 2; ++pass) {
    ranked->clear();
    for (const PositionRange& r : runs) {
      hits->resize(static_cast<size_t>(r.end - r.begin));
      const int64_t found = CollectAtLeast(s + r.begin, r.end - r.begin, tau, hits->data());
      for (int64_t i = 0; i < found; ++i) {
        const int64_t t = r.begin + (*hits)[static_cast<size_t>(i)];
        ranked->emplace_back(s[t], t);
      }
    }
    if (static_cast<int64_t>(ranked->size()) >= m) break;
    tau = -std::numeric_limits<float>::infinity();  // the estimate was too high: take all
  }
  if (static_cast<int64_t>(ranked->size()) > m) {
    std::nth_element(ranked->begin(), ranked->begin() + (m - 1), ranked->end(),
                     [](const auto& x, const auto& y) { return x.first > y.first; });
    ranked->resize(static_cast<size_t>(m));
  }
  for (const auto& [score, t] : *ranked) out->push_back(t);
}


}  // namespace

absl::StatusOr<LokiOptions> LokiOptions::FromBuild(
    const ParamMap& params, const std::vector<std::pair<std::string, std::string>>& artifacts) {
  KVR_RETURN_IF_ERROR(params.CheckKnown("loki", {"rank", "layer", "kv_head"}));
  LokiOptions options;
  KVR_ASSIGN_OR_RETURN(int64_t rank, params.GetInt("rank", 0, 0, kMaxPcaDim));
  options.rank = static_cast<int32_t>(rank);
  KVR_ASSIGN_OR_RETURN(int64_t layer, params.GetInt("layer", -1, -1, INT32_MAX));
  KVR_ASSIGN_OR_RETURN(int64_t kv_head, params.GetInt("kv_head", -1, -1, INT32_MAX));
  for (const auto& [name, bytes] : artifacts) {
    if (name != "loki_basis") continue;
    KVR_ASSIGN_OR_RETURN(std::vector<PcaBasis> bases, ParsePcaBases(bytes));
    KVR_ASSIGN_OR_RETURN(PcaBasis basis, SelectPcaBasis(bases, static_cast<int32_t>(layer),
                                                        static_cast<int32_t>(kv_head)));
    options.basis = std::move(basis);
  }
  return options;
}

LokiIndex::LokiIndex(PcaBasis basis, int32_t rank, DType dtype, ParamMap build_params)
    : basis_(std::move(basis)), rank_(rank), dtype_(dtype), build_params_(std::move(build_params)) {}

absl::StatusOr<std::unique_ptr<LokiIndex>> LokiIndex::Create(const VectorView& keys,
                                                            const LokiOptions& options) {
  KVR_RETURN_IF_ERROR(ValidateVectors("loki keys", keys, -1));
  const int32_t d = keys.dim;
  if (d > kMaxPcaDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("loki: key dimension ", d, " is above ", kMaxPcaDim));
  }
  if (options.rank < 0 || options.rank > d) {
    return absl::InvalidArgumentError(
        absl::StrCat("loki: rank ", options.rank, " is outside [1, ", d, "] (0 = d/4)"));
  }
  const int32_t rank = options.rank == 0 ? std::max(1, d / 4) : options.rank;
  ParamMap params;
  params.SetInt("rank", rank);
  PcaBasis basis;
  if (options.basis.has_value()) {
    KVR_RETURN_IF_ERROR(ValidatePcaBasis(*options.basis));
    if (options.basis->dim != d) {
      return absl::InvalidArgumentError(absl::StrCat(
          "loki: the basis has dimension ", options.basis->dim, ", the keys ", d));
    }
    basis = *options.basis;
    params.Set("basis", "artifact");
    if (basis.layer >= 0) params.SetInt("layer", basis.layer);
    if (basis.kv_head >= 0) params.SetInt("kv_head", basis.kv_head);
  } else {
    if (keys.rows < 1) {
      return absl::InvalidArgumentError(
          "loki: no loki_basis artifact was given and there are no keys to fit one from");
    }
    PcaFitOptions fit;
    fit.num_threads = options.num_threads;
    if (options.progress) {
      fit.progress = [&options](const Progress& p) {
        return options.progress(Progress{"fit:" + p.stage, p.done, p.total, 0.5 * p.fraction});
      };
    }
    KVR_ASSIGN_OR_RETURN(basis, FitPcaBasis(keys, fit));
    params.Set("basis", "fitted");
  }
  std::unique_ptr<LokiIndex> index(new LokiIndex(std::move(basis), rank, keys.dtype, params));
  KVR_RETURN_IF_ERROR(index->AppendRows(keys, options.num_threads, options.progress));
  return index;
}

absl::Status LokiIndex::AppendRows(const VectorView& keys, int num_threads,
                                   const ProgressCallback& progress) {
  const int32_t d = basis_.dim;
  const int64_t n = keys.rows;
  if (n == 0) return absl::OkStatus();
  const size_t esize = DTypeSize(dtype_);
  std::vector<char> new_keys(static_cast<size_t>(n) * d * esize);
  std::vector<char> new_plane(static_cast<size_t>(n) * rank_ * esize);
  std::atomic<bool> not_finite{false};
  std::atomic<bool> cancelled{false};
  absl::Mutex progress_mu;
  int64_t rows_done = 0;  // guarded by progress_mu
  const int64_t grain = 512;
  ThreadPool::Default()->ParallelFor(
      n, grain,
      [&](int64_t begin, int64_t end) {
        if (cancelled.load(std::memory_order_relaxed)) return;
        std::vector<float> x(static_cast<size_t>(d));
        std::vector<float> rotated(static_cast<size_t>(rank_));
        for (int64_t i = begin; i < end; ++i) {
          std::memcpy(new_keys.data() + i * d * esize, keys.row(i), d * esize);
          ConvertToFloat(keys.row(i), dtype_, static_cast<size_t>(d), x.data());
          for (int32_t j = 0; j < d; ++j) {
            if (!std::isfinite(x[static_cast<size_t>(j)])) not_finite.store(true);
          }
          for (int32_t c = 0; c < rank_; ++c) {
            rotated[static_cast<size_t>(c)] =
                DotF32(basis_.components.data() + static_cast<size_t>(c) * d, x.data(), d);
          }
          ConvertFromFloat(rotated.data(), static_cast<size_t>(rank_), dtype_,
                           new_plane.data() + i * rank_ * esize);
        }
        if (progress) {
          absl::MutexLock lock(&progress_mu);
          rows_done += end - begin;
          if (!progress(Progress{"rotate", rows_done, n, 0.5 + 0.5 * rows_done / double(n)})) {
            cancelled.store(true);
          }
        }
      },
      ResolveThreads(num_threads));
  if (not_finite.load()) return absl::InvalidArgumentError("loki: keys contain NaN or Inf");
  if (cancelled.load()) return absl::CancelledError("loki build cancelled");
  keys_.insert(keys_.end(), new_keys.begin(), new_keys.end());
  plane_tiles_.resize(static_cast<size_t>((size_ + n + kTileKeys - 1) / kTileKeys) * rank_ *
                      kTileKeys * esize);
  PackIntoTiles(new_plane.data(), dtype_, n, rank_, rank_, size_, plane_tiles_.data(), dtype_);
  size_ += n;
  return absl::OkStatus();
}

absl::Status LokiIndex::Add(const VectorView& keys) {
  KVR_RETURN_IF_ERROR(ValidateVectors("loki keys", keys, dim()));
  if (keys.rows > 0 && keys.dtype != dtype_) {
    return absl::InvalidArgumentError(absl::StrCat("loki: keys are ", DTypeName(keys.dtype),
                                                   ", the index holds ", DTypeName(dtype_)));
  }
  return AppendRows(keys, /*num_threads=*/0, nullptr);
}

// What a search scores: the eligible positions, how many candidates each
// query scores exactly, and the plane tiles that cover them.
struct LokiIndex::CandidatePlan {
  int64_t rank = 0;                     // rotated dims of the approximate pass
  std::vector<PositionRange> runs;      // eligible positions
  int64_t eligible = 0;                 // their count
  int64_t k_prime = 0;                  // candidates scored exactly per query
  bool all_exact = false;               // every eligible key: no approximate pass
  std::vector<PositionRange> tile_runs;  // plane tiles holding eligible positions
  int64_t tile_keys = 0;                 // keys those tiles cover
  int64_t num_tiles = 0;                 // plane tiles of the index
};

// One thread's buffers for a run of query blocks.
struct LokiIndex::BlockScratch {
  explicit BlockScratch(const CandidatePlan& plan)
      : rotated(static_cast<size_t>(kBlock * plan.rank)),
        approx(plan.all_exact ? 0 : static_cast<size_t>(kBlock * plan.num_tiles * kTileKeys)) {}
  std::vector<float> rotated;  // [kBlock, rank] the block's queries, rotated
  std::vector<float> approx;   // [kBlock, num_tiles * 16] approximate scores
  std::vector<std::pair<float, int64_t>> ranked;
  std::vector<float> sample;
  std::vector<int32_t> hits;
  std::vector<uint64_t> bitmap;
  std::vector<int64_t> ids;   // the positions scored exactly for a query
  std::vector<float> exact;   // their scores
  std::vector<int32_t> order;
};

absl::StatusOr<LokiIndex::CandidatePlan> LokiIndex::PlanCandidates(
    int32_t k, const SearchParams& params) const {
  CandidatePlan plan;
  KVR_ASSIGN_OR_RETURN(plan.rank, params.knobs.GetInt("rank", rank_, 1, rank_));
  KVR_ASSIGN_OR_RETURN(const int64_t candidates,
                       params.knobs.GetInt("candidates", 8 * static_cast<int64_t>(k), 1));
  KVR_ASSIGN_OR_RETURN(const ExcludeSet exclude, ExcludeSet::Create(params.exclude, size_));
  plan.runs = exclude.IncludedRuns();
  for (const PositionRange& r : plan.runs) plan.eligible += r.end - r.begin;
  plan.k_prime = std::min(std::max<int64_t>(candidates, k), plan.eligible);
  plan.all_exact = plan.k_prime >= plan.eligible;
  for (const PositionRange& r : plan.runs) {
    const int64_t t0 = r.begin / kTileKeys, t1 = (r.end - 1) / kTileKeys + 1;
    if (!plan.tile_runs.empty() && t0 < plan.tile_runs.back().end) {
      plan.tile_runs.back().end = t1;
    } else {
      plan.tile_runs.push_back({t0, t1});
    }
  }
  for (const PositionRange& t : plan.tile_runs) {
    plan.tile_keys += std::min(size_, t.end * kTileKeys) - t.begin * kTileKeys;
  }
  plan.num_tiles = (size_ + kTileKeys - 1) / kTileKeys;
  return plan;
}

void LokiIndex::ApproximateScores(const CandidatePlan& plan, const float* q, int32_t nb,
                                  BlockScratch* s) const {
  const int32_t d = dim();
  const int64_t rank = plan.rank;
  for (int32_t b = 0; b < nb; ++b) {
    for (int64_t c = 0; c < rank; ++c) {
      s->rotated[static_cast<size_t>(b * rank + c)] =
          DotF32(basis_.components.data() + c * d, q + b * d, d);
    }
  }
  const size_t tile_bytes = static_cast<size_t>(rank_) * kTileKeys * DTypeSize(dtype_);
  const int64_t stride = plan.num_tiles * kTileKeys;
  for (const PositionRange& t : plan.tile_runs) {
    if (rank == rank_) {
      ScoreTiles(s->rotated.data(), nb, plane_tiles_.data() + t.begin * tile_bytes, dtype_, rank_,
                 t.end - t.begin, s->approx.data() + t.begin * kTileKeys, stride);
    } else {  // the first `rank` rows of every tile
      for (int64_t tile = t.begin; tile < t.end; ++tile) {
        ScoreTiles(s->rotated.data(), nb, plane_tiles_.data() + tile * tile_bytes, dtype_,
                   static_cast<int32_t>(rank), 1, s->approx.data() + tile * kTileKeys, stride);
      }
    }
  }
}

void LokiIndex::ScoreAllEligible(const CandidatePlan& plan, const float* q,
                                 BlockScratch* s) const {
  const int32_t d = dim();
  const size_t esize = DTypeSize(dtype_);
  s->ids.clear();
  s->exact.resize(static_cast<size_t>(plan.eligible));
  for (const PositionRange& r : plan.runs) {
    ScoreRows(q, keys_.data() + r.begin * d * esize, dtype_, r.end - r.begin, d, d,
              s->exact.data() + s->ids.size());
    for (int64_t t = r.begin; t < r.end; ++t) s->ids.push_back(t);
  }
}

void LokiIndex::ScoreCandidates(const CandidatePlan& plan, const float* q, int32_t b,
                                BlockScratch* s) const {
  const int32_t d = dim();
  s->ids.clear();
  SelectTopPositions(s->approx.data() + b * plan.num_tiles * kTileKeys, plan.runs, plan.eligible,
                     plan.k_prime, &s->sample, &s->hits, &s->ranked, &s->ids);
  // Ascending positions (sequential reads) through a bitmap.
  s->bitmap.assign(static_cast<size_t>((size_ + 63) / 64), 0);
  for (int64_t t : s->ids) s->bitmap[static_cast<size_t>(t >> 6)] |= uint64_t{1} << (t & 63);
  s->ids.clear();
  for (size_t w = 0; w < s->bitmap.size(); ++w) {
    for (uint64_t bits = s->bitmap[w]; bits != 0; bits &= bits - 1) {
      s->ids.push_back(static_cast<int64_t>(w * 64 + __builtin_ctzll(bits)));
    }
  }
  s->exact.resize(s->ids.size());
  ScoreRowsGather(q, keys_.data(), dtype_, d, d, s->ids.data(), plan.k_prime, s->exact.data());
}

absl::StatusOr<SearchResult> LokiIndex::Search(const VectorView& queries, int32_t k,
                                               const SearchParams& params) const {
  const int32_t d = dim();
  KVR_RETURN_IF_ERROR(ValidateVectors("loki queries", queries, d));
  KVR_RETURN_IF_ERROR(ValidateK(k));
  KVR_RETURN_IF_ERROR(params.knobs.CheckKnown("loki", {"rank", "candidates"}));
  KVR_ASSIGN_OR_RETURN(const CandidatePlan plan, PlanCandidates(k, params));
  const int64_t m = queries.rows;
  SearchResult result = SearchResult::Padded(m, k);
  if (m == 0) return result;
  const std::vector<float> q32 = VectorsToF32(queries);
  const int64_t num_blocks = (m + kBlock - 1) / kBlock;
  ParallelForChunks(num_blocks, params.num_threads, [&](int64_t block_begin, int64_t block_end) {
    BlockScratch s(plan);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t q0 = block * kBlock;
      const int32_t nb = static_cast<int32_t>(std::min(kBlock, m - q0));
      if (!plan.all_exact) ApproximateScores(plan, q32.data() + q0 * d, nb, &s);
      for (int32_t b = 0; b < nb; ++b) {
        const int64_t qi = q0 + b;
        const float* q = q32.data() + qi * d;
        if (plan.all_exact) {
          ScoreAllEligible(plan, q, &s);
        } else {
          ScoreCandidates(plan, q, b, &s);
        }
        WriteTopK(s.exact, s.ids, k, &s.order, result.ids.data() + qi * k,
                  result.scores.data() + qi * k);
      }
    }
  });
  result.stats.keys_scanned = m * (plan.all_exact ? plan.eligible : plan.tile_keys);
  result.stats.exact_scores = m * plan.k_prime;
  return result;
}

int64_t LokiIndex::IndexBytes() const {
  return static_cast<int64_t>(plane_tiles_.size() + basis_.components.size() * sizeof(float) +
                              basis_.mean.size() * sizeof(float) +
                              basis_.explained_variance.size() * sizeof(double));
}

absl::StatusOr<std::string> LokiIndex::Serialize() const {
  std::string payload;
  ByteWriter w(&payload);
  w.Put<uint32_t>(kLokiPayloadVersion);
  w.Put<uint32_t>(static_cast<uint32_t>(rank_));
  w.PutString(SerializePcaBases({basis_}));
  w.Put<uint64_t>(static_cast<uint64_t>(size_));
  w.PutBytes(keys_.data(), keys_.size());
  // The plane row-major, [size_, rank_] (the tiles are an in-memory layout).
  std::vector<char> row(static_cast<size_t>(rank_) * DTypeSize(dtype_));
  for (int64_t t = 0; t < size_; ++t) {
    UnpackFromTiles(plane_tiles_.data(), dtype_, rank_, t, row.data());
    w.PutBytes(row.data(), row.size());
  }
  return EncodeIndex(IndexHeader{std::string(kKind), dim(), size_, dtype_, build_params_}, payload);
}

absl::StatusOr<std::unique_ptr<LokiIndex>> LokiIndex::Load(absl::string_view bytes) {
  KVR_ASSIGN_OR_RETURN(auto decoded, DecodeIndex(bytes));
  return Load(decoded.first, decoded.second);
}

absl::StatusOr<std::unique_ptr<LokiIndex>> LokiIndex::Load(const IndexHeader& header,
                                                      absl::string_view payload) {
  ByteReader r(payload);
  KVR_RETURN_IF_ERROR(ReadPayloadVersion(header, kKind, kLokiPayloadVersion, &r));
  KVR_ASSIGN_OR_RETURN(uint32_t rank, r.Get<uint32_t>());
  KVR_ASSIGN_OR_RETURN(std::string basis_bytes, r.GetString());
  KVR_ASSIGN_OR_RETURN(std::vector<PcaBasis> bases, ParsePcaBases(basis_bytes));
  if (bases.size() != 1) return absl::DataLossError("loki payload must hold exactly one basis");
  KVR_ASSIGN_OR_RETURN(uint64_t n, r.Get<uint64_t>());
  const int32_t d = bases[0].dim;
  if (d != header.dim || static_cast<int64_t>(n) != header.size || rank < 1 ||
      rank > static_cast<uint32_t>(d)) {
    return absl::DataLossError("loki payload does not match its header");
  }
  const size_t esize = DTypeSize(header.key_dtype);
  if (n > r.remaining() / (static_cast<size_t>(d) + rank) / esize) {
    return absl::DataLossError("loki payload is truncated");
  }
  std::unique_ptr<LokiIndex> index(
      new LokiIndex(std::move(bases[0]), static_cast<int32_t>(rank), header.key_dtype,
                    header.build_params));
  index->size_ = static_cast<int64_t>(n);
  index->keys_.resize(n * d * esize);
  std::vector<char> plane(n * rank * esize);
  KVR_RETURN_IF_ERROR(r.GetBytes(index->keys_.data(), index->keys_.size()));
  KVR_RETURN_IF_ERROR(r.GetBytes(plane.data(), plane.size()));
  index->plane_tiles_.resize(static_cast<size_t>((n + kTileKeys - 1) / kTileKeys) * rank *
                             kTileKeys * esize);
  PackIntoTiles(plane.data(), index->dtype_, static_cast<int64_t>(n), static_cast<int32_t>(rank),
                rank, 0, index->plane_tiles_.data(), index->dtype_);
  if (r.remaining() != 0) return absl::DataLossError("loki payload has trailing bytes");
  return index;
}

}  // namespace kvrecall::index::loki
