#include "index/inverted/sparse_encoder.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/checksum.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/distance.h"
#include "index/search_input.h"
#include "index/index_format.h"

namespace kvrecall::index::inverted {
namespace {

constexpr char kEncoderMagic[8] = {'K', 'V', 'R', 'S', 'P', 'E', 'N', 'C'};
constexpr uint32_t kEncoderFormatVersion = 1;

// Keeps the `k` largest (value, id) pairs of a stream; ties keep the smaller
// id. `k` is small (<= kMaxEncoderK), so a sorted insertion array is enough.
class SmallTopK {
 public:
  explicit SmallTopK(int32_t k) : k_(k) {
    values_.reserve(static_cast<size_t>(k) + 1);
    ids_.reserve(static_cast<size_t>(k) + 1);
  }
  void Reset() {
    values_.clear();
    ids_.clear();
  }
  float threshold() const {
    return static_cast<int32_t>(values_.size()) < k_ ? -INFINITY : values_.back();
  }
  void Push(float v, int32_t id) {
    if (static_cast<int32_t>(values_.size()) == k_ && !(v > values_.back())) return;
    size_t at = values_.size();
    while (at > 0 && values_[at - 1] < v) --at;
    values_.insert(values_.begin() + static_cast<std::ptrdiff_t>(at), v);
    ids_.insert(ids_.begin() + static_cast<std::ptrdiff_t>(at), id);
    if (static_cast<int32_t>(values_.size()) > k_) {
      values_.pop_back();
      ids_.pop_back();
    }
  }
  const std::vector<float>& values() const { return values_; }
  const std::vector<int32_t>& ids() const { return ids_; }

