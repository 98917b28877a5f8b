#pragma once

// Layer policies: which layers of a decode step attend to everything (FULL),
// which select the tokens that matter (SELECT, on the GPU or through
// kvrecalld) and which reuse an earlier layer's selection (REUSE). A policy
// is a role table per model, stored as a `layer_policy` artifact in JSON
// (docs/worker.md has the format and a worked example):
//
//   {
//     "format": "kvrecall.layer_policy.v1",
//     "name": "tidal-r3",                  // free text
//     "model": "kvr-tiny-llama",           // optional; checked against the session's model
//     "num_layers": 8,
//     "sinks": 4,                          // positions [0, sinks) always attended
//     "window": 64,                        // the last `window` positions always attended (>= 1)
//     "layers": [
//       {"role": "full"},
//       {"role": "full", "k": 128},                        // full attention + its exact top-128
//       {"role": "reuse", "source": 1},
//       {"role": "select", "where": "local", "kind": "loki", "budget": 0.02, "knobs": "rank=32"},
//       {"role": "select", "where": "remote", "kind": "roar", "k": 256, "effort": 128},
//       {"role": "reuse", "source": 4},
//       ...
//     ]
//   }
//
// Budgets: "k" (positions per query head, an integer >= 1) or "budget" (a
// fraction of the context's tokens in (0, 1], rounded up); never both. The
// selected positions come from the candidates outside the sinks and the
// window, so a SELECT or REUSE layer attends to sinks ∪ window ∪ selected
// (disjoint). A FULL layer with a budget also yields its exact top-k, for
// later REUSE layers (TidalDecode's selection layer).
//
// Thread-compatible value types; the functions are thread-safe.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrecall::worker {

enum class LayerRole : uint8_t {
  kFull = 0,    // attention over every position
  kSelect = 1,  // attention over sinks ∪ window ∪ this layer's own top-k
  kReuse = 2,   // attention over sinks ∪ window ∪ the top-k chosen at layer `source`
};

// Where a SELECT layer chooses its positions.
enum class SelectWhere : uint8_t {
  kLocal = 0,   // on the GPU, over GPU-resident keys: kind "exact", "loki" or "quest"
  kRemote = 1,  // in kvrecalld (offloaded mode): any index kind of the service
};

// Local selection kinds (SelectWhere::kLocal).
inline constexpr const char* kLocalSelectKinds[] = {"exact", "loki", "quest"};
// Remote selection kinds (SelectWhere::kRemote): the service's index kinds,
// and "all" (the exact top-k without an index).
inline constexpr const char* kRemoteSelectKinds[] = {"flat",  "roar",       "loki",      "inverted",
                                                     "quest", "faiss_hnsw", "faiss_ivf", "all"};

// A token budget: exactly one of k > 0 or fraction in (0, 1]; or neither
// (no selection).
struct Budget {
  int32_t k = 0;
  double fraction = 0;

  bool empty() const { return k == 0 && fraction == 0; }
  // Positions per query head for a context of `tokens` positions:
  // k, or ceil(fraction * tokens); at least 1 when not empty, 0 when empty.
  int64_t Resolve(int64_t tokens) const;

  friend bool operator==(const Budget&, const Budget&) = default;
};

struct LayerSpec {
  LayerRole role = LayerRole::kFull;
  // kSelect: where and how; kFull: only `budget` (its exact top-k, when a
  // later layer reuses it).
  SelectWhere where = SelectWhere::kLocal;
  std::string kind;   // kSelect: a local or remote kind (above)
  Budget budget;      // kSelect: required; kFull: optional (makes it a selection source)
  int64_t effort = 0; // kSelect remote: the index's effort knob (0 = index default)
  // kSelect: other knobs, "key=value,...". Local loki: "rank=R" (16, 32 or
  // 64; default 32). Local quest: "page=P" (tokens per page, default 16).
  // Remote: passed to the service's search.
  std::string knobs;
  int32_t source = -1;  // kReuse: the earlier layer whose selection is reused

  // Field-wise equality (ValidatePolicy requires the fields a role does not
  // use to keep their defaults, so equal policies mean equal behaviour).
  friend bool operator==(const LayerSpec&, const LayerSpec&) = default;
};

