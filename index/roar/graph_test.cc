#include "index/roar/graph.h"

#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "index/distance.h"

namespace kvrecall::index::roar {
namespace {

KeyStore RandomKeys(std::mt19937& rng, int64_t n, int32_t d) {
  std::normal_distribution<float> dist;
  std::vector<float> v(n * d);
  for (float& x : v) x = dist(rng);
  KeyStore keys(d, DType::kF32);
  keys.Append(v.data(), DType::kF32, n, d);
  return keys;
}

TEST(VisitedSetTest, ClearForgetsAndSurvivesEpochWrap) {
  VisitedSet set(10);
  set.Clear();
  EXPECT_TRUE(set.Insert(3));
  EXPECT_FALSE(set.Insert(3));
  for (int i = 0; i < 70000; ++i) set.Clear();  // wraps the 16-bit epoch
  EXPECT_TRUE(set.Insert(3));
  EXPECT_TRUE(set.Insert(4));
  EXPECT_FALSE(set.Insert(4));
}

TEST(AdjacencyListsTest, SetAppendAndCapacity) {
  AdjacencyLists g(3);
  g.Resize(4);
  const uint32_t a[] = {1, 2};
  g.Set(0, a);
  EXPECT_TRUE(g.Append(0, 3));
  EXPECT_FALSE(g.Append(0, 3));  // full
  EXPECT_EQ(g.Neighbors(0).size(), 3u);
  EXPECT_EQ(g.Neighbors(0)[2], 3u);
  EXPECT_TRUE(g.Neighbors(1).empty());
  g.Resize(6);
  EXPECT_EQ(g.Neighbors(0).size(), 3u);
  EXPECT_TRUE(g.Neighbors(5).empty());
  EXPECT_EQ(g.TotalEdges(), 3);
}

TEST(BeamSearchTest, CompleteGraphGivesExactTopAndHonoursExclusion) {
  const uint32_t seed = 11;
  std::mt19937 rng(seed);
  const int32_t d = 16;
  const int64_t n = 200;
  KeyStore keys = RandomKeys(rng, n, d);
  AdjacencyLists g(static_cast<int32_t>(n));
  g.Resize(n);
  std::vector<uint32_t> all(n);
  for (int64_t i = 0; i < n; ++i) all[i] = static_cast<uint32_t>(i);
  for (int64_t i = 0; i < n; ++i) g.Set(i, all);
  std::vector<float> q(d);
  for (float& x : q) x = std::normal_distribution<float>()(rng);
  auto exclude = ExcludeSet::Create({{0, 50}}, n);
  ASSERT_TRUE(exclude.ok());
  VisitedSet visited(n);
  visited.Clear();
  std::vector<Scored> out;
  SearchCounters counters;
  const uint32_t ep = 7;  // inside the excluded range: traversed, not returned
  BeamSearch(keys, g, absl::MakeConstSpan(&ep, 1), q.data(), 10, &*exclude, &visited, &out,
             &counters);
  TopK ref(10);
  for (int64_t i = 50; i < n; ++i) ref.Push(DotRow(q.data(), keys.row(i), DType::kF32, d), i);
  int64_t ids[10];
  float scores[10];
  ref.Drain(ids, scores);
  ASSERT_EQ(out.size(), 10u) << "seed " << seed;
  for (int j = 0; j < 10; ++j) {
    EXPECT_EQ(out[j].id, ids[j]) << "seed " << seed;
    EXPECT_EQ(out[j].score, scores[j]);
  }
  EXPECT_EQ(counters.scored, n);  // every node scored exactly once
}

TEST(OcclusionPruneTest, DropsOccludedCandidatesAndTopsUp) {
  // Target t along x. c1 scores best; c2 is occluded by it (c2·c1 = 1.2 >
  // c2·t = 0.9); c3 points the other way in y (c3·c1 = 0 < c3·t = 0.5).
  KeyStore keys(2, DType::kF32);
  const float rows[] = {1, 0,          // 0: target
                        1, 0.5f,       // 1
                        0.9f, 0.6f,    // 2
                        0.5f, -1};     // 3
  keys.Append(rows, DType::kF32, 4, 2);
  std::vector<Scored> cands = {{1.0f, 1}, {0.9f, 2}, {0.5f, 3}};
  std::vector<uint32_t> out;
  OcclusionPrune(keys, cands, 3, /*top_up=*/false, &out);
  EXPECT_EQ(out, (std::vector<uint32_t>{1, 3}));
  OcclusionPrune(keys, cands, 3, /*top_up=*/true, &out);
  EXPECT_EQ(out, (std::vector<uint32_t>{1, 3, 2}));
  OcclusionPrune(keys, cands, 1, /*top_up=*/true, &out);
  EXPECT_EQ(out, (std::vector<uint32_t>{1}));
}

}  // namespace
}  // namespace kvrecall::index::roar
