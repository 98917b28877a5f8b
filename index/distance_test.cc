#include "index/distance.h"

#include <cmath>
#include <random>
#include <vector>

#include "common/half.h"
#include "gtest/gtest.h"

namespace kvrecall::index {
namespace {

TEST(DistanceTest, ScoreRowsMatchesDoubleForEveryDtype) {
  const uint32_t seed = 1234;
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  for (int32_t d : {1, 7, 64, 100, 128}) {
    const int64_t n = 37, stride = d + 3;
    std::vector<float> q(d), keys(n * stride);
    for (float& x : q) x = dist(rng);
    for (float& x : keys) x = dist(rng);
    std::vector<uint16_t> h(keys.size()), b(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      h[i] = FloatToHalf(keys[i]);
      b[i] = FloatToBf16(keys[i]);
    }
    std::vector<float> s32(n), s16(n), sb16(n), gathered(3);
    ScoreRows(q.data(), keys.data(), DType::kF32, n, d, stride, s32.data());
    ScoreRows(q.data(), h.data(), DType::kF16, n, d, stride, s16.data());
    ScoreRows(q.data(), b.data(), DType::kBf16, n, d, stride, sb16.data());
    for (int64_t i = 0; i < n; ++i) {
      double r32 = 0, r16 = 0, rb16 = 0;
      for (int32_t j = 0; j < d; ++j) {
        r32 += double(q[j]) * keys[i * stride + j];
        r16 += double(q[j]) * HalfToFloat(h[i * stride + j]);
        rb16 += double(q[j]) * Bf16ToFloat(b[i * stride + j]);
      }
      EXPECT_NEAR(s32[i], r32, 1e-4 * (1 + std::abs(r32))) << "seed " << seed << " d " << d;
      EXPECT_NEAR(s16[i], r16, 1e-4 * (1 + std::abs(r16)));
      EXPECT_NEAR(sb16[i], rb16, 1e-4 * (1 + std::abs(rb16)));
    }
    const int64_t ids[3] = {5, 0, 36};
    ScoreRowsGather(q.data(), h.data(), DType::kF16, d, stride, ids, 3, gathered.data());
    for (int j = 0; j < 3; ++j) EXPECT_EQ(gathered[j], s16[ids[j]]);
  }
}

TEST(DistanceTest, TopKKeepsLargestInOrder) {
  TopK top(3);
  const float scores[] = {0.5f, 2.0f, -1.0f, 2.0f, 1.5f, 0.0f};
  for (int i = 0; i < 6; ++i) top.Push(scores[i], i);
  int64_t ids[3];
  float out[3];
  top.Drain(ids, out);
  EXPECT_EQ(ids[0], 1);  // tie on 2.0: smaller id first
  EXPECT_EQ(ids[1], 3);
  EXPECT_EQ(ids[2], 4);
  EXPECT_EQ(out[2], 1.5f);

  TopK few(3);
  few.Push(1.0f, 9);
  few.Drain(ids, out);
  EXPECT_EQ(ids[0], 9);
  EXPECT_EQ(ids[1], -1);
  EXPECT_TRUE(std::isinf(out[2]) && out[2] < 0);
}

}  // namespace
}  // namespace kvrecall::index
