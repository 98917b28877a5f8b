#include "common/half.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvrecall {
namespace {

TEST(HalfTest, RoundTripsEveryHalf) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = HalfToFloat(h);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f))));
      continue;
    }
    EXPECT_EQ(FloatToHalf(f), h) << "bits " << bits;
  }
}

TEST(HalfTest, KnownValues) {
  EXPECT_EQ(HalfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xc000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // rounds to inf
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie to even
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
}

TEST(HalfTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(3.140625f)), 3.140625f);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(HalfTest, BulkConversionMatchesScalar) {
  std::mt19937 rng(42);
  std::normal_distribution<float> dist(0.0f, 10.0f);
  for (size_t n : {0u, 1u, 7u, 8u, 9u, 129u}) {
    std::vector<uint16_t> h(n), b(n);
    for (size_t i = 0; i < n; ++i) {
      const float f = dist(rng);
      h[i] = FloatToHalf(f);
      b[i] = FloatToBf16(f);
    }
    std::vector<float> out(n);
    ConvertToFloat(h.data(), DType::kF16, n, out.data());
    for (size_t i = 0; i < n; ++i) EXPECT_EQ(out[i], HalfToFloat(h[i]));
    ConvertToFloat(b.data(), DType::kBf16, n, out.data());
    for (size_t i = 0; i < n; ++i) EXPECT_EQ(out[i], Bf16ToFloat(b[i]));
    std::vector<uint16_t> back(n);
    ConvertFromFloat(out.data(), n, DType::kBf16, back.data());
    EXPECT_EQ(back, b);
  }
}

}  // namespace
}  // namespace kvrecall
