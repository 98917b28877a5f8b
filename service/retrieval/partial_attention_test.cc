#include "service/retrieval/partial_attention.h"

#include <cmath>
#include <deque>
#include <numeric>
#include <random>
#include <vector>

#include "common/half.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::retrieval {
namespace {

using ::kvrecall::testing::StatusIs;

// Owns random K/V in blocks (the last one partial, with a padded head stride)
// and exposes them as a LayerKvView.
struct RandomKv {
  RandomKv(DType dtype, int32_t kv_heads, int32_t d, int32_t block, int64_t tokens, uint32_t seed)
      : rng(seed) {
    view.dtype = dtype;
    view.num_kv_heads = kv_heads;
    view.head_dim = d;
    view.block_tokens = block;
    view.num_tokens = tokens;
    std::normal_distribution<float> dist(0.0f, 1.0f);
    const size_t elem = DTypeSize(dtype);
    for (int64_t start = 0; start < tokens; start += block) {
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(block, tokens - start));
      const int32_t stride = n + (n < block ? 3 : 0);
      auto& kb = storage.emplace_back(static_cast<size_t>(kv_heads) * stride * d * elem);
      auto& vb = storage.emplace_back(static_cast<size_t>(kv_heads) * stride * d * elem);
      for (size_t i = 0; i < kb.size() / elem; ++i) {
        Put(kb.data(), i, 2.0f * dist(rng));
        Put(vb.data(), i, dist(rng));
      }
      view.blocks.push_back(KvBlock{kb.data(), vb.data(), n, stride});
    }
  }
  void Put(char* base, size_t i, float v) {
    switch (view.dtype) {
      case DType::kF32:
        reinterpret_cast<float*>(base)[i] = v;
        break;
      case DType::kF16:
        reinterpret_cast<uint16_t*>(base)[i] = FloatToHalf(v);
        break;
      case DType::kBf16:
        reinterpret_cast<uint16_t*>(base)[i] = FloatToBf16(v);
        break;
    }
  }
  double At(const void* row, int32_t j) const {
    switch (view.dtype) {
      case DType::kF32:
        return static_cast<const float*>(row)[j];
      case DType::kF16:
        return HalfToFloat(static_cast<const uint16_t*>(row)[j]);
      case DType::kBf16:
        return Bf16ToFloat(static_cast<const uint16_t*>(row)[j]);
    }
    return 0;
  }
  // Full attention in float64 over `ids` for one query head.
  void Reference(const float* q, int32_t kv_head, const std::vector<int64_t>& ids,
                 std::vector<double>* out, double* lse) const {
    const int32_t d = view.head_dim;
    std::vector<double> s(ids.size());
    double m = -INFINITY;
    for (size_t i = 0; i < ids.size(); ++i) {
      const void* k = view.KeyRow(kv_head, ids[i]);
      double acc = 0;
      for (int32_t j = 0; j < d; ++j) acc += double(q[j]) * At(k, j);
      s[i] = acc / std::sqrt(double(d));
      m = std::max(m, s[i]);
    }
    double l = 0;
    for (double& x : s) l += (x = std::exp(x - m));
    out->assign(d, 0.0);
    for (size_t i = 0; i < ids.size(); ++i) {
      const void* v = view.ValueRow(kv_head, ids[i]);
      for (int32_t j = 0; j < d; ++j) (*out)[j] += s[i] / l * At(v, j);
    }
    *lse = m + std::log(l);
  }

  std::mt19937 rng;
  std::deque<std::vector<char>> storage;  // deque: references stay valid on growth
  LayerKvView view;
};

double RelErr(const float* got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t j = 0; j < want.size(); ++j) {
    num += (got[j] - want[j]) * (got[j] - want[j]);
    den += want[j] * want[j];
  }
  return std::sqrt(num / den);
}

class PartialAttentionTest : public ::testing::TestWithParam<DType> {};

TEST_P(PartialAttentionTest, MergedPartialsEqualFullAttention) {
  const uint32_t seed = 7 + static_cast<uint32_t>(GetParam());
  const int32_t kv_heads = 2, g = 4, d = 128;
  RandomKv kv(GetParam(), kv_heads, d, 64, 1000, seed);
  std::vector<float> q(kv_heads * g * d);
  std::normal_distribution<float> dist;
  for (float& x : q) x = dist(kv.rng);

  // Split all positions into two disjoint random sets.
  std::vector<int64_t> all(kv.view.num_tokens);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), kv.rng);
  std::vector<int64_t> a(all.begin(), all.begin() + 313), b(all.begin() + 313, all.end());

  PartialAttentionResult pa, pb, merged, full;
  PartialAttentionArgs args;
  args.queries = q.data();
  args.num_q_heads = kv_heads * g;
  args.group_size = g;
  args.ids = {a, a};  // shared per KV head
  KVR_ASSERT_OK(ComputePartialAttention(kv.view, args, &pa));
  args.ids = {b, b};
  KVR_ASSERT_OK(ComputePartialAttention(kv.view, args, &pb));
  MergeAttentionStates({&pa, &pb}, args.num_q_heads, d, &merged);
  args.ids = {all, all};
  KVR_ASSERT_OK(ComputePartialAttention(kv.view, args, &full));

  for (int32_t h = 0; h < args.num_q_heads; ++h) {
    std::vector<double> ref;
    double lse;
    kv.Reference(q.data() + h * d, h / g, all, &ref, &lse);
    EXPECT_LT(RelErr(merged.out.data() + h * d, ref), 1e-5) << "seed " << seed << " head " << h;
    EXPECT_LT(RelErr(full.out.data() + h * d, ref), 1e-5) << "seed " << seed << " head " << h;
    EXPECT_NEAR(merged.lse[h], lse, 1e-5 * std::abs(lse) + 1e-5);
    EXPECT_NEAR(full.lse[h], lse, 1e-5 * std::abs(lse) + 1e-5);
    std::vector<double> ref_a;
    double lse_a;
    kv.Reference(q.data() + h * d, h / g, a, &ref_a, &lse_a);
    EXPECT_LT(RelErr(pa.out.data() + h * d, ref_a), 1e-5);
    EXPECT_NEAR(pa.lse[h], lse_a, 1e-5 * std::abs(lse_a) + 1e-5);
  }
}