 private:
  int32_t k_;
  std::vector<float> values_;  // descending
  std::vector<int32_t> ids_;
};

// pre[f] = W_enc[f]·xc + b_enc[f] for every feature.
void PreActivations(const SparseEncoderWeights& w, const float* xc, float* pre) {
  const int32_t d = w.dim;
  for (int32_t f = 0; f < w.num_features; ++f) {
    pre[f] = DotF32(w.w_enc.data() + static_cast<size_t>(f) * d, xc, d) + w.b_enc[static_cast<size_t>(f)];
  }
}

absl::Status ValidateWeights(const SparseEncoderWeights& w) {
  if (w.dim < 1 || w.dim > kMaxEncoderDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparse encoder dimension ", w.dim, " is outside [1, ", kMaxEncoderDim, "]"));
  }
  if (w.num_features < 1 || w.num_features > kMaxEncoderFeatures) {
    return absl::InvalidArgumentError(absl::StrCat("sparse encoder feature count ",
                                                   w.num_features, " is out of range"));
  }
  if (w.k < 1 || w.k > std::min(w.num_features, kMaxEncoderK)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparse encoder k = ", w.k, " is outside [1, min(F, ", kMaxEncoderK, ")]"));
  }
  if (!(w.input_scale > 0) || !std::isfinite(w.input_scale)) {
    return absl::InvalidArgumentError("sparse encoder input scale must be positive and finite");
  }
  const size_t fd = static_cast<size_t>(w.num_features) * w.dim;
  if (w.w_enc.size() != fd || w.w_dec.size() != fd ||
      w.b_enc.size() != static_cast<size_t>(w.num_features) ||
      w.b_dec.size() != static_cast<size_t>(w.dim)) {
    return absl::InvalidArgumentError("sparse encoder arrays do not match its shape");
  }
  for (const std::vector<float>* v : {&w.w_enc, &w.b_enc, &w.w_dec, &w.b_dec}) {
    for (float x : *v) {
      if (!std::isfinite(x)) return absl::InvalidArgumentError("sparse encoder weights are not finite");
    }
  }
  for (int32_t f = 0; f < w.num_features; ++f) {
    const float* row = w.w_dec.data() + static_cast<size_t>(f) * w.dim;
    const double norm = std::sqrt(static_cast<double>(DotF32(row, row, w.dim)));
    if (std::fabs(norm - 1.0) > 1e-3) {
      return absl::InvalidArgumentError(
          absl::StrCat("sparse encoder decoder row ", f, " has norm ", norm, ", not 1"));
    }
  }
  return absl::OkStatus();
}

void NormalizeRow(float* row, int32_t d) {
  double norm = 0;
  for (int32_t j = 0; j < d; ++j) norm += static_cast<double>(row[j]) * row[j];
  norm = std::sqrt(norm);
  if (norm < 1e-12) {
    row[0] = 1.0f;
    for (int32_t j = 1; j < d; ++j) row[j] = 0.0f;
    return;
  }
  for (int32_t j = 0; j < d; ++j) row[j] = static_cast<float>(row[j] / norm);
}

// Adam state of one parameter array.
struct AdamSlot {
  std::vector<float>* param;
  std::vector<float>* grad;
  std::vector<float> m, v;
};

// What one training input contributes to the gradient (computed in
// parallel, summed serially in input order so results do not depend on the
// thread count).
struct SampleGrad {
  std::vector<float> xc;     // [d] x_n − b_dec
  std::vector<float> g;      // [d] dLoss/dx̂ of the main loss
  std::vector<float> g_aux;  // [d] dLoss/dê of the auxiliary loss
  std::vector<int32_t> ids;  // active features (main then aux)
  std::vector<float> acts;   // their activations
  std::vector<float> delta;  // dLoss/dpre of each
  int32_t num_main = 0;      // ids[0, num_main) are main, the rest aux
  double loss = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<SparseEncoder>> SparseEncoder::Create(SparseEncoderWeights weights) {
  KVR_RETURN_IF_ERROR(ValidateWeights(weights));
  return std::unique_ptr<SparseEncoder>(new SparseEncoder(std::move(weights)));
}

int32_t SparseEncoder::Encode(const float* x, int32_t* ids, float* acts, float* scratch) const {
  const int32_t d = w_.dim;
  // xc is kept on the stack for the usual head dims.
  float local[256];
  std::vector<float> heap;
  float* xc = local;
  if (d > 256) {
    heap.resize(static_cast<size_t>(d));
    xc = heap.data();
  }
  for (int32_t j = 0; j < d; ++j) xc[j] = w_.input_scale * x[j] - w_.b_dec[static_cast<size_t>(j)];
  PreActivations(w_, xc, scratch);
  SmallTopK top(w_.k);
  for (int32_t f = 0; f < w_.num_features; ++f) {
    if (scratch[f] > top.threshold()) top.Push(scratch[f], f);
  }
  int32_t count = 0;
  for (size_t i = 0; i < top.values().size(); ++i) {
    if (top.values()[i] <= 0) break;
    ids[count] = top.ids()[i];
    acts[count] = top.values()[i];
    ++count;
  }
  return count;
}

void SparseEncoder::Decode(const int32_t* ids, const float* acts, int32_t count, float* out) const {
  const int32_t d = w_.dim;
  for (int32_t j = 0; j < d; ++j) out[j] = w_.b_dec[static_cast<size_t>(j)];
  for (int32_t i = 0; i < count; ++i) {
    const float* row = w_.w_dec.data() + static_cast<size_t>(ids[i]) * d;
    for (int32_t j = 0; j < d; ++j) out[j] += acts[i] * row[j];
  }
}

void SparseEncoder::DecoderProjection(const float* query, float* w) const {
  ScoreRows(query, w_.w_dec.data(), DType::kF32, w_.num_features, w_.dim, w_.dim, w);
}

absl::StatusOr<SparseEncoderQuality> EvaluateSparseEncoder(const SparseEncoder& encoder,
                                                           const VectorView& data,
                                                           int num_threads) {
  KVR_RETURN_IF_ERROR(ValidateVectors("sparse encoder inputs", data, encoder.dim()));
  const int32_t d = encoder.dim();
  const int32_t F = encoder.num_features();
  const int64_t n = data.rows;
  SparseEncoderQuality q;
  q.num_samples = n;
  if (n == 0) return q;
  const int64_t grain = 256;
  const int64_t chunks = (n + grain - 1) / grain;
  // Per chunk: squared error, active count, feature fire counts, sums for the mean.
  std::vector<double> err(static_cast<size_t>(chunks), 0), active(static_cast<size_t>(chunks), 0);
  std::vector<std::vector<int64_t>> fired(static_cast<size_t>(chunks));
  std::vector<std::vector<double>> sum(static_cast<size_t>(chunks)), sumsq(static_cast<size_t>(chunks));
  const float s = encoder.weights().input_scale;
  ThreadPool::Default()->ParallelFor(
      n, grain,
      [&](int64_t begin, int64_t end) {
        const size_t c = static_cast<size_t>(begin / grain);
        fired[c].assign(static_cast<size_t>(F), 0);
        sum[c].assign(static_cast<size_t>(d), 0);
        sumsq[c].assign(static_cast<size_t>(d), 0);
        std::vector<float> x(static_cast<size_t>(d)), xh(static_cast<size_t>(d)),
            scratch(static_cast<size_t>(F)), acts(static_cast<size_t>(encoder.k()));
        std::vector<int32_t> ids(static_cast<size_t>(encoder.k()));
        for (int64_t i = begin; i < end; ++i) {
          ConvertToFloat(data.row(i), data.dtype, x.size(), x.data());
          const int32_t count = encoder.Encode(x.data(), ids.data(), acts.data(), scratch.data());
          encoder.Decode(ids.data(), acts.data(), count, xh.data());
          for (int32_t j = 0; j < d; ++j) {
            const double xn = static_cast<double>(s) * x[static_cast<size_t>(j)];
            const double e = xn - xh[static_cast<size_t>(j)];
            err[c] += e * e;
            sum[c][static_cast<size_t>(j)] += xn;
            sumsq[c][static_cast<size_t>(j)] += xn * xn;
          }
          active[c] += count;
          for (int32_t t = 0; t < count; ++t) ++fired[c][static_cast<size_t>(ids[static_cast<size_t>(t)])];
        }
      },
      ResolveThreads(num_threads));
  double total_err = 0, total_active = 0;
  std::vector<int64_t> fires(static_cast<size_t>(F), 0);
  std::vector<double> mean(static_cast<size_t>(d), 0), meansq(static_cast<size_t>(d), 0);
  for (int64_t c = 0; c < chunks; ++c) {
    total_err += err[static_cast<size_t>(c)];
    total_active += active[static_cast<size_t>(c)];
    for (int32_t f = 0; f < F; ++f) fires[static_cast<size_t>(f)] += fired[static_cast<size_t>(c)][static_cast<size_t>(f)];
    for (int32_t j = 0; j < d; ++j) {
      mean[static_cast<size_t>(j)] += sum[static_cast<size_t>(c)][static_cast<size_t>(j)];
      meansq[static_cast<size_t>(j)] += sumsq[static_cast<size_t>(c)][static_cast<size_t>(j)];
    }
  }
  double total_var = 0;
  for (int32_t j = 0; j < d; ++j) {
    const double m = mean[static_cast<size_t>(j)] / n;
    total_var += meansq[static_cast<size_t>(j)] - n * m * m;
  }
  q.mse = total_err / (static_cast<double>(n) * d);
  q.fvu = total_var > 0 ? total_err / total_var : 0.0;
  q.mean_active = total_active / n;
  int64_t most = 0;
  for (int64_t f : fires) {
    if (f == 0) ++q.dead_features;
    most = std::max(most, f);
  }
  q.max_feature_share = static_cast<double>(most) / n;
  return q;
}

namespace internal {
namespace {

// Scratch of one thread's SampleGradient calls.
struct GradScratch {
  GradScratch(int32_t d, int32_t F, int32_t k, int32_t aux_k)
      : pre(static_cast<size_t>(F)),
        top(k),
        aux_top(std::max(aux_k, 1)),
        xh(static_cast<size_t>(d)),
        eh(static_cast<size_t>(d)) {}
  std::vector<float> pre;  // [F] pre-activations
  SmallTopK top, aux_top;
  std::vector<float> xh;  // [d] the reconstruction x̂_n
  std::vector<float> eh;  // [d] the dead features' reconstruction of the residual
};

// The main loss of input `xn` (scaled by `inv`): its top-k features
// reconstruct it. Fills sg's xc, g, the main ids, acts and deltas, and loss.
void MainGradient(const SparseEncoderWeights& w, const float* xn, double inv, GradScratch* s,
                  SampleGrad* sg) {
  const int32_t d = w.dim;
  const int32_t F = w.num_features;
  sg->xc.resize(static_cast<size_t>(d));
  sg->g.assign(static_cast<size_t>(d), 0.0f);
  sg->g_aux.assign(static_cast<size_t>(d), 0.0f);
  for (int32_t j = 0; j < d; ++j) sg->xc[static_cast<size_t>(j)] = xn[j] - w.b_dec[static_cast<size_t>(j)];
  PreActivations(w, sg->xc.data(), s->pre.data());
  s->top.Reset();
  for (int32_t f = 0; f < F; ++f) {
    if (s->pre[static_cast<size_t>(f)] > s->top.threshold()) s->top.Push(s->pre[static_cast<size_t>(f)], f);
  }
  for (int32_t j = 0; j < d; ++j) s->xh[static_cast<size_t>(j)] = w.b_dec[static_cast<size_t>(j)];
  for (size_t i = 0; i < s->top.values().size(); ++i) {
    const float a = s->top.values()[i];
    if (a <= 0) break;
    const int32_t f = s->top.ids()[i];
    sg->ids.push_back(f);
    sg->acts.push_back(a);
    const float* row = w.w_dec.data() + static_cast<size_t>(f) * d;
    for (int32_t j = 0; j < d; ++j) s->xh[static_cast<size_t>(j)] += a * row[j];
  }
  sg->num_main = static_cast<int32_t>(sg->ids.size());
  double loss = 0;
  for (int32_t j = 0; j < d; ++j) {
    const double e = static_cast<double>(s->xh[static_cast<size_t>(j)]) - xn[j];
    loss += e * e;
    sg->g[static_cast<size_t>(j)] = static_cast<float>(2.0 * e * inv);
  }
  sg->loss = loss * inv;
  for (int32_t i = 0; i < sg->num_main; ++i) {
    const float* row = w.w_dec.data() + static_cast<size_t>(sg->ids[static_cast<size_t>(i)]) * d;
    sg->delta.push_back(DotF32(row, sg->g.data(), d));
  }
}

// The auxiliary loss (after MainGradient, from its scratch): the top aux_k
// dead features reconstruct the residual x_n − x̂_n (a constant here). Adds
// their ids, acts and deltas after the main ones, and their loss.
void AuxGradient(const SparseEncoderWeights& w, const float* xn, const std::vector<char>& dead,
                 double aux_coefficient, double inv, GradScratch* s, SampleGrad* sg) {
  const int32_t d = w.dim;
  const int32_t F = w.num_features;
  s->aux_top.Reset();
  for (int32_t f = 0; f < F; ++f) {
    const float p = s->pre[static_cast<size_t>(f)];
    if (dead[static_cast<size_t>(f)] && p > 0 && p > s->aux_top.threshold()) s->aux_top.Push(p, f);
  }
  if (s->aux_top.values().empty()) return;
  std::fill(s->eh.begin(), s->eh.end(), 0.0f);
  for (size_t i = 0; i < s->aux_top.values().size(); ++i) {
    const float* row = w.w_dec.data() + static_cast<size_t>(s->aux_top.ids()[i]) * d;
    for (int32_t j = 0; j < d; ++j) s->eh[static_cast<size_t>(j)] += s->aux_top.values()[i] * row[j];
  }
  double aux_loss = 0;
  for (int32_t j = 0; j < d; ++j) {
    const double residual = static_cast<double>(xn[j]) - s->xh[static_cast<size_t>(j)];
    const double e = s->eh[static_cast<size_t>(j)] - residual;
    aux_loss += e * e;
    sg->g_aux[static_cast<size_t>(j)] = static_cast<float>(2.0 * aux_coefficient * e * inv);
  }
  sg->loss += aux_coefficient * aux_loss * inv;
  for (size_t i = 0; i < s->aux_top.values().size(); ++i) {
    const int32_t f = s->aux_top.ids()[i];
    sg->ids.push_back(f);
    sg->acts.push_back(s->aux_top.values()[i]);
    sg->delta.push_back(DotF32(w.w_dec.data() + static_cast<size_t>(f) * d, sg->g_aux.data(), d));
  }
}

// Sums the per-input gradients into `grad` in input order; returns the loss.
// fired_at[f] becomes 1 + the last input where f was a main feature.
double SumGradients(const SparseEncoderWeights& w, const std::vector<SampleGrad>& grads,
                    SparseEncoderWeights* grad, std::vector<int64_t>* fired_at) {
  const int32_t d = w.dim;
  float* g_wenc = grad->w_enc.data();
  float* g_benc = grad->b_enc.data();
  float* g_wdec = grad->w_dec.data();
  float* g_bdec = grad->b_dec.data();
  double loss = 0;
  for (size_t b = 0; b < grads.size(); ++b) {
    const SampleGrad& sg = grads[b];
    loss += sg.loss;
    for (int32_t j = 0; j < d; ++j) g_bdec[j] += sg.g[static_cast<size_t>(j)];
    for (size_t i = 0; i < sg.ids.size(); ++i) {
      const int32_t f = sg.ids[i];
      const float a = sg.acts[i];
      const float delta = sg.delta[i];
      const float* g = static_cast<int32_t>(i) < sg.num_main ? sg.g.data() : sg.g_aux.data();
      float* gwd = g_wdec + static_cast<size_t>(f) * d;
      float* gwe = g_wenc + static_cast<size_t>(f) * d;
      const float* we = w.w_enc.data() + static_cast<size_t>(f) * d;
      for (int32_t j = 0; j < d; ++j) {
        gwd[j] += a * g[j];
        gwe[j] += delta * sg.xc[static_cast<size_t>(j)];
        g_bdec[j] -= delta * we[j];  // through xc = x_n − b_dec
      }
      g_benc[f] += delta;
    }
    if (fired_at != nullptr) {
      for (int32_t i = 0; i < sg.num_main; ++i) {
        (*fired_at)[static_cast<size_t>(sg.ids[static_cast<size_t>(i)])] = static_cast<int64_t>(b) + 1;
      }
    }
  }
  return loss;
}

}  // namespace

double BatchGradient(const SparseEncoderWeights& w, const std::vector<const float*>& inputs,
                     const std::vector<char>& dead, int32_t aux_k, double aux_coefficient,
                     int num_threads, SparseEncoderWeights* grad, std::vector<int64_t>* fired_at) {
  const int64_t bsize = static_cast<int64_t>(inputs.size());
  if (bsize == 0) return 0;
  bool any_dead = false;
  for (char c : dead) any_dead |= c != 0;
  const bool use_aux = any_dead && aux_k > 0 && aux_coefficient > 0;
  const double inv = 1.0 / (static_cast<double>(w.dim) * bsize);
  // A fixed split of the batch into parts keeps the result independent of
  // the number of threads.
  constexpr int64_t kParts = 16;
  const int64_t part_size = (bsize + kParts - 1) / kParts;
  std::vector<SampleGrad> grads(static_cast<size_t>(bsize));
  ThreadPool::Default()->ParallelFor(
      kParts, 1,
      [&](int64_t pb, int64_t pe) {
        GradScratch scratch(w.dim, w.num_features, w.k, aux_k);
        for (int64_t part = pb; part < pe; ++part) {
          for (int64_t b = part * part_size; b < std::min(bsize, (part + 1) * part_size); ++b) {
            SampleGrad& sg = grads[static_cast<size_t>(b)];
            const float* xn = inputs[static_cast<size_t>(b)];
            MainGradient(w, xn, inv, &scratch, &sg);
            if (use_aux) AuxGradient(w, xn, dead, aux_coefficient, inv, &scratch, &sg);
          }
        }
      },
      ResolveThreads(num_threads));
  return SumGradients(w, grads, grad, fired_at);
}

}  // namespace internal

namespace {

// The resolved sizes of a training run.
struct TrainPlan {
  int32_t num_features = 0;
  int32_t k = 0;
  int32_t aux_k = 0;
  int64_t dead_after = 0;  // inputs without firing after which a feature is dead
};

absl::StatusOr<TrainPlan> PlanTraining(const VectorView& data,
                                       const SparseEncoderTrainOptions& options) {
  KVR_RETURN_IF_ERROR(ValidateVectors("sparse encoder training data", data, -1));
  const int32_t d = data.dim;
  const int64_t n = data.rows;
  if (d > kMaxEncoderDim) {
    return absl::InvalidArgumentError(absl::StrCat("sparse encoder: dimension ", d, " is above ",
                                                   kMaxEncoderDim));
  }
  if (n < 2) return absl::InvalidArgumentError("sparse encoder: needs at least 2 training inputs");
  const int32_t F = options.num_features == 0 ? 8 * d : options.num_features;
  if (F < 1 || F > kMaxEncoderFeatures) {
    return absl::InvalidArgumentError(absl::StrCat("sparse encoder: features ", F, " out of range"));
  }
  const int32_t k = options.k;
  if (k < 1 || k > std::min(F, kMaxEncoderK)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparse encoder: k = ", k, " is outside [1, min(F, ", kMaxEncoderK, ")]"));
  }
  if (options.epochs < 1 || options.epochs > 10000 || options.batch_size < 1 ||
      options.batch_size > 65536 || !(options.learning_rate > 0) || options.learning_rate > 1 ||
      options.dead_after < 0 || options.aux_k < -1 || options.aux_coefficient < 0) {
    return absl::InvalidArgumentError("sparse encoder: training options out of range");
  }
  TrainPlan plan;
  plan.num_features = F;
  plan.k = k;
  plan.aux_k = std::min(F, options.aux_k == -1 ? 2 * k : options.aux_k);
  plan.dead_after = options.dead_after == 0 ? n : options.dead_after;
  return plan;
}

// The inputs as f32, scaled to unit variance per dimension: [n, d] in `x`,
// their mean (before scaling) in `mean`; returns the scale.
absl::StatusOr<float> StandardizedInputs(const VectorView& data, std::vector<float>* x,
                                         std::vector<double>* mean) {
  const int32_t d = data.dim;
  const int64_t n = data.rows;
  *x = VectorsToF32(data);
  mean->assign(static_cast<size_t>(d), 0);
  for (int64_t i = 0; i < n; ++i) {
    for (int32_t j = 0; j < d; ++j) {
      const float v = (*x)[static_cast<size_t>(i * d + j)];
      if (!std::isfinite(v)) return absl::InvalidArgumentError("sparse encoder: inputs contain NaN or Inf");
      (*mean)[static_cast<size_t>(j)] += v;
    }
  }
  for (double& m : *mean) m /= n;
  double var = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int32_t j = 0; j < d; ++j) {
      const double e = (*x)[static_cast<size_t>(i * d + j)] - (*mean)[static_cast<size_t>(j)];
      var += e * e;
    }
  }
  var /= static_cast<double>(n) * d;
  const float scale = var > 0 ? static_cast<float>(1.0 / std::sqrt(var)) : 1.0f;
  for (float& v : *x) v *= scale;
  return scale;
}

// Unit-norm random decoder rows, the encoder tied to them, zero encoder
// biases and the decoder bias at the (scaled) input mean.
SparseEncoderWeights InitialWeights(const TrainPlan& plan, const VectorView& data,
                                    const std::vector<double>& mean, float scale,
                                    const SparseEncoderTrainOptions& options,
                                    std::mt19937_64& rng) {
  const int32_t d = data.dim;
  const int32_t F = plan.num_features;
  SparseEncoderWeights w;
  w.dim = d;
  w.num_features = F;
  w.k = plan.k;
  w.input_scale = scale;
  w.num_samples = data.rows;
  w.layer = options.layer;
  w.kv_head = options.kv_head;
  std::normal_distribution<float> gauss;
  w.w_dec.resize(static_cast<size_t>(F) * d);
  for (float& v : w.w_dec) v = gauss(rng);
  for (int32_t f = 0; f < F; ++f) NormalizeRow(w.w_dec.data() + static_cast<size_t>(f) * d, d);
  w.w_enc = w.w_dec;
  w.b_enc.assign(static_cast<size_t>(F), 0.0f);
  w.b_dec.resize(static_cast<size_t>(d));
  for (int32_t j = 0; j < d; ++j) w.b_dec[static_cast<size_t>(j)] = static_cast<float>(mean[static_cast<size_t>(j)] * scale);
  return w;
}

// Adam over the four arrays of a SparseEncoderWeights, with their gradient
// in a second one of the same shapes. Both must outlive it, unmoved.
class Adam {
 public:
  Adam(SparseEncoderWeights* w, SparseEncoderWeights* grad) {
    slots_[0] = {&w->w_enc, &grad->w_enc, {}, {}};
    slots_[1] = {&w->b_enc, &grad->b_enc, {}, {}};
    slots_[2] = {&w->w_dec, &grad->w_dec, {}, {}};
    slots_[3] = {&w->b_dec, &grad->b_dec, {}, {}};
    for (AdamSlot& s : slots_) {
      s.grad->assign(s.param->size(), 0.0f);
      s.m.assign(s.param->size(), 0.0f);
      s.v.assign(s.param->size(), 0.0f);
    }
  }

