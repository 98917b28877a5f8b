#include "index/search_input.h"

#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::index {
namespace {

using ::kvrecall::testing::StatusIs;
using Runs = std::vector<std::pair<int64_t, int64_t>>;

Runs IncludedRunsOf(const ExcludeSet& set) {
  Runs out;
  for (const PositionRange& r : set.IncludedRuns()) out.emplace_back(r.begin, r.end);
  return out;
}

TEST(ExcludeSetTest, ContainsAndCountsClippedRanges) {
  KVR_ASSERT_OK_AND_ASSIGN(ExcludeSet set, ExcludeSet::Create({{0, 4}, {10, 12}, {18, 40}}, 20));
  EXPECT_TRUE(set.Contains(0));
  EXPECT_TRUE(set.Contains(3));
  EXPECT_FALSE(set.Contains(4));
  EXPECT_TRUE(set.Contains(11));
  EXPECT_FALSE(set.Contains(12));
  EXPECT_TRUE(set.Contains(19));
  EXPECT_EQ(set.included(), 20 - 4 - 2 - 2);
  EXPECT_EQ(set.CountExcluded(2, 11), 2 + 1);
  EXPECT_EQ(set.CountExcluded(4, 10), 0);
  EXPECT_EQ(set.ranges().back().end, 20);
  EXPECT_EQ(IncludedRunsOf(set), (Runs{{4, 10}, {12, 18}}));
}

TEST(ExcludeSetTest, IncludedRunsAreTheComplement) {
  KVR_ASSERT_OK_AND_ASSIGN(ExcludeSet none, ExcludeSet::Create({}, 7));
  EXPECT_EQ(IncludedRunsOf(none), (Runs{{0, 7}}));
  KVR_ASSERT_OK_AND_ASSIGN(ExcludeSet inner, ExcludeSet::Create({{2, 3}, {30, 40}}, 7));
  EXPECT_EQ(IncludedRunsOf(inner), (Runs{{0, 2}, {3, 7}}));
  KVR_ASSERT_OK_AND_ASSIGN(ExcludeSet all, ExcludeSet::Create({{0, 7}}, 7));
  EXPECT_EQ(IncludedRunsOf(all), Runs{});
}

TEST(ExcludeSetTest, RejectsUnsortedOverlappingOrEmptyRanges) {
  EXPECT_THAT(ExcludeSet::Create({{5, 8}, {2, 3}}, 10).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ExcludeSet::Create({{0, 5}, {4, 6}}, 10).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ExcludeSet::Create({{3, 3}}, 10).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ExcludeSet::Create({{-1, 3}}, 10).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  KVR_EXPECT_OK(ExcludeSet::Create({{0, 5}, {5, 6}}, 10).status());  // adjacent is fine
}

TEST(ValidateVectorsTest, RejectsMalformedViews) {
  float data[4] = {};
  EXPECT_THAT(ValidateVectors("keys", VectorView::F32(data, 1, 4), 3),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateVectors("keys", VectorView::F32(nullptr, 1, 4), 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateVectors("keys", VectorView{data, 1, 4, DType::kF32, 2}, 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateVectors("keys", VectorView::F32(data, 1, 0), -1),
              StatusIs(absl::StatusCode::kInvalidArgument));
  KVR_EXPECT_OK(ValidateVectors("keys", VectorView::Empty(4), 4));
  KVR_EXPECT_OK(ValidateVectors("keys", VectorView::F32(data, 1, 4), -1));
}

}  // namespace
}  // namespace kvrecall::index
