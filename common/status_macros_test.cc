#include "common/status_macros.h"

#include <memory>

#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall {
namespace {

using ::kvrecall::testing::IsOk;
using ::kvrecall::testing::StatusIs;

absl::Status FailIf(bool fail) {
  return fail ? absl::InvalidArgumentError("failed") : absl::OkStatus();
}

absl::Status Chain(bool fail, int* reached) {
  KVR_RETURN_IF_ERROR(FailIf(fail));
  ++*reached;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<int>> MakeInt(bool fail) {
  if (fail) return absl::NotFoundError("no int");
  return std::make_unique<int>(7);
}

absl::StatusOr<int> UseInt(bool fail) {
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<int> p, MakeInt(fail));
  int existing = 0;
  KVR_ASSIGN_OR_RETURN(existing, absl::StatusOr<int>(*p + 1));
  return existing;
}

TEST(StatusMacrosTest, ReturnIfErrorStopsOnError) {
  int reached = 0;
  EXPECT_THAT(Chain(true, &reached), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(reached, 0);
  EXPECT_THAT(Chain(false, &reached), IsOk());
  EXPECT_EQ(reached, 1);
}

TEST(StatusMacrosTest, AssignOrReturnMovesValueOrPropagates) {
  EXPECT_THAT(UseInt(true), StatusIs(absl::StatusCode::kNotFound));
  auto v = UseInt(false);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 8);
}

}  // namespace
}  // namespace kvrecall