  void ZeroGradient() {
    for (AdamSlot& s : slots_) std::fill(s.grad->begin(), s.grad->end(), 0.0f);
  }

  // One step, element-wise (parallel over chunks of each array).
  void Step(double learning_rate, int parallelism) {
    ++step_;
    const double c1 = 1.0 - std::pow(kB1, static_cast<double>(step_));
    const double c2 = 1.0 - std::pow(kB2, static_cast<double>(step_));
    const float lr = static_cast<float>(learning_rate * std::sqrt(c2) / c1);
    for (AdamSlot& s : slots_) {
      const int64_t size = static_cast<int64_t>(s.param->size());
      ThreadPool::Default()->ParallelFor(
          size, 16384,
          [&](int64_t begin, int64_t end) {
            float* p = s.param->data();
            for (int64_t i = begin; i < end; ++i) {
              const float g = (*s.grad)[static_cast<size_t>(i)];
              float& m = s.m[static_cast<size_t>(i)];
              float& v = s.v[static_cast<size_t>(i)];
              m = static_cast<float>(kB1) * m + static_cast<float>(1 - kB1) * g;
              v = static_cast<float>(kB2) * v + static_cast<float>(1 - kB2) * g * g;
              p[i] -= lr * m / (std::sqrt(v) + static_cast<float>(kEps));
            }
          },
          parallelism);
    }
  }

