// HyLRA: the dynamic program against brute force, the profiler against a
// direct float64 computation and on data whose answer is known, the planner,
// and a profile of the real attn-dev capture.

#include "gpu/worker/hylra.h"

#include <cmath>
#include <filesystem>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "common/npy.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::worker {
namespace {

using ::testing::HasSubstr;

// --- the dynamic program --------------------------------------------------------

struct Value {
  double worst;
  double total;
  int32_t compute;
};

// The objective of an assignment, straight from the definition.
Value Evaluate(const std::vector<LayerMatrix>& scores, const std::vector<int32_t>& source) {
  Value v{std::numeric_limits<double>::infinity(), 0, 0};
  for (size_t j = 0; j < source.size(); ++j) {
    if (source[j] == static_cast<int32_t>(j)) ++v.compute;
    for (const LayerMatrix& m : scores) {
      const double a = source[j] == static_cast<int32_t>(j) ? 1.0 : m[source[j]][j];
      v.worst = std::min(v.worst, a);
      v.total += a;
    }
  }
  return v;
}

// Every source assignment with source[j] <= j, kept when it forms segments
// (each layer starts one or continues the previous layer's) within budget.
Value BruteForce(const std::vector<LayerMatrix>& scores, int32_t max_compute,
                 const std::vector<bool>& must) {
  const size_t n = must.size();
  std::vector<int32_t> source(n, 0);
  Value best{-1, -1, 0};
  bool found = false;
  std::function<void(size_t)> rec = [&](size_t j) {
    if (j == n) {
      for (size_t l = 0; l < n; ++l) {
        const bool start = source[l] == static_cast<int32_t>(l);
        if ((l == 0 || must[l]) && !start) return;
        if (l > 0 && !start && source[l] != source[l - 1]) return;
      }
      const Value v = Evaluate(scores, source);
      if (v.compute > max_compute) return;
      if (!found || v.worst > best.worst || (v.worst == best.worst && v.total > best.total + 1e-12)) {
        best = v;
        found = true;
      }
      return;
    }
    for (int32_t s = 0; s <= static_cast<int32_t>(j); ++s) {
      source[j] = s;
      rec(j + 1);
    }
  };
  rec(0);
  return best;
}

TEST(BestPathMinSumTest, MatchesBruteForceOnRandomMatrices) {
  const uint32_t seed = 20250207;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  int checked = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const size_t n = 1 + trial % 7;
    const size_t sets = 1 + (trial / 7) % 2;
    std::vector<LayerMatrix> scores(sets, LayerMatrix(n, std::vector<double>(n, 0.0)));
    for (auto& m : scores) {
      for (size_t i = 0; i < n; ++i) {
        m[i][i] = 1.0;
        // Coarse values make exact ties (the lexicographic rule) common.
        for (size_t j = i + 1; j < n; ++j) m[i][j] = std::round(uni(rng) * 8) / 8;
      }
    }
    std::vector<bool> must(n, false);
    if (trial % 3 == 2) {
      for (size_t j = 1; j < n; ++j) must[j] = uni(rng) < 0.25;
    }
    int32_t forced = 1;
    for (size_t j = 1; j < n; ++j) forced += must[j];
    for (int32_t c = forced; c <= static_cast<int32_t>(n) + 1; ++c) {
      SCOPED_TRACE(::testing::Message() << "seed " << seed << " trial " << trial << " n " << n
                                        << " sets " << sets << " max_compute " << c);
      KVR_ASSERT_OK_AND_ASSIGN(ReusePath path, BestPathMinSum(scores, c, must));
      const Value want = BruteForce(scores, c, must);
      EXPECT_NEAR(path.worst, want.worst, 1e-12);
      EXPECT_NEAR(path.total, want.total, 1e-9);
      // The path is valid and achieves what it claims.
      ASSERT_EQ(path.source.size(), n);
      EXPECT_EQ(path.source[0], 0);
      for (size_t j = 1; j < n; ++j) {
        const bool start = path.source[j] == static_cast<int32_t>(j);
        EXPECT_TRUE(start || path.source[j] == path.source[j - 1]) << j;
        if (must[j]) {
          EXPECT_TRUE(start) << j;
        }
      }
      const Value got = Evaluate(scores, path.source);
      EXPECT_NEAR(got.worst, path.worst, 1e-12);
      EXPECT_NEAR(got.total, path.total, 1e-9);
      EXPECT_EQ(got.compute, path.num_compute);
      EXPECT_LE(path.num_compute, c);
      ++checked;
    }
  }
  EXPECT_GT(checked, 200);
}

