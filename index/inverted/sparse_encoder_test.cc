#include "index/inverted/sparse_encoder.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "index/distance.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::index::inverted {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint32_t kSeed = 9157;

// Inputs that are sparse combinations of a hidden dictionary: each is the sum
// of `active` of `atoms` random unit vectors with positive coefficients, plus
// a constant offset and a little noise.
std::vector<float> SparseMixtures(int64_t n, int32_t d, int32_t atoms, int32_t active,
                                  uint32_t dict_seed, uint32_t sample_seed = 0) {
  std::mt19937 rng(dict_seed);
  std::normal_distribution<float> g;
  std::uniform_int_distribution<int32_t> pick(0, atoms - 1);
  std::uniform_real_distribution<float> coef(1.0f, 3.0f);
  std::vector<float> dict(static_cast<size_t>(atoms) * d);
  for (int32_t a = 0; a < atoms; ++a) {
    double norm = 0;
    for (int32_t j = 0; j < d; ++j) norm += std::pow(dict[a * d + j] = g(rng), 2);
    for (int32_t j = 0; j < d; ++j) dict[a * d + j] /= static_cast<float>(std::sqrt(norm));
  }
  if (sample_seed != 0) rng.seed(sample_seed);
  std::vector<float> x(static_cast<size_t>(n) * d);
  for (int64_t i = 0; i < n; ++i) {
    for (int32_t j = 0; j < d; ++j) x[i * d + j] = 0.5f + 0.01f * g(rng);
    for (int32_t t = 0; t < active; ++t) {
      const int32_t a = pick(rng);
      const float c = coef(rng);
      for (int32_t j = 0; j < d; ++j) x[i * d + j] += c * dict[a * d + j];
    }
  }
  return x;
}

SparseEncoderTrainOptions SmallTraining() {
  SparseEncoderTrainOptions o;
  o.num_features = 48;
  o.k = 4;
  o.epochs = 12;
  o.batch_size = 64;
  o.learning_rate = 3e-3;
  o.seed = kSeed;
  return o;
}

TEST(SparseEncoderTest, LearnsSparseStructure) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int32_t d = 16;
  const std::vector<float> x = SparseMixtures(3000, d, 24, 2, kSeed);
  SparseEncoderQuality q;
  KVR_ASSERT_OK_AND_ASSIGN(auto encoder,
                           TrainSparseEncoder(VectorView::F32(x.data(), 3000, d), SmallTraining(), &q));
  EXPECT_EQ(encoder->num_features(), 48);
  EXPECT_EQ(encoder->k(), 4);
  EXPECT_EQ(q.num_samples, 3000);
  // Two true atoms per input, four allowed: most of the variance is explained.
  EXPECT_LT(q.fvu, 0.15) << "seed " << kSeed;
  EXPECT_LE(q.mean_active, 4.0);
  EXPECT_GT(q.mean_active, 1.0);
  EXPECT_EQ(encoder->weights().train_fvu, q.fvu);
  // A held-out sample of the same distribution is encoded as well.
  const std::vector<float> held = SparseMixtures(500, d, 24, 2, kSeed, kSeed + 99);  // same dictionary
  KVR_ASSERT_OK_AND_ASSIGN(SparseEncoderQuality h,
                           EvaluateSparseEncoder(*encoder, VectorView::F32(held.data(), 500, d)));
  EXPECT_LT(h.fvu, 0.2);
}

TEST(SparseEncoderTest, EncodeDecodeAndProjectionAgree) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int32_t d = 16;
  const std::vector<float> x = SparseMixtures(1000, d, 24, 2, kSeed);
  SparseEncoderTrainOptions o = SmallTraining();
  o.epochs = 2;
  KVR_ASSERT_OK_AND_ASSIGN(auto encoder, TrainSparseEncoder(VectorView::F32(x.data(), 1000, d), o));
  std::vector<int32_t> ids(4);
  std::vector<float> acts(4), scratch(48), xh(d), w(48);
  for (int i = 0; i < 20; ++i) {
    const int32_t count = encoder->Encode(x.data() + i * d, ids.data(), acts.data(), scratch.data());
    ASSERT_LE(count, 4);
    for (int32_t t = 0; t < count; ++t) {
      EXPECT_GT(acts[t], 0);
      if (t > 0) {
        EXPECT_GE(acts[t - 1], acts[t]);
      }
      EXPECT_EQ(acts[t], scratch[ids[t]]);  // the pre-activation of that feature
    }
    // Every feature not chosen has a pre-activation no larger than the chosen ones.
    const float lowest = count == 4 ? acts[3] : 0.0f;
    for (int32_t f = 0; f < 48; ++f) {
      if (std::find(ids.begin(), ids.begin() + count, f) == ids.begin() + count) {
        EXPECT_LE(scratch[f], lowest);
      }
    }
    encoder->Decode(ids.data(), acts.data(), count, xh.data());
    encoder->DecoderProjection(x.data() + i * d, w.data());
    // q·x̂ = Σ a_f w_f + q·b_dec.
    double via_w = DotF32(x.data() + i * d, encoder->weights().b_dec.data(), d);
    for (int32_t t = 0; t < count; ++t) via_w += acts[t] * w[ids[t]];
    EXPECT_NEAR(DotF32(x.data() + i * d, xh.data(), d), via_w, 1e-3 * (1 + std::fabs(via_w)));
  }
}

