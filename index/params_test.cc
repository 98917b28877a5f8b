#include "index/params.h"

#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::index {
namespace {

using ::kvrecall::testing::StatusIs;

TEST(ParamMapTest, ParsesAndRoundTrips) {
  KVR_ASSERT_OK_AND_ASSIGN(ParamMap p, ParamMap::Parse(" M=35, ef = 500 ,name=x"));
  EXPECT_EQ(*p.GetInt("M", 0), 35);
  EXPECT_EQ(*p.GetInt("ef", 0), 500);
  EXPECT_EQ(*p.GetInt("absent", 7), 7);
  EXPECT_EQ(p.GetString("name", ""), "x");
  KVR_ASSERT_OK_AND_ASSIGN(ParamMap q, ParamMap::Parse(p.ToString()));
  EXPECT_EQ(p, q);
  KVR_ASSERT_OK_AND_ASSIGN(ParamMap empty, ParamMap::Parse(""));
  EXPECT_TRUE(empty.empty());
}

TEST(ParamMapTest, RejectsBadInput) {
  EXPECT_THAT(ParamMap::Parse("M"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParamMap::Parse("M=1,M=2"), StatusIs(absl::StatusCode::kInvalidArgument));
  KVR_ASSERT_OK_AND_ASSIGN(ParamMap p, ParamMap::Parse("M=abc,ef=5,r=0.5"));
  EXPECT_THAT(p.GetInt("M", 0), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(p.GetInt("ef", 0, 10, 100), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_NEAR(*p.GetDouble("r", 0), 0.5, 1e-12);
  EXPECT_THAT(p.CheckKnown("roar", {"M", "ef"}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("'r'")));
  KVR_EXPECT_OK(p.CheckKnown("roar", {"M", "ef", "r"}));
}

}  // namespace
}  // namespace kvrecall::index