struct LayerPolicy {
  std::string name;
  std::string model_id;  // may be empty
  int32_t sinks = 4;     // >= 0
  int32_t window = 64;   // >= 1 (the current token is always attended)
  std::vector<LayerSpec> layers;  // one per layer

  int32_t num_layers() const { return static_cast<int32_t>(layers.size()); }
  // True when layer `l` selects positions a later layer may reuse: a SELECT
  // layer, or a FULL layer with a budget.
  bool Selects(int32_t l) const;
  // True when some later layer reuses layer `l`'s selection.
  bool IsReused(int32_t l) const;
  // Counts by role (for reports).
  int32_t CountRole(LayerRole role) const;

  friend bool operator==(const LayerPolicy&, const LayerPolicy&) = default;
};

// The JSON "format" value of this version of the role table.
inline constexpr const char kLayerPolicyFormat[] = "kvrecall.layer_policy.v1";
// The artifact kind under which kvrecalld stores role tables.
inline constexpr const char kLayerPolicyArtifactKind[] = "layer_policy";

// "full", "select", "reuse".
const char* LayerRoleName(LayerRole role);

// Checks a policy: at least one layer; sinks >= 0, window >= 1; every SELECT
// has a known kind for its `where` and a budget; FULL budgets valid; every
// REUSE names an earlier layer that selects (an error naming the layer, e.g.
// "layer 5: reuse of layer 7, which is not an earlier layer" or "layer 3:
// reuse of layer 0, which selects nothing (a full layer without a budget)");
// knobs parse as key=value. INVALID_ARGUMENT naming the first problem.
absl::Status ValidatePolicy(const LayerPolicy& policy);

// Parses the JSON form (above) and validates it. INVALID_ARGUMENT for bad
// JSON (with the parser's position), an unknown format, unknown or
// mistyped fields, num_layers != the number of entries, or a failed
// ValidatePolicy.
absl::StatusOr<LayerPolicy> ParsePolicyJson(absl::string_view json);

// The JSON form, pretty-printed, fields in a fixed order, so that
// ParsePolicyJson(PolicyToJson(p)) == p.
std::string PolicyToJson(const LayerPolicy& policy);

// A one-line-per-layer human summary, e.g. "L0 full | L1 full k=128 | L2 reuse(1) | ...".
std::string PolicySummary(const LayerPolicy& policy);

// --- Presets ---------------------------------------------------------------

// TidalDecode (Yang et al., ICLR 2025, arXiv 2410.05076): layers
// [0, num_full) FULL; layer `select_layer` FULL with the budget (token
// selection by exact logits); layers up to `reselect_layer` - 1 REUSE it;
// layer `reselect_layer` FULL with the budget (re-selection); the rest REUSE
// it. reselect_layer < 0: no re-selection. Paper defaults: num_full = 2,
// select_layer = 2, reselect_layer = 13 of 32 (Llama-3-8B), k = 128 or 256,
// no sinks and only the current token (sinks = 0, window = 1).
struct TidalDecodeOptions {
  int32_t num_layers = 32;
  int32_t num_full = 2;
  int32_t select_layer = 2;
  int32_t reselect_layer = 13;
  Budget budget{/*k=*/128, /*fraction=*/0};
  int32_t sinks = 0;
  int32_t window = 1;
  // Offloaded variant: the selection layers are SELECT(remote, remote_kind)
  // instead of FULL with a budget (a FULL layer over a remote context is an
  // exact scan of every offloaded key). Empty: FULL (the paper).
  std::string remote_kind;
  int64_t remote_effort = 0;
};
absl::StatusOr<LayerPolicy> TidalDecodePolicy(const TidalDecodeOptions& options);

// Every layer the same SELECT (RetrievalAttention: every layer retrieves),
// optionally with the first `num_full` layers FULL.
absl::StatusOr<LayerPolicy> UniformSelectPolicy(int32_t num_layers, const LayerSpec& select,
                                                int32_t num_full, int32_t sinks, int32_t window);

}  // namespace kvrecall::worker
