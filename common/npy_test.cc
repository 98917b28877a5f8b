#include "common/npy.h"

#include <fstream>

#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall {
namespace {

using ::kvrecall::testing::StatusIs;

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

TEST(NpyTest, ReadsRealCapture) {
  const std::string path = testing::SharedDir() + "/data/attn-dev/layer03_k.npy";
  if (!std::ifstream(path).good()) KVR_SKIP_WITHOUT_SHARED_DATA("no capture at " << path);
  KVR_ASSERT_OK_AND_ASSIGN(NpyArray k, ReadNpy(path));
  EXPECT_EQ(k.descr, "<f2");
  EXPECT_EQ(k.shape, (std::vector<int64_t>{2, 8192, 128}));
}

}  // namespace
}  // namespace kvrecall
