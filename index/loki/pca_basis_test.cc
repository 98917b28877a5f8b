#include "index/loki/pca_basis.h"

#include <cmath>
#include <random>
#include <vector>

#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::index::loki {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint32_t kSeed = 20240611;

// A random orthonormal matrix [d, d] (rows), by Gram-Schmidt on Gaussians.
std::vector<double> RandomRotation(int d, std::mt19937* rng) {
  std::normal_distribution<double> g;
  std::vector<double> r(static_cast<size_t>(d) * d);
  for (double& x : r) x = g(*rng);
  for (int i = 0; i < d; ++i) {
    double* ri = r.data() + i * d;
    for (int j = 0; j < i; ++j) {
      const double* rj = r.data() + j * d;
      double dot = 0;
      for (int t = 0; t < d; ++t) dot += ri[t] * rj[t];
      for (int t = 0; t < d; ++t) ri[t] -= dot * rj[t];
    }
    double norm = 0;
    for (int t = 0; t < d; ++t) norm += ri[t] * ri[t];
    norm = std::sqrt(norm);
    for (int t = 0; t < d; ++t) ri[t] /= norm;
  }
  return r;
}

TEST(SymmetricEigenTest, DecomposesRandomSymmetricMatrices) {
  for (int d : {1, 2, 7, 64}) {
    SCOPED_TRACE(::testing::Message() << "seed " << kSeed << " d " << d);
    std::mt19937 rng(kSeed + d);
    std::normal_distribution<double> g;
    std::vector<double> a(static_cast<size_t>(d) * d);
    for (int i = 0; i < d; ++i) {
      for (int j = i; j < d; ++j) a[i * d + j] = a[j * d + i] = g(rng);
    }
    std::vector<double> values, vectors;
    KVR_ASSERT_OK(SymmetricEigen(a, d, &values, &vectors));
    ASSERT_EQ(values.size(), static_cast<size_t>(d));
    for (int i = 1; i < d; ++i) EXPECT_GE(values[i - 1], values[i]);
    for (int e = 0; e < d; ++e) {
      const double* v = vectors.data() + e * d;
      for (int i = 0; i < d; ++i) {  // (A v)_i == lambda v_i
        double av = 0;
        for (int j = 0; j < d; ++j) av += a[i * d + j] * v[j];
        EXPECT_NEAR(av, values[e] * v[i], 1e-9) << "eigenpair " << e;
      }
      for (int f = 0; f < d; ++f) {
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += v[j] * vectors[f * d + j];
        EXPECT_NEAR(dot, e == f ? 1.0 : 0.0, 1e-10);
      }
    }
  }
}

TEST(SymmetricEigenTest, RejectsWrongShape) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  std::vector<double> values, vectors;
  EXPECT_THAT(SymmetricEigen({1, 2, 3}, 2, &values, &vectors),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// Keys x = mean + sum_i s_i z_i axis_i with z ~ N(0, 1): the fit must recover
// the axes (up to sign) and the variances s_i^2.
TEST(FitPcaBasisTest, RecoversKnownAxesForEveryDtype) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int d = 16;
  const int64_t n = 20000;
  std::mt19937 rng(kSeed);
  const std::vector<double> axes = RandomRotation(d, &rng);
  std::vector<double> scale(d);
  for (int i = 0; i < d; ++i) scale[i] = 8.0 * std::pow(0.7, i);
  std::normal_distribution<double> g;
  std::vector<float> keys(static_cast<size_t>(n) * d);
  for (int64_t t = 0; t < n; ++t) {
    for (int j = 0; j < d; ++j) keys[t * d + j] = 3.0f + 0.5f * j;
    for (int i = 0; i < d; ++i) {
      const double z = scale[i] * g(rng);
      for (int j = 0; j < d; ++j) keys[t * d + j] += static_cast<float>(z * axes[i * d + j]);
    }
  }
  std::vector<uint16_t> f16(keys.size()), bf16(keys.size());
  ConvertFromFloat(keys.data(), keys.size(), DType::kF16, f16.data());
  ConvertFromFloat(keys.data(), keys.size(), DType::kBf16, bf16.data());
  const VectorView views[] = {VectorView::F32(keys.data(), n, d),
                              VectorView{f16.data(), n, d, DType::kF16, 0},
                              VectorView{bf16.data(), n, d, DType::kBf16, 0}};
  for (const VectorView& view : views) {
    SCOPED_TRACE(::testing::Message() << "seed " << kSeed << " dtype " << DTypeName(view.dtype));
    for (int threads : {1, 0}) {
      PcaFitOptions options;
      options.num_threads = threads;
      KVR_ASSERT_OK_AND_ASSIGN(PcaBasis b, FitPcaBasis(view, options));
      KVR_EXPECT_OK(ValidatePcaBasis(b));
      EXPECT_EQ(b.dim, d);
      EXPECT_EQ(b.num_samples, n);
      for (int j = 0; j < d; ++j) EXPECT_NEAR(b.mean[j], 3.0 + 0.5 * j, 0.2);
      for (int i = 0; i < 6; ++i) {  // well-separated leading axes
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += b.components[i * d + j] * axes[i * d + j];
        EXPECT_GT(std::fabs(dot), 0.99) << "axis " << i;
        EXPECT_NEAR(b.explained_variance[i], scale[i] * scale[i], 0.05 * scale[i] * scale[i]);
      }
      EXPECT_GT(b.ExplainedVarianceRatio(4), 0.85);
      EXPECT_EQ(b.ExplainedVarianceRatio(d), 1.0);
      EXPECT_LE(b.RankForVarianceRatio(0.5), 2);
      EXPECT_EQ(b.RankForVarianceRatio(1.0), d);
    }
  }
}

