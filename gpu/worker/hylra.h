#pragma once

// HyLRA layer profiling and planning (Ai et al., "HyLRA: Hybrid Layer Reuse
// Attention for Efficient Long-Context Inference", arXiv 2602.00777): an
// offline choice, per layer, between full attention (the sensitive layers),
// computing its own top-k (SELECT) and reusing the top-k of an earlier layer
// (REUSE), made by a dynamic program over scores measured on captured
// attention. The result is a LayerPolicy (policy.h). docs/worker.md, "Layer
// policies", describes what is measured and shows a profile.
//
//   1. ProfileCaptures(): per calibration capture (the q/k/v of some layers
//      over one text) and per decode step t (a query position attending
//      causally over keys 0..t), every layer's exact logits, its own top-k
//      T_l over the candidates outside the sinks and the recent window, and
//      for every pair of layers i < j:
//        overlap  O(i->j) = |T_i ∩ T_j| / |T_j|
//        mass     M(i->j) = attention mass of layer j on T_i / on T_j
//        error    E(i->j) = |o_j(F ∪ T_i) - o_j(all)| / |o_j(all)|
//      (F = sinks ∪ window, o_j(X) = layer j's attention output over X), each
//      averaged over steps per query head, then merged over heads; and per
//      layer its sensitivity "ratio90", the share of 64-token blocks needed to
//      hold 90% of its attention mass.
//   2. PlanHylraPolicy(): the most sensitive layers become FULL; the dynamic
//      program BestPathMinSum() picks at most `max_compute` compute layers
//      (segment starts) maximising (worst score, total score) over all
//      layers and captures; the others REUSE their segment's compute layer.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/progress.h"
#include "gpu/worker/policy.h"

namespace kvrecall::worker {

// [n][n] scores between layers; row = source layer i, column = reusing layer j.
using LayerMatrix = std::vector<std::vector<double>>;

// --- Captures ----------------------------------------------------------------

// One captured attention layer over one text, as float32.
// Thread-compatible value type.
struct CaptureLayer {
  int32_t layer = 0;  // the model's layer number
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;  // q head h uses kv head h / (num_q_heads / num_kv_heads)
  int64_t num_tokens = 0;
  int32_t head_dim = 0;
  std::vector<float> q;  // [num_q_heads, num_tokens, head_dim], post-RoPE
  std::vector<float> k;  // [num_kv_heads, num_tokens, head_dim], post-RoPE
  std::vector<float> v;  // [num_kv_heads, num_tokens, head_dim]
};

// A calibration capture: the layers captured over one text, read one at a
// time (the profiler holds a single layer's K/V at once).
// Thread-compatible value type.
struct CaptureSet {
  std::string name;             // for reports (the directory)
  std::vector<int32_t> layers;  // captured layer numbers, strictly increasing
  // Reads one of `layers`.
  std::function<absl::StatusOr<CaptureLayer>(int32_t layer)> read;
};

// A directory of `layerLL_q.npy`, `layerLL_k.npy`, `layerLL_v.npy` (LL the
// layer number; float16 or float32, shapes as CaptureLayer's). The layers
// are those with a k file; a missing q or v file is NOT_FOUND naming it when
// that layer is read. NOT_FOUND when the directory has no k files.
absl::StatusOr<CaptureSet> CaptureSetFromDirectory(const std::string& dir);

// Layers already in memory (tests, synthetic data). REQUIRES: layer numbers
// strictly increasing.
CaptureSet CaptureSetFromLayers(std::string name, std::vector<CaptureLayer> layers);

// --- Decode steps -------------------------------------------------------------

// Which query positions of a capture are profiled as decode steps.
// Thread-compatible value type.
struct StepSelection {
  enum class Kind : uint8_t {
    kLast = 0,   // the last `count` positions
    kEvery = 1,  // every `count`-th position of the second half, ending at the last
    kList = 2,   // `positions`
  };
  Kind kind = Kind::kLast;
  int64_t count = 256;
  std::vector<int64_t> positions;

