#include "index/loki/pca_basis.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/checksum.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/index_format.h"

namespace kvrecall::index::loki {
namespace {

constexpr char kBasisMagic[8] = {'K', 'V', 'R', 'L', 'O', 'K', 'I', 'B'};
constexpr uint32_t kBasisFormatVersion = 1;

// Rows [begin, end) of `keys` as doubles, d per row.
void RowsToDouble(const VectorView& keys, int64_t begin, int64_t end, std::vector<float>* tmp,
                  std::vector<double>* out) {
  const int32_t d = keys.dim;
  tmp->resize(static_cast<size_t>(d));
  out->resize(static_cast<size_t>((end - begin) * d));
  for (int64_t i = begin; i < end; ++i) {
    ConvertToFloat(keys.row(i), keys.dtype, static_cast<size_t>(d), tmp->data());
    double* o = out->data() + (i - begin) * d;
    for (int32_t j = 0; j < d; ++j) o[j] = (*tmp)[static_cast<size_t>(j)];
  }
}

int EffectiveParallelism(int num_threads) {
  return num_threads <= 0 ? 0 : num_threads;  // <= 0: the whole pool + caller
}

// How FitPcaBasis cuts the keys: chunks of `grain` rows, summed in chunk
// order so that the result does not depend on the thread count.
struct FitChunks {
  explicit FitChunks(int64_t n)
      : grain(std::max<int64_t>(256, n / 64)), count((n + grain - 1) / grain) {}
  int64_t grain;
  int64_t count;
};

// Pass 1: the mean of the keys in double (zeros unless `center`).
// INVALID_ARGUMENT when a key holds NaN or Inf.
absl::StatusOr<std::vector<double>> KeyMean(const VectorView& keys, bool center,
                                            const FitChunks& chunks, int parallelism) {
  const int32_t d = keys.dim;
  const int64_t n = keys.rows;
  std::atomic<bool> not_finite{false};
  std::vector<double> chunk_sums(static_cast<size_t>(chunks.count * d), 0.0);
  ThreadPool::Default()->ParallelFor(
      n, chunks.grain,
      [&](int64_t begin, int64_t end) {
        std::vector<float> tmp;
        std::vector<double> rows;
        RowsToDouble(keys, begin, end, &tmp, &rows);
        double* sum = chunk_sums.data() + (begin / chunks.grain) * d;
        for (int64_t i = 0; i < end - begin; ++i) {
          const double* x = rows.data() + i * d;
          for (int32_t j = 0; j < d; ++j) {
            if (!std::isfinite(x[j])) not_finite.store(true);
            sum[j] += x[j];
          }
        }
      },
      parallelism);
  if (not_finite.load()) {
    return absl::InvalidArgumentError("PCA basis: keys contain NaN or Inf");
  }
  std::vector<double> mean(static_cast<size_t>(d), 0.0);
  if (center) {
    for (int64_t c = 0; c < chunks.count; ++c) {
      for (int32_t j = 0; j < d; ++j) mean[static_cast<size_t>(j)] += chunk_sums[c * d + j];
    }
    for (double& m : mean) m /= static_cast<double>(n);
  }
  return mean;
}

// Pass 2: the covariance (second moment about `mean`), [d, d] symmetric,
// divided by n - 1 when centred (n otherwise). Reports progress as
// "covariance" up to 0.9; CANCELLED when the callback says stop.
absl::StatusOr<std::vector<double>> KeyCovariance(const VectorView& keys,
                                                  const std::vector<double>& mean,
                                                  const PcaFitOptions& options,
                                                  const FitChunks& chunks, int parallelism) {
  const int32_t d = keys.dim;
  const int64_t n = keys.rows;
  std::atomic<bool> cancelled{false};
  absl::Mutex progress_mu;
  int64_t rows_done = 0;  // guarded by progress_mu
  // Upper triangle per chunk.
  std::vector<double> chunk_cov(static_cast<size_t>(chunks.count) * d * d, 0.0);
  ThreadPool::Default()->ParallelFor(
      n, chunks.grain,
      [&](int64_t begin, int64_t end) {
        if (cancelled.load(std::memory_order_relaxed)) return;
        std::vector<float> tmp;
        std::vector<double> rows;
        RowsToDouble(keys, begin, end, &tmp, &rows);
        double* cov = chunk_cov.data() + (begin / chunks.grain) * d * d;
        for (int64_t i = 0; i < end - begin; ++i) {
          double* x = rows.data() + i * d;
          for (int32_t j = 0; j < d; ++j) x[j] -= mean[static_cast<size_t>(j)];
          for (int32_t p = 0; p < d; ++p) {
            const double xp = x[p];
            double* row = cov + static_cast<size_t>(p) * d;
            for (int32_t q = p; q < d; ++q) row[q] += xp * x[q];
          }
        }
        if (options.progress) {
          // Serialised so that reports arrive in order of `done`.
          absl::MutexLock lock(&progress_mu);
          rows_done += end - begin;
          if (!options.progress(
                  Progress{"covariance", rows_done, n, 0.9 * rows_done / static_cast<double>(n)})) {
            cancelled.store(true);
          }
        }
      },
      parallelism);
  if (cancelled.load()) return absl::CancelledError("PCA basis fit cancelled");

  std::vector<double> cov(static_cast<size_t>(d) * d, 0.0);
  for (int64_t c = 0; c < chunks.count; ++c) {
    const double* src = chunk_cov.data() + c * d * d;
    for (size_t i = 0; i < cov.size(); ++i) cov[i] += src[i];
  }
  const double denom = (options.center && n > 1) ? static_cast<double>(n - 1) : static_cast<double>(n);
  for (int32_t p = 0; p < d; ++p) {
    for (int32_t q = p; q < d; ++q) {
      const double v = cov[static_cast<size_t>(p) * d + q] / denom;
      cov[static_cast<size_t>(p) * d + q] = v;
      cov[static_cast<size_t>(q) * d + p] = v;
    }
  }
  return cov;
}

}  // namespace

double PcaBasis::ExplainedVarianceRatio(int32_t r) const {
  double total = 0;
  for (double v : explained_variance) total += v;
  if (total <= 0) return 1.0;
  double head = 0;
  for (int32_t i = 0; i < r && i < static_cast<int32_t>(explained_variance.size()); ++i) {
    head += explained_variance[static_cast<size_t>(i)];
  }
  return head / total;
}

int32_t PcaBasis::RankForVarianceRatio(double fraction) const {
  for (int32_t r = 1; r <= dim; ++r) {
    if (ExplainedVarianceRatio(r) >= fraction) return r;
  }
  return std::max(dim, 1);
}

absl::Status SymmetricEigen(const std::vector<double>& a_in, int32_t n,
                            std::vector<double>* eigenvalues, std::vector<double>* eigenvectors,
                            int max_sweeps) {
  if (n < 1 || a_in.size() != static_cast<size_t>(n) * n) {
    return absl::InvalidArgumentError("SymmetricEigen: matrix is not n x n");
  }
  std::vector<double> a = a_in;
  std::vector<double> v(static_cast<size_t>(n) * n, 0.0);  // columns are eigenvectors
  for (int32_t i = 0; i < n; ++i) v[static_cast<size_t>(i) * n + i] = 1.0;
  auto at = [&](int32_t i, int32_t j) -> double& { return a[static_cast<size_t>(i) * n + j]; };
  auto vt = [&](int32_t i, int32_t j) -> double& { return v[static_cast<size_t>(i) * n + j]; };

  double total = 0;
  for (double x : a) total += x * x;
  bool converged = false;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    double off = 0;
    for (int32_t p = 0; p < n; ++p) {
      for (int32_t q = p + 1; q < n; ++q) off += at(p, q) * at(p, q);
    }
    if (off == 0.0 || off <= 1e-30 * total) {
      converged = true;
      break;
    }
    for (int32_t p = 0; p < n; ++p) {
      for (int32_t q = p + 1; q < n; ++q) {
        const double apq = at(p, q);
        const double app = at(p, p);
        const double aqq = at(q, q);
        const double g = 100.0 * std::fabs(apq);
        // Once the element is negligible against both diagonal entries, zero it.
        if (sweep > 3 && std::fabs(app) + g == std::fabs(app) &&
            std::fabs(aqq) + g == std::fabs(aqq)) {
          at(p, q) = 0.0;
          at(q, p) = 0.0;
          continue;
        }
        if (apq == 0.0) continue;
        const double theta = (aqq - app) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0);
        const double s = t * c;
        // A <- J^T A J with J the rotation in the (p, q) plane.
        for (int32_t k = 0; k < n; ++k) {
          const double akp = at(k, p);
          const double akq = at(k, q);
          at(k, p) = c * akp - s * akq;
          at(k, q) = s * akp + c * akq;
        }
        for (int32_t k = 0; k < n; ++k) {
          const double apk = at(p, k);
          const double aqk = at(q, k);
          at(p, k) = c * apk - s * aqk;
          at(q, k) = s * apk + c * aqk;
        }
        at(p, q) = 0.0;
        at(q, p) = 0.0;
        for (int32_t k = 0; k < n; ++k) {
          const double vkp = vt(k, p);
          const double vkq = vt(k, q);
          vt(k, p) = c * vkp - s * vkq;
          vt(k, q) = s * vkp + c * vkq;
        }
      }
    }
  }
  if (!converged) {
    return absl::InternalError(
        absl::StrCat("Jacobi eigensolver did not converge in ", max_sweeps, " sweeps"));
  }
  std::vector<int32_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t x, int32_t y) { return at(x, x) > at(y, y); });
  eigenvalues->resize(static_cast<size_t>(n));
  eigenvectors->resize(static_cast<size_t>(n) * n);
  for (int32_t r = 0; r < n; ++r) {
    const int32_t col = order[static_cast<size_t>(r)];
    (*eigenvalues)[static_cast<size_t>(r)] = at(col, col);
    // Deterministic sign: the largest-magnitude component is positive.
    int32_t arg = 0;
    for (int32_t k = 1; k < n; ++k) {
      if (std::fabs(vt(k, col)) > std::fabs(vt(arg, col))) arg = k;
    }
    const double sign = vt(arg, col) < 0 ? -1.0 : 1.0;
    for (int32_t k = 0; k < n; ++k) {
      (*eigenvectors)[static_cast<size_t>(r) * n + k] = sign * vt(k, col);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<PcaBasis> FitPcaBasis(const VectorView& keys, const PcaFitOptions& options) {
  const int32_t d = keys.dim;
  const int64_t n = keys.rows;
  if (d < 1 || d > kMaxPcaDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("PCA basis: key dimension ", d, " is outside [1, ", kMaxPcaDim, "]"));
  }
  if (n < 1 || keys.data == nullptr) {
    return absl::InvalidArgumentError("PCA basis: needs at least one key");
  }
  if (keys.row_stride() < d) {
    return absl::InvalidArgumentError("PCA basis: key stride is smaller than the dimension");
  }
  const int parallelism = EffectiveParallelism(options.num_threads);
  const FitChunks chunks(n);
  KVR_ASSIGN_OR_RETURN(const std::vector<double> mean,
                       KeyMean(keys, options.center, chunks, parallelism));
  KVR_ASSIGN_OR_RETURN(const std::vector<double> cov,
                       KeyCovariance(keys, mean, options, chunks, parallelism));
  std::vector<double> values, vectors;
  KVR_RETURN_IF_ERROR(SymmetricEigen(cov, d, &values, &vectors));
  if (options.progress && !options.progress(Progress{"eigen", 1, 1, 1.0})) {
    return absl::CancelledError("PCA basis fit cancelled");
  }

  PcaBasis basis;
  basis.dim = d;
  basis.num_samples = n;
  basis.centered = options.center;
  basis.components.resize(static_cast<size_t>(d) * d);
  for (size_t i = 0; i < vectors.size(); ++i) basis.components[i] = static_cast<float>(vectors[i]);
  basis.mean.resize(static_cast<size_t>(d));
  for (int32_t j = 0; j < d; ++j) basis.mean[static_cast<size_t>(j)] = static_cast<float>(mean[static_cast<size_t>(j)]);
  basis.explained_variance.resize(static_cast<size_t>(d));
  for (int32_t j = 0; j < d; ++j) {
    basis.explained_variance[static_cast<size_t>(j)] = std::max(0.0, values[static_cast<size_t>(j)]);
  }
  return basis;
}

absl::Status ValidatePcaBasis(const PcaBasis& b) {
  if (b.dim < 1 || b.dim > kMaxPcaDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("PCA basis dimension ", b.dim, " is outside [1, ", kMaxPcaDim, "]"));
  }
  const size_t d = static_cast<size_t>(b.dim);
  if (b.components.size() != d * d || b.mean.size() != d || b.explained_variance.size() != d) {
    return absl::InvalidArgumentError("PCA basis arrays do not match its dimension");
  }
  if (b.num_samples < 0) return absl::InvalidArgumentError("PCA basis has a negative sample count");
  for (float x : b.components) {
    if (!std::isfinite(x)) return absl::InvalidArgumentError("PCA basis components are not finite");
  }
  for (float x : b.mean) {
    if (!std::isfinite(x)) return absl::InvalidArgumentError("PCA basis mean is not finite");
  }
  const double top = b.explained_variance.empty() ? 0 : b.explained_variance[0];
  for (size_t i = 0; i < d; ++i) {
    const double v = b.explained_variance[i];
    if (!std::isfinite(v) || v < 0) {
      return absl::InvalidArgumentError("PCA basis has a negative or non-finite variance");
    }
    if (i > 0 && v > b.explained_variance[i - 1] + 1e-9 * top) {
      return absl::InvalidArgumentError("PCA basis variances are not in descending order");
    }
  }
  for (size_t i = 0; i < d; ++i) {
    for (size_t j = i; j < d; ++j) {
      double dot = 0;
      for (size_t t = 0; t < d; ++t) {
        dot += static_cast<double>(b.components[i * d + t]) * b.components[j * d + t];
      }
      const double want = i == j ? 1.0 : 0.0;
      if (std::fabs(dot - want) > 1e-4) {
        return absl::InvalidArgumentError(
            absl::StrCat("PCA basis components are not orthonormal (rows ", i, ", ", j,
                         ": dot ", dot, ")"));
      }
    }
  }
  return absl::OkStatus();
}

