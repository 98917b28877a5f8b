#include "index/flat/streaming_topk.h"

#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "index/distance.h"

namespace kvrecall::index {
namespace {

TEST(StreamingTopKTest, EqualsTopKIncludingTiesAndPriming) {
  const uint32_t seed = 2024;
  std::mt19937 rng(seed);
  for (int32_t k : {1, 3, 100, 500}) {
    for (int trial = 0; trial < 20; ++trial) {
      const int64_t n = std::uniform_int_distribution<int64_t>(1, 3000)(rng);
      std::vector<float> s(n);
      // Few distinct values: many ties, which the id order must break.
      std::uniform_int_distribution<int> level(0, trial % 2 == 0 ? 20 : 1000000);
      for (float& x : s) x = static_cast<float>(level(rng)) * 0.25f;
      TopK ref(k);
      StreamingTopK got(k);
      if (n >= k && trial % 3 == 0) got.RaiseThreshold(KthLargestLowerBound(s.data(), n, k));
      for (int64_t i = 0; i < n; ++i) {
        ref.Push(s[i], i);
        got.Push(s[i], i);
      }
      std::vector<int64_t> ref_ids(k), got_ids(k);
      std::vector<float> ref_s(k), got_s(k);
      ref.Drain(ref_ids.data(), ref_s.data());
      got.Drain(got_ids.data(), got_s.data());
      ASSERT_EQ(got_ids, ref_ids) << "seed " << seed << " k " << k << " trial " << trial;
      ASSERT_EQ(got_s, ref_s);
    }
  }
}

TEST(StreamingTopKTest, LowerBoundIsSafeAndCountsAreExact) {
  std::mt19937 rng(8);
  std::normal_distribution<float> dist;
  std::vector<float> s(1000);
  for (float& x : s) x = dist(rng);
  for (int32_t k : {1, 10, 100, 1000}) {
    const float t = KthLargestLowerBound(s.data(), 1000, k);
    int64_t count = 0;
    for (float x : s) count += x >= t;
    EXPECT_EQ(CountAtLeast(s.data(), 1000, t), count);
    EXPECT_GE(count, k);
    if (k == 100) {
      EXPECT_LE(count, 110);  // 12 bisection steps get close
    }
  }
}

}  // namespace
}  // namespace kvrecall::index
