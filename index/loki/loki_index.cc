#include "index/loki/loki_index.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/distance.h"
#include "index/flat/search_input.h"
#include "index/index_format.h"

namespace kvrecall::index::loki {
namespace {

constexpr uint32_t kLokiPayloadVersion = 1;

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
  plane_.insert(plane_.end(), new_plane.begin(), new_plane.end());
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

absl::StatusOr<SearchResult> LokiIndex::Search(const VectorView& queries, int32_t k,
                                               const SearchParams& params) const {
  const int32_t d = dim();
  KVR_RETURN_IF_ERROR(ValidateVectors("loki queries", queries, d));
  KVR_RETURN_IF_ERROR(ValidateK(k));
  KVR_RETURN_IF_ERROR(params.knobs.CheckKnown("loki", {"rank", "candidates"}));
  KVR_ASSIGN_OR_RETURN(const int64_t rank, params.knobs.GetInt("rank", rank_, 1, rank_));
  KVR_ASSIGN_OR_RETURN(const int64_t candidates,
                       params.knobs.GetInt("candidates", 8 * static_cast<int64_t>(k), 1));
  KVR_ASSIGN_OR_RETURN(const ExcludeSet exclude, ExcludeSet::Create(params.exclude, size_));
  const std::vector<PositionRange> runs = IncludedRuns(exclude, size_);
  int64_t eligible = 0;
  for (const PositionRange& r : runs) eligible += r.end - r.begin;
  const int64_t k_prime = std::min(std::max<int64_t>(candidates, k), eligible);
  const bool all_exact = k_prime >= eligible;

  const int64_t m = queries.rows;
  SearchResult result;
  result.num_queries = m;
  result.k = k;
  result.ids.assign(static_cast<size_t>(m) * k, -1);
  result.scores.assign(static_cast<size_t>(m) * k, -std::numeric_limits<float>::infinity());
  if (m == 0) return result;
  const std::vector<float> q32 = VectorsToF32(queries);
  const size_t esize = DTypeSize(dtype_);

  auto search_rows = [&](int64_t begin, int64_t end) {
    std::vector<float> rotated(static_cast<size_t>(rank));
    std::vector<float> approx;
    std::vector<int64_t> ids;
    std::vector<float> exact;
    TopK top(k);
    for (int64_t qi = begin; qi < end; ++qi) {
      const float* q = q32.data() + qi * d;
      if (all_exact) {
        exact.resize(static_cast<size_t>(eligible));
        ids.resize(static_cast<size_t>(eligible));
        int64_t at = 0;
        for (const PositionRange& r : runs) {
          ScoreRows(q, keys_.data() + r.begin * d * esize, dtype_, r.end - r.begin, d, d,
                    exact.data() + at);
          for (int64_t t = r.begin; t < r.end; ++t) ids[static_cast<size_t>(at++)] = t;
        }
      } else {
        for (int64_t c = 0; c < rank; ++c) {
          rotated[static_cast<size_t>(c)] =
              DotF32(basis_.components.data() + c * d, q, d);
        }
        approx.resize(static_cast<size_t>(eligible));
        int64_t at = 0;
        for (const PositionRange& r : runs) {
          ScoreRows(rotated.data(), plane_.data() + r.begin * rank_ * esize, dtype_,
                    r.end - r.begin, static_cast<int32_t>(rank), rank_, approx.data() + at);
          at += r.end - r.begin;
        }
        // Order of positions within `approx`: run after run; map back below.
        ids.resize(static_cast<size_t>(eligible));
        at = 0;
        for (const PositionRange& r : runs) {
          for (int64_t t = r.begin; t < r.end; ++t) ids[static_cast<size_t>(at++)] = t;
        }
        std::vector<int64_t> order(static_cast<size_t>(eligible));
        for (int64_t i = 0; i < eligible; ++i) order[static_cast<size_t>(i)] = i;
        std::nth_element(order.begin(), order.begin() + (k_prime - 1), order.end(),
                         [&](int64_t a, int64_t b) {
                           return approx[static_cast<size_t>(a)] > approx[static_cast<size_t>(b)];
                         });
        order.resize(static_cast<size_t>(k_prime));
        std::sort(order.begin(), order.end());  // ascending positions: sequential reads
        for (int64_t i = 0; i < k_prime; ++i) {
          ids[static_cast<size_t>(i)] = ids[static_cast<size_t>(order[static_cast<size_t>(i)])];
        }
        ids.resize(static_cast<size_t>(k_prime));
        exact.resize(static_cast<size_t>(k_prime));
        ScoreRowsGather(q, keys_.data(), dtype_, d, d, ids.data(), k_prime, exact.data());
      }
      for (size_t i = 0; i < ids.size(); ++i) top.Push(exact[i], ids[i]);
      top.Drain(result.ids.data() + qi * k, result.scores.data() + qi * k);
    }
  };
  if (params.num_threads == 1 || m == 1) {
    search_rows(0, m);
  } else {
    ThreadPool::Default()->ParallelFor(m, 1, search_rows, ResolveThreads(params.num_threads));
  }
  result.stats.keys_scanned = m * eligible;
  result.stats.exact_scores = m * k_prime;
  return result;
}

int64_t LokiIndex::IndexBytes() const {
  return static_cast<int64_t>(plane_.size() + basis_.components.size() * sizeof(float) +
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
  w.PutBytes(plane_.data(), plane_.size());
  IndexHeader header;
  header.kind = std::string(kKind);
  header.dim = dim();
  header.size = size_;
  header.key_dtype = dtype_;
  header.build_params = build_params_;
  return EncodeIndex(header, payload);
}

absl::StatusOr<std::unique_ptr<LokiIndex>> LokiIndex::Load(absl::string_view bytes) {
  KVR_ASSIGN_OR_RETURN(auto decoded, DecodeIndex(bytes));
  return Load(decoded.first, decoded.second);
}

absl::StatusOr<std::unique_ptr<LokiIndex>> LokiIndex::Load(const IndexHeader& header,
                                                      absl::string_view payload) {
  if (header.kind != kKind) {
    return absl::InvalidArgumentError(
        absl::StrCat("index bytes hold kind '", header.kind, "', not 'loki'"));
  }
  ByteReader r(payload);
  KVR_ASSIGN_OR_RETURN(uint32_t version, r.Get<uint32_t>());
  if (version != kLokiPayloadVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("loki payload version ", version, " is not supported (this build reads ",
                     kLokiPayloadVersion, ")"));
  }
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
  index->plane_.resize(n * rank * esize);
  KVR_RETURN_IF_ERROR(r.GetBytes(index->keys_.data(), index->keys_.size()));
  KVR_RETURN_IF_ERROR(r.GetBytes(index->plane_.data(), index->plane_.size()));
  if (r.remaining() != 0) return absl::DataLossError("loki payload has trailing bytes");
  return index;
}

}  // namespace kvrecall::index::loki
