#pragma once

// PCA bases of keys for Loki (arXiv 2406.02542): per (layer, KV head), the
// principal axes of the key vectors, fitted offline from calibration keys (or
// from the keys being indexed) and stored as their own versioned artifact
// ("loki_basis", docs/formats/loki_basis.md).
//
// Loki scores keys in the first r principal dimensions: with P the matrix
// whose rows are the axes, q' = P q and k' = P k, and q'[:r]·k'[:r] is a
// rank-r approximation of q·k (exact at r = d because P is orthonormal).

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/progress.h"
#include "index/key_index.h"

namespace kvrecall::index::loki {

// The principal axes of one set of keys. Value type; thread-compatible.
struct PcaBasis {
  int32_t layer = -1;    // model layer the basis belongs to; -1 when not tied to one
  int32_t kv_head = -1;  // KV head within the layer; -1 when not tied to one
  int32_t dim = 0;       // d, the key dimension; [1, kMaxPcaDim]
  int64_t num_samples = 0;  // keys the basis was fitted on
  bool centered = true;     // axes of the covariance (true) or of the raw second moment (false)
  // [dim, dim] row-major: row i is the i-th principal axis (unit norm), rows
  // orthonormal, ordered by descending explained variance.
  std::vector<float> components;
  std::vector<float> mean;                 // [dim] mean key (zeros when !centered)
  std::vector<double> explained_variance;  // [dim] variance along each axis, descending, >= 0

  // Fraction of the total variance held by the first r axes (1 when the
  // total is 0). REQUIRES: 0 <= r <= dim.
  double ExplainedVarianceRatio(int32_t r) const;
  // The smallest r whose ExplainedVarianceRatio(r) >= fraction (at least 1).
  int32_t RankForVarianceRatio(double fraction) const;
};

// Largest key dimension a basis may have (the Jacobi eigensolver is O(d^3)
// per sweep).
inline constexpr int32_t kMaxPcaDim = 512;

struct PcaFitOptions {
  // Subtract the mean before forming the covariance, as sklearn's PCA does
  // (default true). Either way Loki applies the basis as a pure rotation: the
  // mean shifts every approximate score of a query by the same amount, so the
  // ranking does not depend on it.
  bool center = true;
  // Threads for the covariance; 0 = the default pool, 1 = the caller only.
  int num_threads = 0;
  // Progress ("covariance", then "eigen"); may be empty; false cancels.
  ProgressCallback progress;
};

// Fits the basis of `keys` [n, d] (f16, bf16 or f32; any stride) in double
// precision: covariance, then a cyclic Jacobi eigendecomposition.
// INVALID_ARGUMENT when n < 1, d outside [1, kMaxPcaDim] or a key is not
// finite; CANCELLED when progress says so; INTERNAL if Jacobi does not
// converge. `layer`/`kv_head` of the result are -1 (set them to label it).
absl::StatusOr<PcaBasis> FitPcaBasis(const VectorView& keys, const PcaFitOptions& options);

// Eigendecomposition of the symmetric matrix `a` [n, n] (row-major, double;
// only symmetric input is meaningful) by cyclic Jacobi rotations.
// On success `eigenvalues` [n] is in descending order and `eigenvectors`
// [n, n] holds the matching unit eigenvectors as ROWS. INTERNAL when the
// off-diagonal mass does not vanish within `max_sweeps`.
absl::Status SymmetricEigen(const std::vector<double>& a, int32_t n,
                            std::vector<double>* eigenvalues,
                            std::vector<double>* eigenvectors, int max_sweeps = 100);

// OK when `basis` is well formed: dim in range, vector sizes match, values
// finite, variances >= 0 and descending (within rounding), components
// orthonormal to 1e-4. INVALID_ARGUMENT naming the problem otherwise.
absl::Status ValidatePcaBasis(const PcaBasis& basis);

// The "loki_basis" artifact: one or more bases (e.g. every (layer, KV head)
// of a model) in the versioned format of docs/formats/loki_basis.md.
// REQUIRES: every basis passes ValidatePcaBasis.
std::string SerializePcaBases(const std::vector<PcaBasis>& bases);

// Parses SerializePcaBases() bytes. DATA_LOSS on a bad magic, truncation,
// checksum mismatch or an entry that fails ValidatePcaBasis;
// FAILED_PRECONDITION on an unsupported format version.
absl::StatusOr<std::vector<PcaBasis>> ParsePcaBases(absl::string_view bytes);

// The basis for (layer, kv_head) among `bases`: the only one when there is
// exactly one and layer == kv_head == -1 (no selection asked), otherwise the
// entry with that layer and KV head. NOT_FOUND when none matches,
// INVALID_ARGUMENT when several bases exist and no selection was given.
absl::StatusOr<PcaBasis> SelectPcaBasis(const std::vector<PcaBasis>& bases, int32_t layer,
                                        int32_t kv_head);

}  // namespace kvrecall::index::loki