TEST(SparseEncoderTest, TrainingIsDeterministicAcrossThreadCounts) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const std::vector<float> x = SparseMixtures(700, 8, 12, 2, kSeed);
  SparseEncoderTrainOptions o = SmallTraining();
  o.num_features = 16;
  o.epochs = 3;
  o.num_threads = 1;
  KVR_ASSERT_OK_AND_ASSIGN(auto a, TrainSparseEncoder(VectorView::F32(x.data(), 700, 8), o));
  o.num_threads = 0;
  KVR_ASSERT_OK_AND_ASSIGN(auto b, TrainSparseEncoder(VectorView::F32(x.data(), 700, 8), o));
  EXPECT_EQ(a->weights().w_enc, b->weights().w_enc);
  EXPECT_EQ(a->weights().w_dec, b->weights().w_dec);
  o.seed = kSeed + 1;
  KVR_ASSERT_OK_AND_ASSIGN(auto c, TrainSparseEncoder(VectorView::F32(x.data(), 700, 8), o));
  EXPECT_NE(a->weights().w_dec, c->weights().w_dec);
}

// Random weights of a small encoder (decoder rows unit) and scaled inputs.
SparseEncoderWeights RandomWeights(int32_t d, int32_t F, int32_t k, std::mt19937* rng) {
  std::normal_distribution<float> g;
  SparseEncoderWeights w;
  w.dim = d;
  w.num_features = F;
  w.k = k;
  w.w_enc.resize(static_cast<size_t>(F) * d);
  w.w_dec.resize(static_cast<size_t>(F) * d);
  w.b_enc.resize(static_cast<size_t>(F));
  w.b_dec.resize(static_cast<size_t>(d));
  for (float& v : w.w_enc) v = g(*rng);
  for (float& v : w.b_enc) v = 0.3f * g(*rng);
  for (float& v : w.b_dec) v = 0.3f * g(*rng);
  for (int32_t f = 0; f < F; ++f) {
    double norm = 0;
    for (int32_t j = 0; j < d; ++j) norm += std::pow(w.w_dec[f * d + j] = g(*rng), 2);
    for (int32_t j = 0; j < d; ++j) w.w_dec[f * d + j] /= static_cast<float>(std::sqrt(norm));
  }
  return w;
}

SparseEncoderWeights ZeroLike(const SparseEncoderWeights& w) {
  SparseEncoderWeights z = w;
  for (std::vector<float>* v : {&z.w_enc, &z.b_enc, &z.w_dec, &z.b_dec}) {
    std::fill(v->begin(), v->end(), 0.0f);
  }
  return z;
}

// Central finite differences of internal::BatchGradient's loss against its
// gradient, for the parameters selected by `check(array, index)`.
void ExpectGradientMatches(SparseEncoderWeights w, const std::vector<const float*>& inputs,
                           const std::vector<char>& dead, int32_t aux_k,
                           const std::function<bool(int, size_t)>& check) {
  SparseEncoderWeights grad = ZeroLike(w);
  internal::BatchGradient(w, inputs, dead, aux_k, 0.25, 1, &grad, nullptr);
  std::vector<float>* params[] = {&w.w_enc, &w.b_enc, &w.w_dec, &w.b_dec};
  const std::vector<float>* grads[] = {&grad.w_enc, &grad.b_enc, &grad.w_dec, &grad.b_dec};
  int checked = 0;
  for (int a = 0; a < 4; ++a) {
    for (size_t i = 0; i < params[a]->size(); ++i) {
      if (!check(a, i)) continue;
      const float eps = 1e-3f;
      const float saved = (*params[a])[i];
      SparseEncoderWeights scratch = ZeroLike(w);
      (*params[a])[i] = saved + eps;
      const double up = internal::BatchGradient(w, inputs, dead, aux_k, 0.25, 1, &scratch, nullptr);
      (*params[a])[i] = saved - eps;
      const double down = internal::BatchGradient(w, inputs, dead, aux_k, 0.25, 1, &scratch, nullptr);
      (*params[a])[i] = saved;
      const double fd = (up - down) / (2.0 * eps);
      const double an = (*grads[a])[i];
      EXPECT_NEAR(an, fd, 2e-3 + 2e-2 * std::fabs(fd)) << "array " << a << " index " << i;
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
}

TEST(SparseEncoderTest, BatchGradientMatchesFiniteDifferences) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  std::mt19937 rng(kSeed);
  std::normal_distribution<float> g;
  const int32_t d = 6, F = 24, k = 3;
  const SparseEncoderWeights w = RandomWeights(d, F, k, &rng);
  std::vector<float> x(3 * d);
  for (float& v : x) v = g(rng);
  std::vector<const float*> inputs;
  for (int b = 0; b < 3; ++b) inputs.push_back(x.data() + b * d);
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  // The main loss: every parameter.
  ExpectGradientMatches(w, inputs, std::vector<char>(F, 0), 0, [](int, size_t) { return true; });
  // The auxiliary loss: parameters of dead features that are in no main code
  // (they do not move x̂, which the auxiliary term holds constant).
  std::vector<char> dead(F, 0);
  for (int f = 0; f < F; ++f) dead[f] = f % 2;
  SparseEncoderWeights grad = ZeroLike(w);
  std::vector<int64_t> fired(F, 0);
  internal::BatchGradient(w, inputs, dead, 2, 0.25, 1, &grad, &fired);
  int aux_only = 0;
  for (int f = 0; f < F; ++f) aux_only += dead[f] && fired[f] == 0 && grad.b_enc[f] != 0;
  ASSERT_GT(aux_only, 0) << "no dead feature took part in the auxiliary loss";
  ExpectGradientMatches(w, inputs, dead, 2, [&](int a, size_t i) {
    if (a == 3) return false;  // b_dec moves x̂
    const size_t f = a == 1 ? i : i / d;
    return dead[f] && fired[f] == 0;
  });
}

TEST(SparseEncoderTest, BatchGradientIsIndependentOfThreadCount) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  std::mt19937 rng(kSeed + 1);
  std::normal_distribution<float> g;
  const SparseEncoderWeights w = RandomWeights(8, 32, 4, &rng);
  std::vector<float> x(300 * 8);
  for (float& v : x) v = g(rng);
  std::vector<const float*> inputs;
  for (int b = 0; b < 300; ++b) inputs.push_back(x.data() + b * 8);
  std::vector<char> dead(32, 0);
  dead[3] = dead[7] = 1;
  SparseEncoderWeights one = ZeroLike(w), many = ZeroLike(w);
  const double l1 = internal::BatchGradient(w, inputs, dead, 4, 0.1, 1, &one, nullptr);
  const double l2 = internal::BatchGradient(w, inputs, dead, 4, 0.1, 0, &many, nullptr);
  EXPECT_EQ(l1, l2);
  EXPECT_EQ(one.w_enc, many.w_enc);
  EXPECT_EQ(one.b_dec, many.b_dec);
}

TEST(SparseEncoderTest, QualityCountsDeadFeatures) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  // Hand-made encoder, d = 2, F = 3: feature 2 has a hugely negative bias and
  // never fires; inputs along +x fire feature 0, along +y feature 1.
  SparseEncoderWeights w;
  w.dim = 2;
  w.num_features = 3;
  w.k = 1;
  w.w_enc = {1, 0, 0, 1, 1, 1};
  w.b_enc = {0, 0, -100};
  w.w_dec = {1, 0, 0, 1, 0.6f, 0.8f};
  w.b_dec = {0, 0};
  KVR_ASSERT_OK_AND_ASSIGN(auto encoder, SparseEncoder::Create(w));
  const std::vector<float> x = {2, 0, 0, 3, 1, 0, 0, 1};
  KVR_ASSERT_OK_AND_ASSIGN(SparseEncoderQuality q,
                           EvaluateSparseEncoder(*encoder, VectorView::F32(x.data(), 4, 2)));
  EXPECT_EQ(q.dead_features, 1);
  EXPECT_NEAR(q.fvu, 0.0, 1e-12);
  EXPECT_EQ(q.mean_active, 1.0);
  EXPECT_EQ(q.max_feature_share, 0.5);
}

