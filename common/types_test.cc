#include "common/types.h"

#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall {
namespace {

using ::kvrecall::testing::StatusIs;

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBf16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  for (DType d : {DType::kF16, DType::kBf16, DType::kF32}) {
    auto parsed = ParseDType(DTypeName(d));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_EQ(*ParseDType("float16"), DType::kF16);
  EXPECT_EQ(*ParseDType("BFloat16"), DType::kBf16);
  EXPECT_THAT(ParseDType("int8"), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(Hash128Test, CanonicalBytesAreBigEndian) {
  Hash128 h{0x0102030405060708ULL, 0x090a0b0c0d0e0f10ULL};
  EXPECT_EQ(h.ToHex(), "0102030405060708090a0b0c0d0e0f10");
  auto back = Hash128::FromBytes(h.ToBytes());
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, h);
  auto hex = Hash128::FromHex("0102030405060708090A0B0C0D0E0F10");
  ASSERT_TRUE(hex.ok());
  EXPECT_EQ(*hex, h);
}

TEST(Hash128Test, RejectsBadInput) {
  EXPECT_THAT(Hash128::FromBytes("short"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Hash128::FromHex("xyz"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Hash128::FromHex(std::string(32, 'g')),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall
