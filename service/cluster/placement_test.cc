#include "service/cluster/placement.h"

#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::cluster {
namespace {

using ::kvrecall::testing::StatusIs;

// The shared vectors are computed by tests/vectors/make_placement_vectors.py
// from the specification alone; the Python client passes the same file.
TEST(PlacementTest, MatchesTheSharedVectors) {
  std::ifstream in(kvrecall::testing::SourceDir() + "/tests/vectors/placement_vectors.tsv");
  ASSERT_TRUE(in) << "tests/vectors/placement_vectors.tsv is missing";
  std::string line;
  int rows = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::vector<std::string> cols = absl::StrSplit(line, '\t');
    ASSERT_EQ(cols.size(), 3u) << line;
    absl::StatusOr<Hash128> key = Hash128::FromHex(cols[0]);
    ASSERT_TRUE(key.ok()) << line;
    std::vector<std::string> nodes = absl::StrSplit(cols[1], ',');
    std::vector<std::string> order = absl::StrSplit(cols[2], ',');
    EXPECT_EQ(PlacementOrder(*key, nodes), order) << line;
    EXPECT_EQ(Owners(*key, nodes, 2),
              std::vector<std::string>(order.begin(), order.begin() + std::min<size_t>(2, order.size())))
        << line;
    ++rows;
  }
  EXPECT_GE(rows, 80);
}

TEST(PlacementTest, OrderDoesNotDependOnTheInputOrder) {
  std::vector<std::string> nodes = {"n3", "n1", "n4", "n2"};
  std::vector<std::string> sorted = {"n1", "n2", "n3", "n4"};
  const Hash128 key{0x0123456789abcdefULL, 0xfedcba9876543210ULL};
  EXPECT_EQ(PlacementOrder(key, nodes), PlacementOrder(key, sorted));
}

// Rendezvous hashing moves only the keys a joining node takes, and spreads
// owners evenly.
TEST(PlacementTest, AddingANodeMovesOnlyItsShareAndLoadIsEven) {
  std::mt19937_64 rng(7);
  const std::vector<std::string> three = {"n1", "n2", "n3"};
  const std::vector<std::string> four = {"n1", "n2", "n3", "n4"};
  constexpr int kKeys = 20000;
  int moved_primary = 0, moved_to_other = 0;
  std::map<std::string, int> primaries;
  for (int i = 0; i < kKeys; ++i) {
    const Hash128 key{rng(), rng()};
    const std::string before = Owners(key, three, 1)[0];
    const std::string after = Owners(key, four, 1)[0];
    ++primaries[after];
    if (before != after) {
      ++moved_primary;
      if (after != "n4") ++moved_to_other;
    }
  }
  EXPECT_EQ(moved_to_other, 0);  // a key only ever moves to the new node
  EXPECT_NEAR(moved_primary, kKeys / 4, kKeys / 40);
  for (const auto& [node, n] : primaries) EXPECT_NEAR(n, kKeys / 4, kKeys / 40) << node;
}

TEST(PlacementTest, OwnersAreAtMostTheNodes) {
  const Hash128 key{1, 2};
  EXPECT_EQ(Owners(key, std::vector<std::string>{"a"}, 2).size(), 1u);
  EXPECT_TRUE(Owners(key, std::vector<std::string>{}, 2).empty());
  EXPECT_EQ(Owners(key, std::vector<std::string>{"a", "b", "c"}, 3).size(), 3u);
}

TEST(PlacementTest, NodeIdsAreValidated) {
  KVR_EXPECT_OK(ValidateNodeId("kvrecalld-0.rack_1"));
  EXPECT_THAT(ValidateNodeId(""), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateNodeId("a/b"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateNodeId("a,b"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateNodeId(std::string(65, 'x')), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::cluster
