#include "bench/index/attention_eval.h"

#include <cmath>
#include <string>
#include <vector>

#include "common/half.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::bench {
namespace {

using ::kvrecall::testing::StatusIs;

// Three keys in d = 4 with hand-checkable attention: logits q·k / 2.
EvalSet TinySet() {
  EvalSet set;
  set.dim = 4;
  set.num_keys = 3;
  const float keys[] = {2, 0, 0, 0,  0, 2, 0, 0,  0, 0, 0, 0};
  for (float k : keys) set.keys.push_back(FloatToHalf(k));
  set.values = {1, 0, 0, 0,  0, 1, 0, 0,  0, 0, 1, 0};
  set.num_queries = 1;
  set.queries = {2, 0, 0, 0};  // logits 2, 0, 0
  return set;
}

TEST(AttentionEvalTest, FullAttentionAndSetQualityMatchHandComputation) {
  const EvalSet set = TinySet();
  const FullAttention full = ComputeFullAttention(set, 1);
  const double z = std::exp(2.0) + 2.0;
  EXPECT_NEAR(full.lse[0], std::log(z), 1e-9);
  EXPECT_NEAR(full.out[0], std::exp(2.0) / z, 1e-6);
  EXPECT_NEAR(full.out[1], 1.0 / z, 1e-6);

  const int64_t only_first[] = {0};
  const SetQuality q1 = EvaluateSet(set, full, 0, only_first, 1);
  EXPECT_NEAR(q1.mass, std::exp(2.0) / z, 1e-9);
  // o_S = v_0 = (1,0,0,0); o* = (e^2, 1, 1, 0) / z.
  const double e0 = 1 - std::exp(2.0) / z, e1 = 1 / z;
  EXPECT_NEAR(q1.out_rel_err,
              std::sqrt(e0 * e0 + 2 * e1 * e1) / std::sqrt(std::exp(4.0) + 2) * z, 1e-6);

  const int64_t all[] = {2, -1, 0, 1};  // -1 entries are ignored
  const SetQuality q_all = EvaluateSet(set, full, 0, all, 4);
  EXPECT_NEAR(q_all.mass, 1.0, 1e-9);
  EXPECT_NEAR(q_all.out_rel_err, 0.0, 1e-6);
}

TEST(AttentionEvalTest, RecallCountsHitsOfTheTruePrefix) {
  const int64_t truth[] = {5, 6, 7, 8};
  const int64_t got[] = {8, 1, -1, 5};
  EXPECT_DOUBLE_EQ(RecallAt(got, 4, truth, 2), 0.5);  // 5 of {5, 6}
  EXPECT_DOUBLE_EQ(RecallAt(got, 4, truth, 4), 0.5);  // 8 and 5
}

TEST(AttentionEvalTest, LoadCaptureSplitsPrefixTrainingAndDecode) {
  // A capture with 4 query heads, 2 KV heads, 10 positions, d = 2, where
  // element value = head * 100 + position (+0.5 in the second dim).
  const std::string dir = ::kvrecall::testing::MakeTempDir();
  auto write = [&](const std::string& name, int64_t heads) {
    NpyArray a;
    a.descr = "<f2";
    a.shape = {heads, 10, 2};
    std::vector<uint16_t> v;
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t t = 0; t < 10; ++t) {
        v.push_back(FloatToHalf(static_cast<float>(h * 100 + t)));
        v.push_back(FloatToHalf(static_cast<float>(h * 100 + t) + 0.5f));
      }
    }
    a.data.assign(reinterpret_cast<const char*>(v.data()), v.size() * 2);
    KVR_ASSERT_OK(WriteNpy(dir + "/" + name, a));
  };
  write("layer02_q.npy", 4);
  write("layer02_k.npy", 2);
  write("layer02_v.npy", 2);
  KVR_ASSERT_OK_AND_ASSIGN(EvalSet set, LoadCapture(dir, 2, 1, 3));
  EXPECT_EQ(set.num_keys, 7);
  EXPECT_EQ(set.num_queries, 6);    // 2 query heads x 3 decode positions
  EXPECT_EQ(set.num_training, 14);  // 2 query heads x 7 prefix positions
  EXPECT_EQ(HalfToFloat(set.keys[0]), 100.0f);  // KV head 1, position 0
  EXPECT_EQ(set.values[2 * 6], 106.0f);         // position 6
  // Query heads 2 and 3 serve KV head 1; decode queries are positions 7..9.
  EXPECT_EQ(set.queries[0], 207.0f);
  EXPECT_EQ(set.queries[2 * 3], 307.0f);
  uint16_t first_training;
  std::memcpy(&first_training, set.training.data(), 2);
  EXPECT_EQ(HalfToFloat(first_training), 200.0f);
  EXPECT_THAT(LoadCapture(dir, 3, 0, 3).status(), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(LoadCapture(dir, 2, 2, 3).status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::bench