TEST(FitPcaBasisTest, IsIndependentOfThreadCount) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int d = 8;
  const int64_t n = 5000;
  std::mt19937 rng(kSeed);
  std::normal_distribution<float> g;
  std::vector<float> keys(static_cast<size_t>(n) * d);
  for (float& x : keys) x = g(rng);
  PcaFitOptions one;
  one.num_threads = 1;
  KVR_ASSERT_OK_AND_ASSIGN(PcaBasis a, FitPcaBasis(VectorView::F32(keys.data(), n, d), one));
  KVR_ASSERT_OK_AND_ASSIGN(PcaBasis b, FitPcaBasis(VectorView::F32(keys.data(), n, d), {}));
  EXPECT_EQ(a.components, b.components);
  EXPECT_EQ(a.explained_variance, b.explained_variance);
}

TEST(FitPcaBasisTest, RejectsBadInputAndCancels) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  std::vector<float> keys(64, 1.0f);
  EXPECT_THAT(FitPcaBasis(VectorView::F32(keys.data(), 0, 8), {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(FitPcaBasis(VectorView::F32(keys.data(), 8, 0), {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  keys[13] = std::nanf("");
  EXPECT_THAT(FitPcaBasis(VectorView::F32(keys.data(), 8, 8), {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NaN")));
  keys[13] = 0;
  PcaFitOptions cancel;
  cancel.progress = [](const Progress&) { return false; };
  EXPECT_THAT(FitPcaBasis(VectorView::F32(keys.data(), 8, 8), cancel),
              StatusIs(absl::StatusCode::kCancelled));
}

TEST(FitPcaBasisTest, ReportsMonotoneProgress) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  std::mt19937 rng(kSeed);
  std::normal_distribution<float> g;
  std::vector<float> keys(4096 * 16);
  for (float& x : keys) x = g(rng);
  double last = -1;
  int calls = 0;
  PcaFitOptions options;
  options.progress = [&](const Progress& p) {
    EXPECT_GE(p.fraction, last);
    last = p.fraction;
    ++calls;
    return true;
  };
  KVR_ASSERT_OK_AND_ASSIGN(PcaBasis b, FitPcaBasis(VectorView::F32(keys.data(), 4096, 16), options));
  EXPECT_GT(calls, 1);
  EXPECT_EQ(last, 1.0);
}

PcaBasis SmallBasis(int d, int layer, int head) {
  std::mt19937 rng(kSeed + layer * 31 + head);
  std::normal_distribution<float> g;
  std::vector<float> keys(256 * d);
  for (float& x : keys) x = g(rng);
  auto b = FitPcaBasis(VectorView::F32(keys.data(), 256, d), {});
  EXPECT_TRUE(b.ok());
  b->layer = layer;
  b->kv_head = head;
  return *b;
}

TEST(PcaBasisFormatTest, RoundTripsAndSelects) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const std::vector<PcaBasis> bases = {SmallBasis(8, 0, 0), SmallBasis(8, 0, 1),
                                       SmallBasis(8, 3, 0)};
  const std::string bytes = SerializePcaBases(bases);
  KVR_ASSERT_OK_AND_ASSIGN(std::vector<PcaBasis> back, ParsePcaBases(bytes));
  ASSERT_EQ(back.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(back[i].layer, bases[i].layer);
    EXPECT_EQ(back[i].kv_head, bases[i].kv_head);
    EXPECT_EQ(back[i].components, bases[i].components);
    EXPECT_EQ(back[i].mean, bases[i].mean);
    EXPECT_EQ(back[i].explained_variance, bases[i].explained_variance);
    EXPECT_EQ(back[i].num_samples, 256);
  }
  KVR_ASSERT_OK_AND_ASSIGN(PcaBasis b, SelectPcaBasis(back, 0, 1));
  EXPECT_EQ(b.components, bases[1].components);
  EXPECT_THAT(SelectPcaBasis(back, 5, 0), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(SelectPcaBasis(back, -1, -1), StatusIs(absl::StatusCode::kInvalidArgument));
  KVR_EXPECT_OK(SelectPcaBasis({bases[2]}, -1, -1));
  KVR_ASSERT_OK_AND_ASSIGN(std::vector<PcaBasis> none, ParsePcaBases(SerializePcaBases({})));
  EXPECT_TRUE(none.empty());
}

TEST(PcaBasisFormatTest, DetectsCorruption) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const std::string bytes = SerializePcaBases({SmallBasis(8, 1, 1)});
  std::string flipped = bytes;
  flipped[100] ^= 0x10;
  EXPECT_THAT(ParsePcaBases(flipped), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(ParsePcaBases(bytes.substr(0, bytes.size() - 9)),
              StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(ParsePcaBases("KVRLOKIX" + bytes.substr(8)), StatusIs(absl::StatusCode::kDataLoss));
  std::string future = bytes;
  future[8] = 9;  // version 9
  EXPECT_THAT(ParsePcaBases(future), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST(PcaBasisFormatTest, ValidationRejectsNonOrthonormalBases) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  PcaBasis b = SmallBasis(8, 0, 0);
  KVR_EXPECT_OK(ValidatePcaBasis(b));
  b.components[3] += 0.01f;
  EXPECT_THAT(ValidatePcaBasis(b), StatusIs(absl::StatusCode::kInvalidArgument,
                                            HasSubstr("orthonormal")));
  b = SmallBasis(8, 0, 0);
  b.mean.pop_back();
  EXPECT_THAT(ValidatePcaBasis(b), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::index::loki