TEST(BestPathMinSumTest, TiesGoToFewerComputeLayers) {
  // Every reuse scores 1: one compute layer is as good as seven.
  LayerMatrix ones(7, std::vector<double>(7, 1.0));
  KVR_ASSERT_OK_AND_ASSIGN(ReusePath path, BestPathMinSum({ones}, 7, std::vector<bool>(7, false)));
  EXPECT_EQ(path.num_compute, 1);
  EXPECT_EQ(path.source, std::vector<int32_t>(7, 0));
  EXPECT_EQ(path.worst, 1.0);
}

TEST(BestPathMinSumTest, RejectsBadInput) {
  LayerMatrix m(3, std::vector<double>(3, 0.5));
  EXPECT_THAT(BestPathMinSum({m}, 1, {false, true, false}).status().message(),
              HasSubstr("max_compute=1 is below the 2 layers that must compute"));
  EXPECT_EQ(BestPathMinSum({m}, 2, {false, false}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BestPathMinSum({}, 2, {false, false, false}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// --- steps --------------------------------------------------------------------------

TEST(StepSelectionTest, ParsesAndResolves) {
  KVR_ASSERT_OK_AND_ASSIGN(StepSelection last, ParseStepSelection("last:3"));
  EXPECT_EQ(last.Resolve(10).value(), (std::vector<int64_t>{7, 8, 9}));
  EXPECT_EQ(last.Resolve(2).value(), (std::vector<int64_t>{0, 1}));
  KVR_ASSERT_OK_AND_ASSIGN(StepSelection every, ParseStepSelection("every:32"));
  KVR_ASSERT_OK_AND_ASSIGN(std::vector<int64_t> e, every.Resolve(256));
  EXPECT_EQ(e.front(), 159);
  EXPECT_EQ(e.back(), 255);
  EXPECT_EQ(e.size(), 4u);
  KVR_ASSERT_OK_AND_ASSIGN(StepSelection list, ParseStepSelection("9, 3,3"));
  EXPECT_EQ(list.Resolve(10).value(), (std::vector<int64_t>{3, 9}));
  EXPECT_THAT(list.Resolve(5).status().message(), HasSubstr("position 9 is outside [0, 5)"));
  EXPECT_EQ(list.ToString(), "9,3,3");
  EXPECT_EQ(every.ToString(), "every:32");
  for (const char* bad : {"", "last:", "last:0", "every:x", "1,,-2", "first:3"}) {
    EXPECT_EQ(ParseStepSelection(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

// --- the profiler ---------------------------------------------------------------------

std::vector<float> Gaussian(size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

CaptureLayer RandomLayer(int32_t layer, int32_t hq, int32_t hkv, int64_t t, int32_t d,
                         std::mt19937& rng, float q_scale) {
  CaptureLayer c;
  c.layer = layer;
  c.num_q_heads = hq;
  c.num_kv_heads = hkv;
  c.num_tokens = t;
  c.head_dim = d;
  c.q = Gaussian(static_cast<size_t>(hq) * t * d, rng, q_scale);
  c.k = Gaussian(static_cast<size_t>(hkv) * t * d, rng, 1.0f);
  c.v = Gaussian(static_cast<size_t>(hkv) * t * d, rng, 1.0f);
  return c;
}

// The profile's quantities for one (step, q head), from their definitions,
// in float64 with std::set.
struct Direct {
  std::vector<std::set<int64_t>> topk;   // per layer
  std::vector<std::vector<double>> p;    // per layer, probabilities
  std::vector<std::vector<double>> o;    // per layer, full output
};

Direct DirectStep(const std::vector<CaptureLayer>& layers, int64_t t, int32_t h,
                  const HylraProfileOptions& o) {
  Direct r;
  const int64_t n = t + 1;
  const int64_t sinks_end = std::min<int64_t>(o.sinks, n);
  const int64_t window_begin = std::max<int64_t>(sinks_end, n - o.window);
  for (const CaptureLayer& c : layers) {
    const int32_t d = c.head_dim, g = h / (c.num_q_heads / c.num_kv_heads);
    std::vector<double> logit(n), p(n);
    for (int64_t s = 0; s < n; ++s) {
      double dot = 0;
      for (int32_t x = 0; x < d; ++x) {
        dot += double(c.q[(h * c.num_tokens + t) * d + x]) * c.k[(g * c.num_tokens + s) * d + x];
      }
      logit[s] = dot / std::sqrt(double(d));
    }
    const double mx = *std::max_element(logit.begin(), logit.end());
    double z = 0;
    for (int64_t s = 0; s < n; ++s) z += p[s] = std::exp(logit[s] - mx);
    for (double& x : p) x /= z;
    std::vector<double> out(d, 0.0);
    for (int64_t s = 0; s < n; ++s) {
      for (int32_t x = 0; x < d; ++x) out[x] += p[s] * c.v[(g * c.num_tokens + s) * d + x];
    }
    std::vector<int64_t> cand;
    for (int64_t s = sinks_end; s < window_begin; ++s) cand.push_back(s);
    std::stable_sort(cand.begin(), cand.end(), [&](int64_t a, int64_t b) { return logit[a] > logit[b]; });
    const int64_t k = std::min<int64_t>(o.budget.Resolve(n), static_cast<int64_t>(cand.size()));
    r.topk.emplace_back(cand.begin(), cand.begin() + k);
    r.p.push_back(std::move(p));
    r.o.push_back(std::move(out));
  }
  return r;
}

TEST(ProfileTest, MatchesADirectComputation) {
  std::mt19937 rng(7);
  std::vector<CaptureLayer> layers;
  for (int32_t l : {0, 2, 5}) layers.push_back(RandomLayer(l, 4, 2, 160, 16, rng, 0.8f));
  HylraProfileOptions o;
  o.budget = {0, 0.1};
  o.sinks = 2;
  o.window = 8;
  o.block_tokens = 16;
  o.head_merge = HeadMerge::kMean;
  KVR_ASSERT_OK_AND_ASSIGN(o.steps, ParseStepSelection("40,99,159"));
  KVR_ASSERT_OK_AND_ASSIGN(auto profiles,
                           ProfileCaptures({CaptureSetFromLayers("synthetic", layers)}, o));
  ASSERT_EQ(profiles.size(), 1u);
  const HylraProfile& p = profiles[0];
  EXPECT_EQ(p.layers, (std::vector<int32_t>{0, 2, 5}));
  EXPECT_EQ(p.steps, (std::vector<int64_t>{40, 99, 159}));
  EXPECT_EQ(p.k_last_step, 16);

  const size_t n = layers.size();
  LayerMatrix overlap(n, std::vector<double>(n, 0.0)), mass = overlap, error = overlap;
  for (int64_t t : p.steps) {
    for (int32_t h = 0; h < 4; ++h) {
      const Direct d = DirectStep(layers, t, h, o);
      for (size_t i = 0; i < n; ++i) {
        for (size_t j = i; j < n; ++j) {
          const auto& ti = d.topk[i];
          const auto& tj = d.topk[j];
          int common = 0;
          double mi = 0, mj = 0;
          for (int64_t s : ti) {
            common += tj.count(s);
            mi += d.p[j][s];
          }
          for (int64_t s : tj) mj += d.p[j][s];
          overlap[i][j] += double(common) / tj.size() / (4.0 * p.steps.size());
          mass[i][j] += mi / mj / (4.0 * p.steps.size());
          // Output of layer j over sinks ∪ window ∪ T_i.
          std::set<int64_t> x(ti.begin(), ti.end());
          for (int64_t s = 0; s < std::min<int64_t>(o.sinks, t + 1); ++s) x.insert(s);
          for (int64_t s = std::max<int64_t>(0, t + 1 - o.window); s <= t; ++s) x.insert(s);
          const CaptureLayer& c = layers[j];
          const int32_t g = h / 2;
          std::vector<double> ox(c.head_dim, 0.0);
          double z = 0;
          for (int64_t s : x) {
            z += d.p[j][s];
            for (int32_t y = 0; y < c.head_dim; ++y) {
              ox[y] += d.p[j][s] * c.v[(g * c.num_tokens + s) * c.head_dim + y];
            }
          }
          double diff = 0, norm = 0;
          for (int32_t y = 0; y < c.head_dim; ++y) {
            diff += std::pow(ox[y] / z - d.o[j][y], 2);
            norm += d.o[j][y] * d.o[j][y];
          }
          error[i][j] += std::sqrt(diff / norm) / (4.0 * p.steps.size());
        }
      }
    }
  }
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j) {
      if (j < i) {
        EXPECT_TRUE(std::isnan(p.overlap[i][j]));
        continue;
      }
      EXPECT_NEAR(p.overlap[i][j], overlap[i][j], 1e-9) << i << " " << j;
      EXPECT_NEAR(p.mass[i][j], mass[i][j], 1e-5) << i << " " << j;
      EXPECT_NEAR(p.error[i][j], error[i][j], 1e-4) << i << " " << j;
    }
    EXPECT_DOUBLE_EQ(p.overlap[i][i], 1.0);
    EXPECT_DOUBLE_EQ(p.mass[i][i], 1.0);
    EXPECT_EQ(p.own_error[i], p.error[i][i]);
  }
}

TEST(ProfileTest, IdenticalLayersShareASegmentAndDiffuseLayersAreSensitive) {
  std::mt19937 rng(11);
  // L0 and L3 random; L1 == L2 exactly; L4 attends uniformly (q = 0).
  std::vector<CaptureLayer> layers;
  layers.push_back(RandomLayer(0, 2, 1, 512, 32, rng, 0.7f));
  layers.push_back(RandomLayer(1, 2, 1, 512, 32, rng, 0.7f));
  layers.push_back(layers[1]);
  layers.back().layer = 2;
  layers.push_back(RandomLayer(3, 2, 1, 512, 32, rng, 0.7f));
  layers.push_back(RandomLayer(4, 2, 1, 512, 32, rng, 0.7f));
  std::fill(layers[4].q.begin(), layers[4].q.end(), 0.0f);
  HylraProfileOptions o;
  o.budget = {24, 0};
  o.block_tokens = 16;
  KVR_ASSERT_OK_AND_ASSIGN(o.steps, ParseStepSelection("last:32"));
  o.threads = 2;
  KVR_ASSERT_OK_AND_ASSIGN(auto profiles,
                           ProfileCaptures({CaptureSetFromLayers("known", layers)}, o));
  const HylraProfile& p = profiles[0];
  EXPECT_DOUBLE_EQ(p.overlap[1][2], 1.0);
  EXPECT_DOUBLE_EQ(p.mass[1][2], 1.0);
  EXPECT_DOUBLE_EQ(p.error[1][2], p.error[2][2]);
  EXPECT_LT(p.mass[0][1], 0.9);  // unrelated layers
  EXPECT_LT(p.overlap[2][3], 0.5);
  // Uniform attention needs ~90% of the blocks; random peaked attention fewer.
  EXPECT_NEAR(p.ratio90[4], 0.9, 0.03);
  for (int l = 0; l < 4; ++l) EXPECT_LT(p.ratio90[l], p.ratio90[4]) << l;

  HylraPlanOptions plan_options;
  plan_options.max_compute = 4;
  plan_options.n_full = 1;
  plan_options.select.where = SelectWhere::kLocal;
  plan_options.select.kind = "exact";
  plan_options.select.budget = {24, 0};
  KVR_ASSERT_OK_AND_ASSIGN(HylraPlan plan, PlanHylraPolicy(profiles, plan_options));
  // Four compute layers for five: L2 reuses its twin L1; L4 (diffuse) is FULL.
  EXPECT_EQ(plan.full_layers, std::vector<int32_t>{4});
  EXPECT_EQ(plan.path.source, (std::vector<int32_t>{0, 1, 1, 3, 4}));
  EXPECT_EQ(plan.path.worst, 1.0);
  EXPECT_EQ(PolicySummary(plan.policy),
            "L0 select local:exact k=24 | L1 select local:exact k=24 | L2 reuse(1) | "
            "L3 select local:exact k=24 | L4 full ; sinks=4 window=64");
  EXPECT_EQ(plan.policy.name, "hylra-c4-f1");

  // With three compute layers something must reuse an unrelated layer;
  // the twins still share a segment.
  plan_options.max_compute = 3;
  KVR_ASSERT_OK_AND_ASSIGN(plan, PlanHylraPolicy(profiles, plan_options));
  EXPECT_EQ(plan.path.source[2], plan.path.source[1]);
  EXPECT_EQ(plan.path.source[4], 4);
  EXPECT_LT(plan.path.worst, 1.0);

  // Profiling in one thread gives the same numbers.
  o.threads = 1;
  KVR_ASSERT_OK_AND_ASSIGN(auto serial, ProfileCaptures({CaptureSetFromLayers("known", layers)}, o));
  auto same = [](const LayerMatrix& a, const LayerMatrix& b) {
    for (size_t i = 0; i < a.size(); ++i) {
      for (size_t j = 0; j < a.size(); ++j) {
        if (!(a[i][j] == b[i][j] || (std::isnan(a[i][j]) && std::isnan(b[i][j])))) return false;
      }
    }
    return a.size() == b.size();
  };
  EXPECT_TRUE(same(serial[0].mass, p.mass));
  EXPECT_TRUE(same(serial[0].error, p.error));
  EXPECT_EQ(serial[0].ratio90, p.ratio90);
}

TEST(ProfileTest, ReportsProgressAndCancels) {
  std::mt19937 rng(3);
  std::vector<CaptureLayer> layers = {RandomLayer(0, 2, 1, 128, 8, rng, 1.0f),
                                      RandomLayer(1, 2, 1, 128, 8, rng, 1.0f)};
  HylraProfileOptions o;
  o.budget = {8, 0};
  KVR_ASSERT_OK_AND_ASSIGN(o.steps, ParseStepSelection("last:20"));
  std::vector<Progress> seen;
  o.progress = [&](const Progress& p) {
    seen.push_back(p);
    return true;
  };
  KVR_ASSERT_OK(ProfileCaptures({CaptureSetFromLayers("a", layers), CaptureSetFromLayers("b", layers)},
                                o)
                    .status());
  ASSERT_FALSE(seen.empty());
  for (size_t i = 1; i < seen.size(); ++i) EXPECT_GE(seen[i].fraction, seen[i - 1].fraction);
  EXPECT_NEAR(seen.back().fraction, 1.0, 1e-9);
  EXPECT_EQ(seen.back().stage, "layer 1");
  EXPECT_EQ(seen.back().total, 20);

  o.progress = [](const Progress& p) { return p.fraction < 0.3; };
  EXPECT_EQ(ProfileCaptures({CaptureSetFromLayers("a", layers)}, o).status().code(),
            absl::StatusCode::kCancelled);
}

TEST(ProfileTest, RejectsBadCapturesAndOptions) {
  std::mt19937 rng(5);
  std::vector<CaptureLayer> layers = {RandomLayer(0, 2, 1, 64, 8, rng, 1.0f),
                                      RandomLayer(1, 2, 1, 32, 8, rng, 1.0f)};
  HylraProfileOptions o;
  EXPECT_THAT(ProfileCaptures({CaptureSetFromLayers("bad", layers)}, o).status().message(),
              HasSubstr("bad layer 1: [2 q heads, 1 kv heads, 32 tokens, d=8] differs"));
  layers[1] = RandomLayer(1, 3, 2, 64, 8, rng, 1.0f);
  EXPECT_THAT(ProfileCaptures({CaptureSetFromLayers("bad", layers)}, o).status().message(),
              HasSubstr("3 query heads are not a multiple of 2 KV heads"));
  o.budget = {};
  EXPECT_THAT(ProfileCaptures({CaptureSetFromLayers("bad", layers)}, o).status().message(),
              HasSubstr("budget"));
  o.budget = {4, 0};
  o.window = 0;
  EXPECT_THAT(ProfileCaptures({CaptureSetFromLayers("bad", layers)}, o).status().message(),
              HasSubstr("window"));
  EXPECT_EQ(CaptureSetFromDirectory("/nonexistent").status().code(), absl::StatusCode::kNotFound);
  // A directory with keys but no queries or values for a layer.
  const std::string dir = kvrecall::testing::MakeTempDir("hylra-capture");
  NpyArray k;
  k.descr = "<f4";
  k.shape = {1, 64, 8};
  k.data.assign(static_cast<size_t>(64 * 8 * 4), '\0');
  KVR_ASSERT_OK(WriteNpy(dir + "/layer04_k.npy", k));
  KVR_ASSERT_OK_AND_ASSIGN(CaptureSet set, CaptureSetFromDirectory(dir));
  EXPECT_EQ(set.layers, std::vector<int32_t>{4});
  o.window = 4;
  absl::Status missing = ProfileCaptures({set}, o).status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.message(), HasSubstr("layer04_q.npy is missing"));
  EXPECT_EQ(CaptureSetFromDirectory(kvrecall::testing::MakeTempDir("hylra-empty")).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(ProfileCaptures({}, HylraProfileOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// --- planning ---------------------------------------------------------------------------

HylraProfile FakeProfile(std::vector<int32_t> layers, LayerMatrix mass, std::vector<double> ratio) {
  HylraProfile p;
  p.name = "fake";
  p.layers = std::move(layers);
  p.mass = mass;
  p.overlap = mass;
  p.error = mass;
  p.ratio90 = std::move(ratio);
  p.own_error = p.ratio90;
  p.steps = {1};
  return p;
}

TEST(PlanTest, MissingLayersAreFullAndSaidSo) {
  const double x = std::nan("");
  HylraProfile p = FakeProfile({1, 3}, {{1, 0.9}, {x, 1}}, {0.2, 0.3});
  HylraPlanOptions o;
  o.max_compute = 1;
  o.select.where = SelectWhere::kRemote;
  o.select.kind = "roar";
  o.select.budget = {0, 0.02};
  o.select.effort = 128;
  o.num_layers = 4;
  EXPECT_THAT(PlanHylraPolicy({p}, o).status().message(),
              HasSubstr("max_compute=1 is below the 2 layers that must compute (0, 2: layer 0, "
                        "the full layers and the layers not captured)"));
  o.max_compute = 4;
  KVR_ASSERT_OK_AND_ASSIGN(HylraPlan plan, PlanHylraPolicy({p}, o));
  EXPECT_EQ(plan.missing_layers, (std::vector<int32_t>{0, 2}));
  ASSERT_FALSE(plan.notes.empty());
  EXPECT_THAT(plan.notes[0], HasSubstr("layers 0, 2 were not captured: FULL"));
  EXPECT_EQ(PolicySummary(plan.policy),
            "L0 full | L1 select remote:roar budget=0.02 effort=128 | L2 full | "
            "L3 select remote:roar budget=0.02 effort=128 ; sinks=4 window=64");
  EXPECT_TRUE(std::isnan(plan.sensitivity[0]));
  EXPECT_EQ(plan.sensitivity[3], 0.3);

  // Renumbered: the two captured layers are the policy's layers 0 and 1.
  o.layer_map = {0, 1};
  o.num_layers = 0;
  o.max_compute = 1;
  KVR_ASSERT_OK_AND_ASSIGN(plan, PlanHylraPolicy({p}, o));
  EXPECT_EQ(PolicySummary(plan.policy),
            "L0 select remote:roar budget=0.02 effort=128 | L1 reuse(0) ; sinks=4 window=64");
  EXPECT_DOUBLE_EQ(plan.path.worst, 0.9);
  EXPECT_TRUE(plan.notes.empty());
}

TEST(PlanTest, FullLayersAreReusedOnlyWhenForcedOrAllowed) {
  const double x = std::nan("");
  // L0 is the most sensitive; L1 and L2 follow it closely.
  HylraProfile p = FakeProfile({0, 1, 2}, {{1, 0.95, 0.9}, {x, 1, 0.5}, {x, x, 1}}, {0.8, 0.2, 0.1});
  HylraPlanOptions o;
  o.select.kind = "exact";
  o.select.budget = {64, 0};
  o.n_full = 1;
  o.max_compute = 1;
  KVR_ASSERT_OK_AND_ASSIGN(HylraPlan plan, PlanHylraPolicy({p}, o));
  // Zeroed row: forced to reuse L0 with score 0; L0 gets a budget and a note.
  EXPECT_EQ(PolicySummary(plan.policy), "L0 full k=64 | L1 reuse(0) | L2 reuse(0) ; sinks=4 window=64");
  EXPECT_EQ(plan.path.worst, 0.0);
  EXPECT_THAT(plan.notes[0], HasSubstr("layer 0 is FULL and reused"));
  o.max_compute = 2;
  KVR_ASSERT_OK_AND_ASSIGN(plan, PlanHylraPolicy({p}, o));
  EXPECT_EQ(PolicySummary(plan.policy),
            "L0 full | L1 select local:exact k=64 | L2 reuse(1) ; sinks=4 window=64");
  // Allowed: its exact top-k is the better source for L2.
  o.reuse_full_layers = true;
  o.full_budget = {128, 0};
  KVR_ASSERT_OK_AND_ASSIGN(plan, PlanHylraPolicy({p}, o));
  EXPECT_EQ(PolicySummary(plan.policy),
            "L0 full k=128 | L1 reuse(0) | L2 select local:exact k=64 ; sinks=4 window=64");
  EXPECT_DOUBLE_EQ(plan.path.worst, 0.95);
  // A threshold instead of a count.
  o.n_full = 0;
  o.full_threshold = 0.15;
  KVR_ASSERT_OK_AND_ASSIGN(plan, PlanHylraPolicy({p}, o));
  EXPECT_EQ(plan.full_layers, (std::vector<int32_t>{0, 1}));
}

TEST(PlanTest, SeveralCapturesMaximiseTheWorstOverAll) {
  const double x = std::nan("");
  // Capture a: L1 should reuse L0. Capture b: L2 should reuse L1.
  HylraProfile a = FakeProfile({0, 1, 2}, {{1, 0.9, 0.2}, {x, 1, 0.6}, {x, x, 1}}, {0.1, 0.1, 0.1});
  HylraProfile b = FakeProfile({0, 1, 2}, {{1, 0.5, 0.2}, {x, 1, 0.95}, {x, x, 1}}, {0.1, 0.1, 0.1});
  HylraPlanOptions o;
  o.select.kind = "exact";
  o.select.budget = {8, 0};
  o.max_compute = 2;
  KVR_ASSERT_OK_AND_ASSIGN(HylraPlan only_a, PlanHylraPolicy({a}, o));
  EXPECT_EQ(only_a.path.source, (std::vector<int32_t>{0, 0, 2}));
  KVR_ASSERT_OK_AND_ASSIGN(HylraPlan both, PlanHylraPolicy({a, b}, o));
  // {0,0,2}: worst 0.5 (b); {0,1,1}: worst 0.6 (a).
  EXPECT_EQ(both.path.source, (std::vector<int32_t>{0, 1, 1}));
  EXPECT_DOUBLE_EQ(both.path.worst, 0.6);
  EXPECT_DOUBLE_EQ(both.score[1][2], 0.6);
}

TEST(PlanTest, RejectsBadOptions) {
  HylraProfile p = FakeProfile({0, 1}, {{1, 0.5}, {0, 1}}, {0.1, 0.2});
  HylraPlanOptions o;
  o.select.kind = "exact";
  o.select.budget = {8, 0};
  o.max_compute = 0;
  EXPECT_THAT(PlanHylraPolicy({p}, o).status().message(), HasSubstr("max_compute must be >= 1"));
  o.max_compute = 2;
  o.n_full = 1;
  o.full_threshold = 0.1;
  EXPECT_THAT(PlanHylraPolicy({p}, o).status().message(), HasSubstr("n_full or full_threshold"));
  o.full_threshold = 0;
  o.layer_map = {1, 0};
  EXPECT_THAT(PlanHylraPolicy({p}, o).status().message(), HasSubstr("strictly increasing"));
  o.layer_map = {};
  o.select.kind = "roar";
  EXPECT_THAT(PlanHylraPolicy({p}, o).status().message(),
              HasSubstr("the select spec: layer 0: unknown local kind \"roar\""));
  o.select.kind = "exact";
  HylraProfile q = FakeProfile({0, 2}, {{1, 0.5}, {0, 1}}, {0.1, 0.2});
  EXPECT_THAT(PlanHylraPolicy({p, q}, o).status().message(), HasSubstr("different layers"));
}

// --- the real capture -----------------------------------------------------------------

TEST(HylraAttnDevTest, ProfilesTheRealCapture) {
  const std::string dir = kvrecall::testing::SharedDir() + "/data/attn-dev";
  if (!std::filesystem::exists(dir + "/layer01_k.npy")) GTEST_SKIP() << "no capture at " << dir;
  KVR_ASSERT_OK_AND_ASSIGN(CaptureSet set, CaptureSetFromDirectory(dir));
  EXPECT_EQ(set.layers, (std::vector<int32_t>{1, 3, 5, 7}));
  HylraProfileOptions o;
  o.budget = {0, 0.02};
  KVR_ASSERT_OK_AND_ASSIGN(o.steps, ParseStepSelection("every:512"));
  o.threads = 2;
  KVR_ASSERT_OK_AND_ASSIGN(auto profiles, ProfileCaptures({set}, o));
  const HylraProfile& p = profiles[0];
  EXPECT_EQ(p.num_q_heads, 4);
  EXPECT_EQ(p.num_kv_heads, 2);
  EXPECT_EQ(p.num_tokens, 8192);
  EXPECT_EQ(p.steps.size(), 8u);
  EXPECT_EQ(p.k_last_step, 164);
  for (size_t i = 0; i < 4; ++i) {
    for (size_t j = i; j < 4; ++j) {
      EXPECT_GE(p.mass[i][j], 0.0);
      EXPECT_LE(p.mass[i][j], 1.0 + 1e-12);
      EXPECT_GE(p.overlap[i][j], 0.0);
      EXPECT_LE(p.overlap[i][j], 1.0);
      EXPECT_GE(p.error[i][j], 0.0);
      // Selecting for itself is never worse, in mass, than borrowing.
      EXPECT_LE(p.mass[i][j], p.mass[j][j]);
    }
    EXPECT_GT(p.ratio90[i], 0.0);
    EXPECT_LT(p.ratio90[i], 1.0);
  }
  // Layer 1 is the diffuse one of the capture (its top 100 keys hold 9-44% of
  // the mass, against 60-94% in layers 3-7): the most sensitive.
  EXPECT_EQ(std::max_element(p.ratio90.begin(), p.ratio90.end()) - p.ratio90.begin(), 0);
  EXPECT_GT(p.own_error[0], p.own_error[3]);

  HylraPlanOptions plan_options;
  plan_options.layer_map = {0, 1, 2, 3};
  plan_options.max_compute = 2;
  plan_options.n_full = 1;
  plan_options.select.where = SelectWhere::kRemote;
  plan_options.select.kind = "roar";
  plan_options.select.budget = {0, 0.02};
  plan_options.model_id = "kvr-tiny-llama";
  KVR_ASSERT_OK_AND_ASSIGN(HylraPlan plan, PlanHylraPolicy(profiles, plan_options));
  EXPECT_EQ(plan.full_layers, std::vector<int32_t>{0});
  EXPECT_EQ(plan.policy.layers[0].role, LayerRole::kFull);
  EXPECT_EQ(plan.policy.layers[1].role, LayerRole::kSelect);
  EXPECT_EQ(plan.policy.CountRole(LayerRole::kReuse), 2);
  KVR_EXPECT_OK(ValidatePolicy(plan.policy));

  const std::string json = HylraReportJson(profiles, plan);
  nlohmann::json j = nlohmann::json::parse(json);
  EXPECT_EQ(j["captures"][0]["layers"], nlohmann::json({1, 3, 5, 7}));
  EXPECT_TRUE(j["captures"][0]["mass"][1][0].is_null());
  EXPECT_EQ(j["policy"]["format"], "kvrecall.layer_policy.v1");
  KVR_ASSERT_OK_AND_ASSIGN(LayerPolicy back, ParsePolicyJson(j["policy"].dump()));
  EXPECT_EQ(back, plan.policy);
  const std::string text = HylraReportText(profiles, plan, plan_options);
  EXPECT_THAT(text, HasSubstr("ratio90"));
  EXPECT_THAT(text, HasSubstr("roles: L0 full | L1 select"));
}

}  // namespace
}  // namespace kvrecall::worker