 private:
  static constexpr double kB1 = 0.9, kB2 = 0.999, kEps = 1e-8;
  AdamSlot slots_[4];
  int64_t step_ = 0;
};

// Which features count as dead after `seen` inputs.
std::vector<char> DeadFeatures(const std::vector<int64_t>& last_fired, int64_t seen,
                               int64_t dead_after) {
  std::vector<char> dead(last_fired.size(), 0);
  for (size_t f = 0; f < last_fired.size(); ++f) dead[f] = seen - last_fired[f] > dead_after;
  return dead;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SparseEncoder>> TrainSparseEncoder(
    const VectorView& data, const SparseEncoderTrainOptions& options,
    SparseEncoderQuality* quality) {
  KVR_ASSIGN_OR_RETURN(const TrainPlan plan, PlanTraining(data, options));
  const int32_t d = data.dim;
  const int32_t F = plan.num_features;
  const int64_t n = data.rows;
  std::vector<float> x;
  std::vector<double> mean;
  KVR_ASSIGN_OR_RETURN(const float scale, StandardizedInputs(data, &x, &mean));
  std::mt19937_64 rng(options.seed);
  SparseEncoderWeights w = InitialWeights(plan, data, mean, scale, options, rng);
  SparseEncoderWeights grad;  // the gradient, same shapes as w
  Adam adam(&w, &grad);
  std::vector<int64_t> fired_at(static_cast<size_t>(F), 0);
  std::vector<int64_t> last_fired(static_cast<size_t>(F), 0);
  int64_t seen = 0;  // inputs processed so far

  const int64_t batch = std::min<int64_t>(options.batch_size, n);
  const int64_t total_steps = (n + batch - 1) / batch * options.epochs;
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  int64_t step = 0;
  const int parallelism = ResolveThreads(options.num_threads);
  for (int32_t epoch = 0; epoch < options.epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int64_t start = 0; start < n; start += batch) {
      const int64_t bsize = std::min(batch, n - start);
      const std::vector<char> dead = DeadFeatures(last_fired, seen, plan.dead_after);
      std::vector<const float*> inputs(static_cast<size_t>(bsize));
      for (int64_t b = 0; b < bsize; ++b) {
        inputs[static_cast<size_t>(b)] = x.data() + order[static_cast<size_t>(start + b)] * d;
      }
      adam.ZeroGradient();
      std::fill(fired_at.begin(), fired_at.end(), 0);
      internal::BatchGradient(w, inputs, dead, plan.aux_k, options.aux_coefficient,
                              options.num_threads, &grad, &fired_at);
      for (int32_t f = 0; f < F; ++f) {
        if (fired_at[static_cast<size_t>(f)] > 0) {
          last_fired[static_cast<size_t>(f)] = seen + fired_at[static_cast<size_t>(f)];
        }
      }
      seen += bsize;
      adam.Step(options.learning_rate, parallelism);
      ThreadPool::Default()->ParallelFor(
          F, 256,
          [&](int64_t begin, int64_t end) {
            for (int64_t f = begin; f < end; ++f) NormalizeRow(w.w_dec.data() + f * d, d);
          },
          parallelism);
      ++step;
      if (options.progress &&
          !options.progress(Progress{"train", step, total_steps,
                                     0.95 * static_cast<double>(step) / total_steps})) {
        return absl::CancelledError("sparse encoder training cancelled");
      }
    }
  }

  KVR_ASSIGN_OR_RETURN(std::unique_ptr<SparseEncoder> encoder, SparseEncoder::Create(std::move(w)));
  KVR_ASSIGN_OR_RETURN(SparseEncoderQuality q,
                       EvaluateSparseEncoder(*encoder, data, options.num_threads));
  encoder->w_.train_fvu = q.fvu;
  if (quality != nullptr) *quality = q;
  if (options.progress && !options.progress(Progress{"evaluate", 1, 1, 1.0})) {
    return absl::CancelledError("sparse encoder training cancelled");
  }
  return encoder;
}

std::string SerializeSparseEncoders(const std::vector<const SparseEncoder*>& encoders) {
  std::string out(kEncoderMagic, sizeof(kEncoderMagic));
  ByteWriter w(&out);
  w.Put<uint32_t>(kEncoderFormatVersion);
  w.Put<uint32_t>(static_cast<uint32_t>(encoders.size()));
  for (const SparseEncoder* e : encoders) {
    const SparseEncoderWeights& p = e->weights();
    w.Put<int32_t>(p.layer);
    w.Put<int32_t>(p.kv_head);
    w.Put<uint32_t>(static_cast<uint32_t>(p.dim));
    w.Put<uint32_t>(static_cast<uint32_t>(p.num_features));
    w.Put<uint32_t>(static_cast<uint32_t>(p.k));
    w.Put<float>(p.input_scale);
    w.Put<uint64_t>(static_cast<uint64_t>(p.num_samples));
    w.Put<double>(p.train_fvu);
    w.PutBytes(p.w_enc.data(), p.w_enc.size() * sizeof(float));
    w.PutBytes(p.b_enc.data(), p.b_enc.size() * sizeof(float));
    w.PutBytes(p.w_dec.data(), p.w_dec.size() * sizeof(float));
    w.PutBytes(p.b_dec.data(), p.b_dec.size() * sizeof(float));
  }
  w.Put<uint64_t>(Checksum64(out));
  return out;
}

absl::StatusOr<std::vector<std::unique_ptr<SparseEncoder>>> ParseSparseEncoders(
    absl::string_view bytes) {
  if (bytes.size() < 24 || std::memcmp(bytes.data(), kEncoderMagic, 8) != 0) {
    return absl::DataLossError("not a sparse_encoder artifact (bad magic)");
  }
  ByteReader r(bytes.substr(8, bytes.size() - 16));
  KVR_ASSIGN_OR_RETURN(uint32_t version, r.Get<uint32_t>());
  if (version != kEncoderFormatVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("sparse_encoder format version ", version,
                     " is not supported (this build reads ", kEncoderFormatVersion, ")"));
  }
  uint64_t stored;
  std::memcpy(&stored, bytes.data() + bytes.size() - 8, 8);
  if (Checksum64(bytes.substr(0, bytes.size() - 8)) != stored) {
    return absl::DataLossError("sparse_encoder checksum mismatch");
  }
  KVR_ASSIGN_OR_RETURN(uint32_t count, r.Get<uint32_t>());
  std::vector<std::unique_ptr<SparseEncoder>> out;
  for (uint32_t e = 0; e < count; ++e) {
    SparseEncoderWeights p;
    KVR_ASSIGN_OR_RETURN(p.layer, r.Get<int32_t>());
    KVR_ASSIGN_OR_RETURN(p.kv_head, r.Get<int32_t>());
    KVR_ASSIGN_OR_RETURN(uint32_t dim, r.Get<uint32_t>());
    KVR_ASSIGN_OR_RETURN(uint32_t features, r.Get<uint32_t>());
    KVR_ASSIGN_OR_RETURN(uint32_t k, r.Get<uint32_t>());
    KVR_ASSIGN_OR_RETURN(p.input_scale, r.Get<float>());
    KVR_ASSIGN_OR_RETURN(uint64_t samples, r.Get<uint64_t>());
    KVR_ASSIGN_OR_RETURN(p.train_fvu, r.Get<double>());
    if (dim < 1 || dim > static_cast<uint32_t>(kMaxEncoderDim) || features < 1 ||
        features > static_cast<uint32_t>(kMaxEncoderFeatures) || samples > INT64_MAX) {
      return absl::DataLossError(absl::StrCat("sparse_encoder entry ", e, " has a bad shape"));
    }
    const uint64_t fd = static_cast<uint64_t>(features) * dim;
    if ((2 * fd + features + dim) * sizeof(float) > r.remaining()) {
      return absl::DataLossError("sparse_encoder artifact is truncated");
    }
    p.dim = static_cast<int32_t>(dim);
    p.num_features = static_cast<int32_t>(features);
    p.k = static_cast<int32_t>(std::min<uint32_t>(k, INT32_MAX));
    p.num_samples = static_cast<int64_t>(samples);
    p.w_enc.resize(fd);
    p.b_enc.resize(features);
    p.w_dec.resize(fd);
    p.b_dec.resize(dim);
    KVR_RETURN_IF_ERROR(r.GetBytes(p.w_enc.data(), fd * sizeof(float)));
    KVR_RETURN_IF_ERROR(r.GetBytes(p.b_enc.data(), features * sizeof(float)));
    KVR_RETURN_IF_ERROR(r.GetBytes(p.w_dec.data(), fd * sizeof(float)));
    KVR_RETURN_IF_ERROR(r.GetBytes(p.b_dec.data(), dim * sizeof(float)));
    auto encoder = SparseEncoder::Create(std::move(p));
    if (!encoder.ok()) {
      return absl::DataLossError(
          absl::StrCat("sparse_encoder entry ", e, ": ", encoder.status().message()));
    }
    out.push_back(std::move(encoder).value());
  }
  if (r.remaining() != 0) return absl::DataLossError("sparse_encoder artifact has trailing bytes");
  return out;
}

absl::StatusOr<std::unique_ptr<SparseEncoder>> SelectSparseEncoder(
    std::vector<std::unique_ptr<SparseEncoder>> encoders, int32_t layer, int32_t kv_head) {
  if (encoders.empty()) return absl::NotFoundError("sparse_encoder artifact holds no encoder");
  if (layer == -1 && kv_head == -1) {
    if (encoders.size() == 1) return std::move(encoders[0]);
    return absl::InvalidArgumentError(
        absl::StrCat("sparse_encoder artifact holds ", encoders.size(),
                     " encoders: say which with the build params layer= and kv_head="));
  }
  for (auto& e : encoders) {
    if (e->weights().layer == layer && e->weights().kv_head == kv_head) return std::move(e);
  }
  return absl::NotFoundError(absl::StrCat("sparse_encoder artifact has no encoder for layer ",
                                          layer, " KV head ", kv_head));
}

}  // namespace kvrecall::index::inverted
