#include "common/npy.h"

#include <fstream>

#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

TEST(NpyTest, RoundTrip) {
  NpyArray a;
  a.descr = "<f4";
  a.shape = {2, 3};
  const float values[6] = {1, 2, 3, 4, 5, 6};
  a.data.assign(reinterpret_cast<const char*>(values), sizeof(values));
  const std::string dir = testing::MakeTempDir();
  KVR_ASSERT_OK(WriteNpy(dir + "/a.npy", a));
  KVR_ASSERT_OK_AND_ASSIGN(NpyArray b, ReadNpy(dir + "/a.npy"));
  EXPECT_EQ(b.descr, "<f4");
  EXPECT_EQ(b.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(b.data, a.data);
  EXPECT_EQ(b.as<float>()[5], 6.0f);
}

TEST(NpyTest, OneDimensionalShapeHasTrailingComma) {
  NpyArray a;
  a.descr = "<i4";
  a.shape = {3};
  a.data.assign(12, '\0');
  KVR_ASSERT_OK_AND_ASSIGN(std::string bytes, SerializeNpy(a));
  EXPECT_NE(bytes.find("'shape': (3,)"), std::string::npos);
  EXPECT_EQ((bytes.size() - a.data.size()) % 64, 0u);
  KVR_ASSERT_OK_AND_ASSIGN(NpyArray b, ParseNpy(bytes));
  EXPECT_EQ(b.shape, (std::vector<int64_t>{3}));
}

TEST(NpyTest, RejectsBadFiles) {
  EXPECT_THAT(ParseNpy("not numpy"), StatusIs(absl::StatusCode::kInvalidArgument));
  NpyArray a;
  a.descr = "<f2";
  a.shape = {4};
  a.data.assign(8, '\0');
  KVR_ASSERT_OK_AND_ASSIGN(std::string bytes, SerializeNpy(a));
  EXPECT_THAT(ParseNpy(bytes.substr(0, bytes.size() - 1)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ReadNpy("/nonexistent/x.npy"), StatusIs(absl::StatusCode::kNotFound));
}

// Found by npy_fuzz (UBSan: signed overflow in num_elements): a shape whose
// product wraps to the size of the data present was accepted, an array of
// 2^64 elements over 16 bytes.
TEST(NpyTest, AShapeLargerThanTheDataIsRefusedWithoutOverflow) {
  auto npy = [](const std::string& shape, size_t data_bytes) {
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
    header.append((64 - (10 + header.size() + 1) % 64) % 64, ' ');
    header += '\n';
    std::string bytes("\x93NUMPY\x01\x00", 8);
    bytes += static_cast<char>(header.size() & 0xff);
    bytes += static_cast<char>(header.size() >> 8);
    return bytes + header + std::string(data_bytes, '\0');
  };
  KVR_EXPECT_OK(ParseNpy(npy("(2, 2)", 16)).status());
  // 2^62 x 4 elements of 4 bytes: 2^66 bytes, 0 modulo 2^64.
  EXPECT_THAT(ParseNpy(npy("(4611686018427387904, 4)", 0)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("needs more than")));
  EXPECT_THAT(ParseNpy(npy("(4611686018427387905, 4)", 16)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // A zero dimension: no elements, whatever the others are.
  KVR_ASSERT_OK_AND_ASSIGN(NpyArray empty, ParseNpy(npy("(9223372036854775807, 4, 0)", 0)));
  EXPECT_EQ(empty.num_elements(), 0);
}

TEST(NpyTest, ReadsRealCapture) {
  const std::string path = testing::SharedDir() + "/data/attn-dev/layer03_k.npy";
  if (!std::ifstream(path).good()) KVR_SKIP_WITHOUT_SHARED_DATA("no capture at " << path);
  KVR_ASSERT_OK_AND_ASSIGN(NpyArray k, ReadNpy(path));
  EXPECT_EQ(k.descr, "<f2");
  EXPECT_EQ(k.shape, (std::vector<int64_t>{2, 8192, 128}));
}

}  // namespace
}  // namespace kvrecall