TEST(SparseEncoderTest, RejectsBadInputAndWeights) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  std::vector<float> x(64, 1.0f);
  EXPECT_THAT(TrainSparseEncoder(VectorView::F32(x.data(), 1, 8), SmallTraining()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  SparseEncoderTrainOptions bad = SmallTraining();
  bad.k = 100;
  EXPECT_THAT(TrainSparseEncoder(VectorView::F32(x.data(), 8, 8), bad),
              StatusIs(absl::StatusCode::kInvalidArgument));
  bad = SmallTraining();
  bad.learning_rate = 0;
  EXPECT_THAT(TrainSparseEncoder(VectorView::F32(x.data(), 8, 8), bad),
              StatusIs(absl::StatusCode::kInvalidArgument));
  x[5] = INFINITY;
  EXPECT_THAT(TrainSparseEncoder(VectorView::F32(x.data(), 8, 8), SmallTraining()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NaN or Inf")));
  x[5] = 0;
  SparseEncoderTrainOptions cancel = SmallTraining();
  cancel.progress = [](const Progress&) { return false; };
  EXPECT_THAT(TrainSparseEncoder(VectorView::F32(x.data(), 8, 8), cancel),
              StatusIs(absl::StatusCode::kCancelled));

  SparseEncoderWeights w;
  w.dim = 2;
  w.num_features = 2;
  w.k = 1;
  w.w_enc = {1, 0, 0, 1};
  w.b_enc = {0, 0};
  w.w_dec = {1, 0, 0, 2};  // row 1 is not a unit vector
  w.b_dec = {0, 0};
  EXPECT_THAT(SparseEncoder::Create(w), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("norm")));
  w.w_dec = {1, 0, 0, 1};
  w.k = 3;
  EXPECT_THAT(SparseEncoder::Create(w), StatusIs(absl::StatusCode::kInvalidArgument));
  w.k = 1;
  w.b_enc.pop_back();
  EXPECT_THAT(SparseEncoder::Create(w), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(SparseEncoderFormatTest, RoundTripsSelectsAndDetectsCorruption) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const std::vector<float> x = SparseMixtures(300, 8, 12, 2, kSeed);
  SparseEncoderTrainOptions o = SmallTraining();
  o.num_features = 16;
  o.epochs = 1;
  o.layer = 5;
  o.kv_head = 1;
  KVR_ASSERT_OK_AND_ASSIGN(auto a, TrainSparseEncoder(VectorView::F32(x.data(), 300, 8), o));
  o.kv_head = 0;
  KVR_ASSERT_OK_AND_ASSIGN(auto b, TrainSparseEncoder(VectorView::F32(x.data(), 300, 8), o));
  const std::string bytes = SerializeSparseEncoders({a.get(), b.get()});
  KVR_ASSERT_OK_AND_ASSIGN(auto parsed, ParseSparseEncoders(bytes));
  ASSERT_EQ(parsed.size(), 2u);
  EXPECT_EQ(parsed[0]->weights().w_enc, a->weights().w_enc);
  EXPECT_EQ(parsed[0]->weights().b_dec, a->weights().b_dec);
  EXPECT_EQ(parsed[1]->weights().kv_head, 0);
  EXPECT_EQ(parsed[1]->weights().train_fvu, b->weights().train_fvu);
  EXPECT_EQ(parsed[1]->weights().num_samples, 300);
  KVR_ASSERT_OK_AND_ASSIGN(auto one, SelectSparseEncoder(std::move(parsed), 5, 1));
  EXPECT_EQ(one->weights().w_dec, a->weights().w_dec);
  EXPECT_THAT(SelectSparseEncoder(*ParseSparseEncoders(bytes), -1, -1),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(SelectSparseEncoder(*ParseSparseEncoders(bytes), 4, 1),
              StatusIs(absl::StatusCode::kNotFound));
  std::string flipped = bytes;
  flipped[200] ^= 0x40;
  EXPECT_THAT(ParseSparseEncoders(flipped), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(ParseSparseEncoders(bytes.substr(0, 100)), StatusIs(absl::StatusCode::kDataLoss));
  std::string future = bytes;
  future[8] = 2;
  EXPECT_THAT(ParseSparseEncoders(future), StatusIs(absl::StatusCode::kFailedPrecondition));
}

}  // namespace
}  // namespace kvrecall::index::inverted
