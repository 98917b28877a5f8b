#include "index/index_format.h"

#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::index {
namespace {

using ::kvrecall::testing::StatusIs;

TEST(IndexFormatTest, RoundTripAndCorruption) {
  IndexHeader h;
  h.kind = "flat";
  h.dim = 128;
  h.size = 1000;
  h.key_dtype = DType::kF16;
  h.build_params.SetInt("M", 35);
  std::string payload;
  ByteWriter w(&payload);
  w.Put<int32_t>(-5);
  w.PutString("hello");
  w.PutVector(std::vector<float>{1, 2, 3});
  const std::string bytes = EncodeIndex(h, payload);

  KVR_ASSERT_OK_AND_ASSIGN(auto decoded, DecodeIndex(bytes));
  EXPECT_EQ(decoded.first.kind, "flat");
  EXPECT_EQ(decoded.first.dim, 128);
  EXPECT_EQ(decoded.first.size, 1000);
  EXPECT_EQ(decoded.first.key_dtype, DType::kF16);
  EXPECT_EQ(decoded.first.build_params, h.build_params);
  ByteReader r(decoded.second);
  EXPECT_EQ(*r.Get<int32_t>(), -5);
  EXPECT_EQ(*r.GetString(), "hello");
  EXPECT_EQ(*r.GetVector<float>(), (std::vector<float>{1, 2, 3}));
  EXPECT_THAT(r.Get<int32_t>(), StatusIs(absl::StatusCode::kDataLoss));

  std::string flipped = bytes;
  flipped.back() ^= 1;
  EXPECT_THAT(DecodeIndex(flipped), StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(DecodeIndex(bytes.substr(0, bytes.size() - 2)),
              StatusIs(absl::StatusCode::kDataLoss));
  EXPECT_THAT(DecodeIndex("garbage garbage garbage"), StatusIs(absl::StatusCode::kDataLoss));
  std::string future = bytes;
  future[8] = 9;
  EXPECT_THAT(DecodeIndex(future), StatusIs(absl::StatusCode::kFailedPrecondition));
}

}  // namespace
}  // namespace kvrecall::index
