#include "common/span_hash.h"

#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "tests/testing/test_data.h"

namespace kvrecall {
namespace {

// The shared vectors are computed by tests/vectors/make_span_hash_vectors.py
// with python3-xxhash straight from the spec; the Python client passes them too.
TEST(SpanHashTest, MatchesSharedVectors) {
  const std::string path = testing::SourceDir() + "/tests/vectors/span_hash_vectors.tsv";
  std::ifstream in(path);
  ASSERT_TRUE(in.good()) << path;
  std::string line;
  int cases = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::vector<std::string> cols = absl::StrSplit(line, '\t');
    ASSERT_EQ(cols.size(), 7u) << line;
    uint32_t block = 0;
    ASSERT_TRUE(absl::SimpleAtoi(cols[2], &block));
    const bool partial = cols[3] == "1";
    std::vector<uint32_t> tokens;
    for (absl::string_view t : absl::StrSplit(cols[4], ',', absl::SkipEmpty())) {
      uint32_t v;
      ASSERT_TRUE(absl::SimpleAtoi(t, &v));
      tokens.push_back(v);
    }
    EXPECT_EQ(SpanRootHash(cols[0], cols[1]).ToHex(), cols[5]) << cols[0];
    const std::vector<Hash128> got = ChainSpanHashes(cols[0], cols[1], tokens, block, partial);
    std::vector<std::string> want = absl::StrSplit(cols[6], ',', absl::SkipEmpty());
    ASSERT_EQ(got.size(), want.size()) << cols[0];
    for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i].ToHex(), want[i]) << i;
    ++cases;
  }
  EXPECT_GE(cases, 8);
}

TEST(SpanHashTest, ChainDependsOnEveryInput) {
  std::vector<uint32_t> tokens(64);
  for (uint32_t i = 0; i < tokens.size(); ++i) tokens[i] = i;
  const auto base = ChainSpanHashes("m", "", tokens, 16, false);
  ASSERT_EQ(base.size(), 4u);
  EXPECT_NE(ChainSpanHashes("m2", "", tokens, 16, false)[0], base[0]);
  EXPECT_NE(ChainSpanHashes("m", "s", tokens, 16, false)[0], base[0]);
  tokens[0] = 99;  // changing the first block changes every later hash
  const auto changed = ChainSpanHashes("m", "", tokens, 16, false);
  for (size_t i = 0; i < base.size(); ++i) EXPECT_NE(changed[i], base[i]);
  EXPECT_EQ(SpanHash(SpanRootHash("m"), absl::MakeConstSpan(tokens).subspan(0, 16)), changed[0]);
}

}  // namespace
}  // namespace kvrecall
