#pragma once

// The top-κ sparse encoder of S³-Attention's feature inverted index
// (S³-Attention, arXiv 2601.17702): a sparse autoencoder with F dictionary features of which
// the κ with the largest pre-activation fire for each input,
//   x_n = s·x                         (s = input_scale, fitted so that the
//                                      training data has unit variance per dim)
//   pre = W_enc (x_n − b_dec) + b_enc [F]
//   z   = ReLU(TopK_κ(pre))           (κ non-negative activations)
//   x̂_n = W_decᵀ z + b_dec            (decoder rows are unit vectors, "atoms")
// trained offline on keys (and, optionally, queries) of one (layer, KV head)
// by mini-batch Adam on the reconstruction error, with the auxiliary top-k
// loss of dead features (Gao et al., "Scaling and evaluating sparse
// autoencoders", 2024) to keep features alive. It is its own versioned
// artifact ("sparse_encoder", docs/formats/sparse_encoder.md); the CLI and
// BuildIndex train it with TrainSparseEncoder().

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/progress.h"
#include "index/key_index.h"

namespace kvrecall::index::inverted {

inline constexpr int32_t kMaxEncoderDim = 1024;
inline constexpr int32_t kMaxEncoderFeatures = 1 << 20;
inline constexpr int32_t kMaxEncoderK = 256;

// The parameters of one encoder. Value type; thread-compatible.
struct SparseEncoderWeights {
  int32_t layer = -1;    // model layer it belongs to; -1 when not tied to one
  int32_t kv_head = -1;  // KV head; -1 when not tied to one
  int32_t dim = 0;           // d, [1, kMaxEncoderDim]
  int32_t num_features = 0;  // F, [1, kMaxEncoderFeatures]
  int32_t k = 0;             // κ, active features per input, [1, min(F, kMaxEncoderK)]
  float input_scale = 1.0f;  // s > 0: inputs are multiplied by it first
  std::vector<float> w_enc;  // [F, d] row-major
  std::vector<float> b_enc;  // [F]
  std::vector<float> w_dec;  // [F, d] row-major; rows have unit L2 norm
  std::vector<float> b_dec;  // [d], in scaled input units
  // Training summary (informational).
  int64_t num_samples = 0;  // inputs it was trained on
  double train_fvu = 0;     // fraction of variance unexplained on them
};

struct SparseEncoderTrainOptions;
struct SparseEncoderQuality;

// An immutable encoder. Thread-safe.
class SparseEncoder {
 public:
  // INVALID_ARGUMENT when the weights are malformed: sizes, ranges,
  // non-finite values, or decoder rows whose norm is not 1 (to 1e-3).
  static absl::StatusOr<std::unique_ptr<SparseEncoder>> Create(SparseEncoderWeights weights);

  const SparseEncoderWeights& weights() const { return w_; }
  int32_t dim() const { return w_.dim; }
  int32_t num_features() const { return w_.num_features; }
  int32_t k() const { return w_.k; }

  // Encodes one input: writes its active features (positive activations) in
  // descending activation order and returns how many there are (<= k()).
  //   x:       [dim()] f32, unscaled
  //   ids:     [k()] feature ids
  //   acts:    [k()] activations (> 0), scaled units
  //   scratch: [num_features()] f32 workspace
  int32_t Encode(const float* x, int32_t* ids, float* acts, float* scratch) const;

  // The scaled reconstruction of a code: x̂_n = Σ acts[i] W_dec[ids[i]] + b_dec.
  //   out: [dim()] f32 (divide by input_scale for input units)
  void Decode(const int32_t* ids, const float* acts, int32_t count, float* out) const;

  // w_f = q·W_dec[f] for every feature: the contribution per unit activation
  // of feature f to q·x̂ (up to the positive factor 1/input_scale and the
  // constant q·b_dec). The inverted index ranks a query's features by it.
  //   query: [dim()] f32;  w: [num_features()] f32
  void DecoderProjection(const float* query, float* w) const;