TEST_P(PartialAttentionTest, PerQueryHeadListsMatchSharedLists) {
  const uint32_t seed = 99;
  RandomKv kv(GetParam(), 2, 64, 32, 200, seed);
  std::vector<float> q(4 * 64);
  std::normal_distribution<float> dist;
  for (float& x : q) x = dist(kv.rng);
  std::vector<int64_t> ids0 = {0, 5, 31, 32, 199}, ids1 = {7, 100, 150};
  PartialAttentionArgs args;
  args.queries = q.data();
  args.num_q_heads = 4;
  args.group_size = 2;
  args.num_threads = 1;
  args.ids = {ids0, ids1};
  PartialAttentionResult shared, own;
  KVR_ASSERT_OK(ComputePartialAttention(kv.view, args, &shared));
  args.ids = {ids0, ids0, ids1, ids1};
  KVR_ASSERT_OK(ComputePartialAttention(kv.view, args, &own));
  for (size_t i = 0; i < own.out.size(); ++i) EXPECT_NEAR(own.out[i], shared.out[i], 1e-6);
  for (size_t h = 0; h < 4; ++h) EXPECT_NEAR(own.lse[h], shared.lse[h], 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, PartialAttentionTest,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBf16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

TEST(PartialAttentionEdgeTest, EmptySetIsMergeIdentity) {
  RandomKv kv(DType::kF32, 1, 16, 8, 20, 3);
  std::vector<float> q(16, 0.5f);
  PartialAttentionArgs args;
  args.queries = q.data();
  args.num_q_heads = 1;
  args.ids = {absl::Span<const int64_t>()};
  PartialAttentionResult empty, some, merged;
  KVR_ASSERT_OK(ComputePartialAttention(kv.view, args, &empty));
  EXPECT_TRUE(std::isinf(empty.lse[0]) && empty.lse[0] < 0);
  const std::vector<int64_t> ids = {1, 2, 3};
  args.ids = {ids};
  KVR_ASSERT_OK(ComputePartialAttention(kv.view, args, &some));
  MergeAttentionStates({&empty, &some}, 1, 16, &merged);
  EXPECT_EQ(merged.lse[0], some.lse[0]);
  for (int j = 0; j < 16; ++j) EXPECT_FLOAT_EQ(merged.out[j], some.out[j]);
  MergeAttentionStates({&empty, &empty}, 1, 16, &merged);
  EXPECT_TRUE(std::isinf(merged.lse[0]));
}

TEST(PartialAttentionEdgeTest, MergeIsStableForFarApartLse) {
  // lse values 1000 apart: the naive log(1 + exp(a - b)) form overflows.
  PartialAttentionResult a, b, merged;
  a.out = {1.0f, 0.0f};
  a.lse = {1000.0f};
  b.out = {0.0f, 1.0f};
  b.lse = {0.0f};
  MergeAttentionStates({&a, &b}, 1, 2, &merged);
  EXPECT_FLOAT_EQ(merged.lse[0], 1000.0f);
  EXPECT_FLOAT_EQ(merged.out[0], 1.0f);
  EXPECT_FLOAT_EQ(merged.out[1], 0.0f);
}

TEST(PartialAttentionEdgeTest, RejectsBadArguments) {
  RandomKv kv(DType::kF16, 2, 16, 8, 20, 4);
  std::vector<float> q(4 * 16, 1.0f);
  PartialAttentionArgs args;
  args.queries = q.data();
  args.num_q_heads = 3;  // not a multiple of 2 KV heads
  args.group_size = 2;
  PartialAttentionResult r;
  EXPECT_THAT(ComputePartialAttention(kv.view, args, &r),
              StatusIs(absl::StatusCode::kInvalidArgument));
  args.num_q_heads = 4;
  const std::vector<int64_t> bad = {0, 20};
  args.ids = {bad, bad};
  EXPECT_THAT(ComputePartialAttention(kv.view, args, &r),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("20")));
  args.ids = {bad};
  EXPECT_THAT(ComputePartialAttention(kv.view, args, &r),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::retrieval
