#include "common/checksum.h"

#include <string>

#include "gtest/gtest.h"

namespace kvrecall {
namespace {

TEST(ChecksumTest, KnownValueAndSensitivity) {
  // XXH3-64 of the empty input with seed 0 (xxHash reference value).
  EXPECT_EQ(Checksum64(""), 0x2D06800538D394C2ULL);
  std::string data(1000, 'a');
  const uint64_t c = Checksum64(data);
  data[500] ^= 1;
  EXPECT_NE(Checksum64(data), c);
}

TEST(ChecksumTest, BuilderEqualsOneShot) {
  std::string data;
  for (int i = 0; i < 5000; ++i) data.push_back(static_cast<char>(i * 31));
  Checksum64Builder b;
  b.Update(absl::string_view(data).substr(0, 17));
  b.Update(absl::string_view(data).substr(17, 3000));
  b.Update(absl::string_view(data).substr(3017));
  EXPECT_EQ(b.Digest(), Checksum64(data));
}

}  // namespace
}  // namespace kvrecall