  // The positions, increasing, for a capture of `num_tokens` positions.
  // INVALID_ARGUMENT for a listed position outside [0, num_tokens) or a
  // count < 1.
  absl::StatusOr<std::vector<int64_t>> Resolve(int64_t num_tokens) const;
  // The text form ParseStepSelection reads.
  std::string ToString() const;
};

// "last:N", "every:S" or "P,P,..." (positions). INVALID_ARGUMENT otherwise.
absl::StatusOr<StepSelection> ParseStepSelection(absl::string_view text);

// --- Profiling ----------------------------------------------------------------

enum class HeadMerge : uint8_t {
  kMin = 0,   // conservative: the worst head (scores by min, errors by max)
  kMean = 1,  // the mean over query heads
};

struct HylraProfileOptions {
  // Positions selected per query head at each step (k, or a fraction of the
  // step's t + 1 keys), from the candidates outside sinks and window.
  Budget budget{/*k=*/0, /*fraction=*/0.02};
  int32_t sinks = 4;   // positions [0, sinks) always attended (>= 0)
  int32_t window = 64; // the last `window` positions always attended (>= 1)
  StepSelection steps;
  int32_t block_tokens = 64;   // ratio90's block size (>= 1)
  double mass_fraction = 0.9;  // ratio90's share of the mass, in (0, 1]
  HeadMerge head_merge = HeadMerge::kMin;
  int32_t threads = 1;  // steps profiled in parallel; 0 = one per hardware thread
  // Stages "read layer L" and "layer L" (done/total = steps); return false
  // to stop with CANCELLED.
  ProgressCallback progress;
};

// What one capture measured. Indices i, j below are positions in `layers`.
// Thread-compatible value type.
struct HylraProfile {
  std::string name;
  std::vector<int32_t> layers;  // captured layer numbers, increasing
  int32_t num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t num_tokens = 0;
  std::vector<int64_t> steps;   // the query positions profiled
  int64_t k_last_step = 0;      // positions selected per head at the last step
  // [n][n], defined for i <= j (i > j: NaN); diagonal: the layer itself.
  LayerMatrix overlap;  // |T_i ∩ T_j| / |T_j|; diagonal 1
  LayerMatrix mass;     // layer j's attention mass on T_i / on T_j; diagonal 1
  LayerMatrix error;    // relative L2 error of o_j over F ∪ T_i; diagonal: own top-k
  std::vector<double> ratio90;     // sensitivity per layer (higher: more spread)
  std::vector<double> own_error;   // error[j][j]
  double seconds = 0;
};

// Profiles every capture (each with its own steps). INVALID_ARGUMENT for bad
// options, inconsistent shapes within a capture (naming the layer), or a
// capture without layers; CANCELLED when `progress` returns false.
absl::StatusOr<std::vector<HylraProfile>> ProfileCaptures(const std::vector<CaptureSet>& captures,
                                                          const HylraProfileOptions& options);

// --- The dynamic program --------------------------------------------------------

// A reuse assignment: every layer's source (source[j] == j: a compute layer,
// the start of a segment; otherwise the compute layer that starts j's
// segment), with its objective.
struct ReusePath {
  std::vector<int32_t> source;
  double worst = 0;  // min over captures and layers of the score of (source[j], j)
  double total = 0;  // sum over captures and layers
  int32_t num_compute = 0;
};

// HyLRA's best_path_min_sum: over assignments where each layer either starts
// a segment or continues the previous layer's, layer 0 and every
// `must_compute` layer start one, and at most `max_compute` segments start,
// the one maximising (worst, total) lexicographically — ties go to fewer
// compute layers. A layer's score is scores[s][source][j] (s = capture),
// 1 on the diagonal. dp[j][i][c] keeps the best path of layers 0..j whose
// current segment head is i after c starts: O(n^2 * max_compute).
// INVALID_ARGUMENT when the matrices are not n x n alike, `must_compute`
// is not n long, or max_compute < the layers that must compute.
absl::StatusOr<ReusePath> BestPathMinSum(const std::vector<LayerMatrix>& scores,
                                         int32_t max_compute,
                                         const std::vector<bool>& must_compute);

// --- Planning -------------------------------------------------------------------

enum class HylraScore : uint8_t {
  kMass = 0,     // M(i->j): attention mass of the reusing layer that T_i captures
  kOverlap = 1,  // O(i->j): top-k overlap, as in the paper's code
};

struct HylraPlanOptions {
  int32_t max_compute = 0;      // compute layers (segment starts), FULL included; >= 1
  int32_t n_full = 0;           // the n_full most sensitive captured layers become FULL
  double full_threshold = 0;    // > 0: instead, captured layers with ratio90 >= it
  HylraScore score = HylraScore::kMass;
  // false (HyLRA): a FULL layer's row of scores is zeroed, so a later layer
  // reuses it only when the budget forces it. true: its exact top-k is a
  // source like any other (a FULL layer with a budget, TidalDecode-style).
  bool reuse_full_layers = false;
  // Policy layer of each captured layer, in capture order (strictly
  // increasing); empty: the captured layer numbers.
  std::vector<int32_t> layer_map;
  // Layers of the policy; 0: the last mapped layer + 1. Layers not captured
  // are FULL (nothing to measure) and count against max_compute.
  int32_t num_layers = 0;
  // A compute layer's SELECT (where, kind, budget, effort, knobs; role ignored).
  LayerSpec select;
  // The budget of a FULL layer that later layers reuse; empty: select.budget.
  Budget full_budget;
  int32_t sinks = 4;
  int32_t window = 64;
  std::string name;      // empty: "hylra-c<max_compute>-f<full layers>"
  std::string model_id;
};

// The chosen table and how it was chosen. Thread-compatible value type.
struct HylraPlan {
  LayerPolicy policy;
  LayerMatrix score;                   // [L][L] policy layers, min over captures
  ReusePath path;
  std::vector<double> sensitivity;     // per policy layer, mean ratio90 (NaN: not captured)
  std::vector<int32_t> full_layers;    // FULL for sensitivity
  std::vector<int32_t> missing_layers; // FULL because not captured
  std::vector<std::string> notes;      // what a reader should know (missing layers, ...)
};

// Chooses FULL layers and runs BestPathMinSum over the profiles (all of the
// same layers). INVALID_ARGUMENT for bad options (naming them), profiles of
// different layers, or a max_compute below the layers that must compute.
absl::StatusOr<HylraPlan> PlanHylraPolicy(const std::vector<HylraProfile>& profiles,
                                          const HylraPlanOptions& options);

// --- Reports --------------------------------------------------------------------

// JSON: per capture its matrices, sensitivities and steps; the plan's score
// matrix, path, full/missing layers, notes, and the policy itself.
std::string HylraReportJson(const std::vector<HylraProfile>& profiles, const HylraPlan& plan);

// Text tables of the same, for a terminal.
std::string HylraReportText(const std::vector<HylraProfile>& profiles, const HylraPlan& plan,
                            const HylraPlanOptions& options);

}  // namespace kvrecall::worker