 private:
  friend absl::StatusOr<std::unique_ptr<SparseEncoder>> TrainSparseEncoder(
      const VectorView& data, const SparseEncoderTrainOptions& options,
      SparseEncoderQuality* quality);
  explicit SparseEncoder(SparseEncoderWeights w) : w_(std::move(w)) {}
  SparseEncoderWeights w_;
};

struct SparseEncoderTrainOptions {
  // F; 0 means 8·d. Range [0, kMaxEncoderFeatures].
  int32_t num_features = 0;
  // κ, active features per input; default 8; range [1, min(F, kMaxEncoderK)].
  int32_t k = 8;
  // Passes over the training data; default 10, range [1, 10000].
  int32_t epochs = 10;
  // Inputs per Adam step; default 256, range [1, 65536].
  int32_t batch_size = 256;
  // Adam step size; default 1e-3, range (0, 1].
  double learning_rate = 1e-3;
  // Auxiliary loss: a feature is dead when it has not fired for this many
  // inputs (default 0 = one epoch); dead features reconstruct the residual
  // with their top `aux_k` pre-activations (default 2·κ, 0 disables the
  // loss), weighted by `aux_coefficient` (default 1/32).
  int64_t dead_after = 0;
  int32_t aux_k = -1;  // -1 means 2·κ
  double aux_coefficient = 1.0 / 32;
  // Seeds initialisation and shuffling; equal seeds and inputs give equal
  // weights whatever the thread count.
  uint64_t seed = 1;
  // Threads; 0 = the default pool, 1 = the caller only.
  int num_threads = 0;
  // Progress ("train" per step, then "evaluate"); may be empty; false cancels.
  ProgressCallback progress;
  // Labels stored with the encoder (SparseEncoderWeights::layer, kv_head).
  int32_t layer = -1;
  int32_t kv_head = -1;
};

// Quality of an encoder on some data.
struct SparseEncoderQuality {
  int64_t num_samples = 0;
  double mse = 0;            // mean over inputs and dims of (x_n − x̂_n)², scaled units
  double fvu = 0;            // Σ‖x_n − x̂_n‖² / Σ‖x_n − mean(x_n)‖²
  int32_t dead_features = 0;  // features that fired for none of the inputs
  double mean_active = 0;     // mean number of positive activations per input
  double max_feature_share = 0;  // largest fraction of inputs one feature fires for
};

// Trains an encoder on `data` [n, d] (f16, bf16 or f32; keys, or keys and
// queries stacked). INVALID_ARGUMENT on bad options, n < 2, or non-finite
// data; CANCELLED when progress says so. `quality`, when not null, receives
// the encoder's quality on the training data.
absl::StatusOr<std::unique_ptr<SparseEncoder>> TrainSparseEncoder(
    const VectorView& data, const SparseEncoderTrainOptions& options,
    SparseEncoderQuality* quality = nullptr);

// Measures `encoder` on `data` [n, d]. INVALID_ARGUMENT on a dimension mismatch.
absl::StatusOr<SparseEncoderQuality> EvaluateSparseEncoder(const SparseEncoder& encoder,
                                                           const VectorView& data,
                                                           int num_threads = 0);

// The "sparse_encoder" artifact: one or more encoders (e.g. per (layer, KV
// head)) in the versioned format of docs/formats/sparse_encoder.md.
std::string SerializeSparseEncoders(const std::vector<const SparseEncoder*>& encoders);

// Parses SerializeSparseEncoders() bytes. DATA_LOSS on bad magic,
// truncation, checksum mismatch or malformed weights; FAILED_PRECONDITION on
// an unsupported version.
absl::StatusOr<std::vector<std::unique_ptr<SparseEncoder>>> ParseSparseEncoders(
    absl::string_view bytes);

// The encoder for (layer, kv_head): the only one when layer == kv_head == -1
// and there is exactly one, else the entry with that layer and KV head.
// NOT_FOUND / INVALID_ARGUMENT as SelectPcaBasis (index/loki/pca_basis.h).
absl::StatusOr<std::unique_ptr<SparseEncoder>> SelectSparseEncoder(
    std::vector<std::unique_ptr<SparseEncoder>> encoders, int32_t layer, int32_t kv_head);

namespace internal {

// One mini-batch of the training objective (exposed for gradient tests):
//   L = 1/(d·B) Σ_b ‖x̂_b − x_b‖² + α/(d·B) Σ_b ‖ê_b − (x_b − x̂_b)‖²
// where ê_b is the reconstruction by the top `aux_k` positive pre-activations
// among `dead` features and the residual x_b − x̂_b in the second term is a
// constant (no gradient flows through it). Adds dL/dθ into `grad` (arrays of
// the shapes of `w`) and returns L. `fired_at`, when not null, gets for every
// feature that fired in a main code the largest such b + 1 (others untouched).
// The result does not depend on `num_threads`.
//   inputs: B pointers to [d] f32 scaled inputs (x_n)
//   dead:   [F] non-zero for features that count as dead
double BatchGradient(const SparseEncoderWeights& w, const std::vector<const float*>& inputs,
                     const std::vector<char>& dead, int32_t aux_k, double aux_coefficient,
                     int num_threads, SparseEncoderWeights* grad, std::vector<int64_t>* fired_at);

}  // namespace internal
}  // namespace kvrecall::index::inverted