std::string SerializePcaBases(const std::vector<PcaBasis>& bases) {
  std::string out(kBasisMagic, sizeof(kBasisMagic));
  ByteWriter w(&out);
  w.Put<uint32_t>(kBasisFormatVersion);
  w.Put<uint32_t>(static_cast<uint32_t>(bases.size()));
  for (const PcaBasis& b : bases) {
    w.Put<int32_t>(b.layer);
    w.Put<int32_t>(b.kv_head);
    w.Put<uint32_t>(static_cast<uint32_t>(b.dim));
    w.Put<uint64_t>(static_cast<uint64_t>(b.num_samples));
    w.Put<uint8_t>(b.centered ? 1 : 0);
    w.PutBytes(b.mean.data(), b.mean.size() * sizeof(float));
    w.PutBytes(b.explained_variance.data(), b.explained_variance.size() * sizeof(double));
    w.PutBytes(b.components.data(), b.components.size() * sizeof(float));
  }
  w.Put<uint64_t>(Checksum64(out));
  return out;
}

absl::StatusOr<std::vector<PcaBasis>> ParsePcaBases(absl::string_view bytes) {
  if (bytes.size() < 24 || std::memcmp(bytes.data(), kBasisMagic, 8) != 0) {
    return absl::DataLossError("not a loki_basis artifact (bad magic)");
  }
  ByteReader r(bytes.substr(8, bytes.size() - 16));
  KVR_ASSIGN_OR_RETURN(uint32_t version, r.Get<uint32_t>());
  if (version != kBasisFormatVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("loki_basis format version ", version, " is not supported (this build reads ",
                     kBasisFormatVersion, ")"));
  }
  uint64_t stored_checksum;
  std::memcpy(&stored_checksum, bytes.data() + bytes.size() - 8, 8);
  if (Checksum64(bytes.substr(0, bytes.size() - 8)) != stored_checksum) {
    return absl::DataLossError("loki_basis checksum mismatch");
  }
  KVR_ASSIGN_OR_RETURN(uint32_t count, r.Get<uint32_t>());
  std::vector<PcaBasis> bases;
  for (uint32_t e = 0; e < count; ++e) {
    PcaBasis b;
    KVR_ASSIGN_OR_RETURN(b.layer, r.Get<int32_t>());
    KVR_ASSIGN_OR_RETURN(b.kv_head, r.Get<int32_t>());
    KVR_ASSIGN_OR_RETURN(uint32_t dim, r.Get<uint32_t>());
    KVR_ASSIGN_OR_RETURN(uint64_t samples, r.Get<uint64_t>());
    KVR_ASSIGN_OR_RETURN(uint8_t centered, r.Get<uint8_t>());
    if (dim < 1 || dim > static_cast<uint32_t>(kMaxPcaDim)) {
      return absl::DataLossError(absl::StrCat("loki_basis entry ", e, " has dimension ", dim));
    }
    if (samples > static_cast<uint64_t>(INT64_MAX) || centered > 1) {
      return absl::DataLossError(absl::StrCat("loki_basis entry ", e, " is corrupt"));
    }
    b.dim = static_cast<int32_t>(dim);
    b.num_samples = static_cast<int64_t>(samples);
    b.centered = centered == 1;
    b.mean.resize(dim);
    b.explained_variance.resize(dim);
    b.components.resize(static_cast<size_t>(dim) * dim);
    KVR_RETURN_IF_ERROR(r.GetBytes(b.mean.data(), b.mean.size() * sizeof(float)));
    KVR_RETURN_IF_ERROR(
        r.GetBytes(b.explained_variance.data(), b.explained_variance.size() * sizeof(double)));
    KVR_RETURN_IF_ERROR(r.GetBytes(b.components.data(), b.components.size() * sizeof(float)));
    const absl::Status valid = ValidatePcaBasis(b);
    if (!valid.ok()) {
      return absl::DataLossError(absl::StrCat("loki_basis entry ", e, ": ", valid.message()));
    }
    bases.push_back(std::move(b));
  }
  if (r.remaining() != 0) return absl::DataLossError("loki_basis has trailing bytes");
  return bases;
}

absl::StatusOr<PcaBasis> SelectPcaBasis(const std::vector<PcaBasis>& bases, int32_t layer,
                                        int32_t kv_head) {
  if (bases.empty()) return absl::NotFoundError("loki_basis artifact holds no basis");
  if (layer == -1 && kv_head == -1) {
    if (bases.size() == 1) return bases[0];
    return absl::InvalidArgumentError(
        absl::StrCat("loki_basis artifact holds ", bases.size(),
                     " bases: say which with the build params layer= and kv_head="));
  }
  for (const PcaBasis& b : bases) {
    if (b.layer == layer && b.kv_head == kv_head) return b;
  }
  return absl::NotFoundError(
      absl::StrCat("loki_basis artifact has no basis for layer ", layer, " KV head ", kv_head));
}

}  // namespace kvrecall::index::loki
