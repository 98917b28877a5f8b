// index_bench: quality and speed of every key index kind on real attention
// captures (attn-dev) and on synthetic attention-like sets for scale.
//
//   build/bin/index_bench                        # the full sweep (minutes)
//   build/bin/index_bench --quick                # a smoke test (< 1 minute)
//   build/bin/index_bench --synthetic=32768,131072 --layers=
//
// Per evaluation set (layer x KV head of the capture, or a synthetic set) it
// builds every kind the factory knows (IndexKinds()) over the prefix keys,
// with the prefill queries of the group as training queries, and sweeps the
// kind's effort knob (SearchEffortKnob()) up to MaxSearchEffort(). Each row:
// recall@32 / @100 / @1% of the exact top-k, attention mass and output
// error of the top-100, % of keys scanned, build time, index bytes per key
// and latency per query on 1 thread and on all threads (batches of all decode
// queries). Oracle rows: the exact top 2% of keys, and sinks + window of the
// same budget. Writes a table to stdout, a CSV (--csv) and the recall vs
// %-scanned plot (--plot, via bench/index/plot_index.py and /usr/bin/python3).
// Progress goes to stderr: a bar when it is a terminal, else a line per stage.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "bench/index/attention_eval.h"
#include "bench/index/machine_info.h"
#include "common/progress.h"
#include "common/status_macros.h"
#include "index/index_factory.h"

#ifndef KVRECALL_SOURCE_DIR
#define KVRECALL_SOURCE_DIR "."
#endif

ABSL_FLAG(std::string, data, "", "attn-dev capture directory (default: <repo>/../shared/data/attn-dev)");
ABSL_FLAG(std::string, layers, "1,3,5,7", "capture layers to evaluate (empty: none)");
ABSL_FLAG(std::string, kv_heads, "0,1", "KV heads to evaluate");
ABSL_FLAG(int64_t, decode, 256, "last positions of the capture used as decode queries (per query head)");
ABSL_FLAG(std::string, synthetic, "", "synthetic set sizes, e.g. 32768,131072");
ABSL_FLAG(std::string, tiled, "",
          "long contexts tiled from the capture: copies of each --layers/--kv_heads prefix, "
          "e.g. 4,16 (7936 keys per copy)");
ABSL_FLAG(std::string, tiled_build_params, "roar:max_train=32768",
          "build params added for tiled sets (same form as --build_params)");
ABSL_FLAG(int64_t, synthetic_decode, 256, "decode queries per head of a synthetic set");
ABSL_FLAG(std::string, kinds, "", "kinds to run (default: every kind of IndexKinds())");
ABSL_FLAG(std::string, build_params, "",
          "per-kind build params, 'kind:k=v,k=v;kind:...' (e.g. 'roar:m=24,l=160')");
ABSL_FLAG(std::string, synthetic_build_params, "roar:max_train=65536",
          "build params added for synthetic sets (same form)");
ABSL_FLAG(std::string, efforts, "",
          "per-kind effort values instead of the default sweep, 'kind:1,2,4;kind:...'");
ABSL_FLAG(double, sweep_step, 1.41421356, "ratio between consecutive sweep values (> 1)");
ABSL_FLAG(double, window_budget, 0.02, "budget of the oracle rows, as a fraction of the keys");
ABSL_FLAG(int64_t, sinks, 16, "sink positions of the sinks+window oracle");
ABSL_FLAG(int32_t, reps, 2, "timed repetitions per latency (the best is kept)");
ABSL_FLAG(int64_t, batch, 0,
          "queries per timed Search call: 0 = all decode queries in one call, 2 = one call "
          "per decode step of a KV head with 2 query heads");
ABSL_FLAG(std::string, csv, "index_bench.csv", "CSV output path (empty: none)");
ABSL_FLAG(std::string, plot, "", "PNG output path for the recall vs %-scanned curves (empty: none)");
ABSL_FLAG(bool, quick, false, "smoke test: layer 3 / KV head 0, 32 decode queries, coarse sweep");

namespace kvrecall::bench {
namespace {

using index::BuildOptions;
using index::KeyIndex;
using index::ParamMap;
using index::SearchParams;
using index::SearchResult;
using index::VectorView;

struct Row {
  std::string set, kind, knob;
  int32_t layer = -1, kv_head = -1;
  int64_t n = 0, effort = 0;
  double recall32 = 0, recall100 = 0, recall1pct = 0, mass = 0, err = 0, scanned = 0;
  double build_s = 0, index_bytes_per_key = 0, key_bytes_per_key = 0;
  double us_1t = 0, us_all = 0;
  bool timed = true;
};

std::string SourceDir() {
  const char* env = std::getenv("KVRECALL_SOURCE_DIR");
  return env != nullptr ? env : KVRECALL_SOURCE_DIR;
}

std::vector<int64_t> ParseInts(const std::string& text) {
  std::vector<int64_t> out;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int64_t v;
    if (absl::SimpleAtoi(item, &v)) out.push_back(v);
  }
  return out;
}

// "kind:text;kind:text" -> {kind: text}.
std::map<std::string, std::string> ParsePerKind(const std::string& text) {
  std::map<std::string, std::string> out;
  for (absl::string_view item : absl::StrSplit(text, ';', absl::SkipWhitespace())) {
    const size_t colon = item.find(':');
    if (colon == absl::string_view::npos) continue;
    out[std::string(item.substr(0, colon))] = std::string(item.substr(colon + 1));
  }
  return out;
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The default sweep: max, max/step, max/step^2, ... down to 1, ascending.
std::vector<int64_t> Sweep(int64_t max, double step) {
  std::vector<int64_t> v;
  for (double x = static_cast<double>(max); x >= 1; x /= step) {
    const int64_t e = std::max<int64_t>(1, std::llround(x));
    if (v.empty() || v.back() != e) v.push_back(e);
  }
  std::reverse(v.begin(), v.end());
  return v;
}

void PrintHeader() {
  std::printf("%-16s %-11s %8s %7s %7s %7s %7s %8s %8s %8s %9s %8s %10s %10s\n", "set", "kind",
              "effort", "rec@32", "rec@100", "rec@1%", "mass", "out_err", "scanned%", "build_s",
              "idxB/key", "keyB/key", "us/q 1t", "us/q all");
}

void PrintRow(const Row& r) {
  std::printf("%-16s %-11s %8s %7.3f %7.3f %7.3f %7.3f %8.4f %8.2f %8.2f %9.1f %8.1f %10s %10s\n",
              r.set.c_str(), r.kind.c_str(),
              r.knob.empty() ? "-" : absl::StrCat(r.knob, "=", r.effort).c_str(), r.recall32,
              r.recall100, r.recall1pct, r.mass, r.err, r.scanned, r.build_s,
              r.index_bytes_per_key, r.key_bytes_per_key,
              r.timed ? absl::StrFormat("%.1f", r.us_1t).c_str() : "-",
              r.timed ? absl::StrFormat("%.1f", r.us_all).c_str() : "-");
  std::fflush(stdout);
}

struct Truth {
  int32_t k1pct = 1;
  SearchResult top32, top100, top1pct;
};

// Metrics of search results (k = 100 for mass/error/scanned).
void FillQuality(const EvalSet& set, const FullAttention& full, const Truth& truth,
                 const SearchResult& r32, const SearchResult& r100, const SearchResult& r1,
                 Row* row) {
  const int64_t nq = set.num_queries;
  double rec32 = 0, rec100 = 0, rec1 = 0, mass = 0, err = 0;
  for (int64_t q = 0; q < nq; ++q) {
    rec32 += RecallAt(r32.ids.data() + q * 32, 32, truth.top32.ids.data() + q * 32, 32);
    rec100 += RecallAt(r100.ids.data() + q * 100, 100, truth.top100.ids.data() + q * 100, 100);
    rec1 += RecallAt(r1.ids.data() + q * truth.k1pct, truth.k1pct,
                     truth.top1pct.ids.data() + q * truth.k1pct, truth.k1pct);
    const SetQuality quality = EvaluateSet(set, full, q, r100.ids.data() + q * 100, 100);
    mass += quality.mass;
    err += quality.out_rel_err;
  }
  row->recall32 = rec32 / nq;
  row->recall100 = rec100 / nq;
  row->recall1pct = rec1 / nq;
  row->mass = mass / nq;
  row->err = err / nq;
  row->scanned = 100.0 * static_cast<double>(r100.stats.keys_scanned) /
                 (static_cast<double>(nq) * static_cast<double>(set.num_keys));
}

// The run's settings: the flags, with --quick applied.
struct Config {
  bool quick = false;
  std::string data_dir;
  std::vector<int64_t> layers, heads, synthetic, tiled;
  int64_t decode = 0, synthetic_decode = 0, batch = 0;
  double step = 0;
  int reps = 0;
  std::vector<std::string> kinds;
  std::map<std::string, std::string> build_params, synthetic_params, tiled_params, efforts;
  int all_threads = 1;
  // Progress on stderr: a bar on a terminal, a line per stage otherwise.
  ProgressMode progress_mode = ProgressMode::kLines;
};

// INVALID_ARGUMENT for a bad flag (exit code 2).
absl::StatusOr<Config> ConfigFromFlags() {
  Config c;
  c.quick = absl::GetFlag(FLAGS_quick);
  c.data_dir = absl::GetFlag(FLAGS_data);
  if (c.data_dir.empty()) c.data_dir = SourceDir() + "/../shared/data/attn-dev";
  c.layers = ParseInts(absl::GetFlag(FLAGS_layers));
  c.heads = ParseInts(absl::GetFlag(FLAGS_kv_heads));
  c.decode = absl::GetFlag(FLAGS_decode);
  c.synthetic = ParseInts(absl::GetFlag(FLAGS_synthetic));
  c.tiled = ParseInts(absl::GetFlag(FLAGS_tiled));
  c.synthetic_decode = absl::GetFlag(FLAGS_synthetic_decode);
  c.step = absl::GetFlag(FLAGS_sweep_step);
  c.reps = absl::GetFlag(FLAGS_reps);
  c.batch = absl::GetFlag(FLAGS_batch);
  if (c.quick) {
    c.layers = {3};
    c.heads = {0};
    c.decode = 32;
    c.synthetic_decode = 32;
    c.step = 4;
    c.reps = 1;
  }
  if (c.step <= 1) return absl::InvalidArgumentError("--sweep_step must be > 1");
  c.kinds = index::IndexKinds();
  if (!absl::GetFlag(FLAGS_kinds).empty()) {
    c.kinds = absl::StrSplit(absl::GetFlag(FLAGS_kinds), ',', absl::SkipWhitespace());
  }
  c.build_params = ParsePerKind(absl::GetFlag(FLAGS_build_params));
  c.synthetic_params = ParsePerKind(absl::GetFlag(FLAGS_synthetic_build_params));
  c.tiled_params = ParsePerKind(absl::GetFlag(FLAGS_tiled_build_params));
  c.efforts = ParsePerKind(absl::GetFlag(FLAGS_efforts));
  c.all_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  c.progress_mode = StderrProgressMode();
  if (!absl::GetFlag(FLAGS_plot).empty() && absl::GetFlag(FLAGS_csv).empty()) {
    return absl::InvalidArgumentError("--plot needs --csv");
  }
  return c;
}

// One evaluation set to run: a capture (layer, head), tiled `copies` times
// when copies > 0, or a synthetic set of synthetic_keys keys.
struct PlannedSet {
  int32_t layer = -1, head = -1;
  int64_t synthetic_keys = 0;
  int64_t copies = 0;
};

std::vector<PlannedSet> PlanSets(const Config& c) {
  std::vector<PlannedSet> sets;
  for (int64_t l : c.layers) {
    for (int64_t h : c.heads) {
      if (c.tiled.empty()) sets.push_back({static_cast<int32_t>(l), static_cast<int32_t>(h), 0, 0});
      for (int64_t copies : c.tiled) {
        sets.push_back({static_cast<int32_t>(l), static_cast<int32_t>(h), 0, copies});
      }
    }
  }
  for (int64_t n : c.synthetic) sets.push_back({-1, -1, n, 0});
  return sets;
}

absl::StatusOr<EvalSet> LoadSet(const Config& c, const PlannedSet& p) {
  absl::StatusOr<EvalSet> loaded =
      p.synthetic_keys > 0 ? MakeSynthetic(p.synthetic_keys, c.synthetic_decode, 1)
      : p.copies > 0       ? MakeTiledCapture(c.data_dir, p.layer, p.head, c.decode, p.copies)
                           : LoadCapture(c.data_dir, p.layer, p.head, c.decode);
  const char* required = std::getenv("KVRECALL_REQUIRE_SHARED_DATA");
  const bool capture_required =
      required != nullptr && *required != '\0' && std::string(required) != "0";
  if (c.quick && absl::IsNotFound(loaded.status()) && !capture_required) {
    // The smoke test runs without the capture too (a bare checkout), unless
    // CI requires the shared data (deploy/test.sh).
    std::printf("capture not found under %s: quick run on a synthetic set\n", c.data_dir.c_str());
    loaded = MakeSynthetic(4096, c.synthetic_decode, 1);
  }
  return loaded;
}

// What every row of a set is measured against.
struct SetContext {
  const EvalSet* set = nullptr;
  VectorView keys, training, queries;
  Truth truth;
  FullAttention full;
};

Row NewRow(const EvalSet& set) {
  Row row;
  row.set = set.name;
  row.layer = set.layer;
  row.kv_head = set.kv_head;
  row.n = set.num_keys;
  return row;
}

// The oracle rows: the exact top --window_budget of the keys, and sinks +
// the most recent keys of the same budget.
void AddOracleRows(const SetContext& sc, const KeyIndex& flat, std::vector<Row>* rows) {
  const EvalSet& set = *sc.set;
  const int64_t n = set.num_keys, nq = set.num_queries;
  const int64_t budget = std::max<int64_t>(
      1, std::llround(absl::GetFlag(FLAGS_window_budget) * static_cast<double>(n)));
  auto top = flat.Search(sc.queries, static_cast<int32_t>(budget), {}).value();
  const int64_t sinks = std::min(absl::GetFlag(FLAGS_sinks), budget);
  std::vector<int64_t> window;
  for (int64_t i = 0; i < sinks; ++i) window.push_back(i);
  for (int64_t i = n - (budget - sinks); i < n; ++i) window.push_back(i);
  const Truth& truth = sc.truth;
  for (int which = 0; which < 2; ++which) {
    Row row = NewRow(set);
    row.kind = which == 0 ? "oracle_top" : "sink+window";
    row.knob = "budget";
    row.effort = budget;
    row.timed = false;
    double r32 = 0, r100 = 0, r1 = 0, mass = 0, err = 0;
    for (int64_t q = 0; q < nq; ++q) {
      const int64_t* ids = which == 0 ? top.ids.data() + q * budget : window.data();
      r32 += RecallAt(ids, budget, truth.top32.ids.data() + q * 32, 32);
      r100 += RecallAt(ids, budget, truth.top100.ids.data() + q * 100, 100);
      r1 += RecallAt(ids, budget, truth.top1pct.ids.data() + q * truth.k1pct, truth.k1pct);
      const SetQuality quality = EvaluateSet(set, sc.full, q, ids, budget);
      mass += quality.mass;
      err += quality.out_rel_err;
    }
    row.recall32 = r32 / nq;
    row.recall100 = r100 / nq;
    row.recall1pct = r1 / nq;
    row.mass = mass / nq;
    row.err = err / nq;
    row.scanned = which == 0 ? 100.0 : 0.0;
    PrintRow(row);
    rows->push_back(row);
  }
}

// The build params of `kind` for set `p`: --build_params, plus the
// synthetic or tiled ones.
absl::StatusOr<ParamMap> BuildParamsFor(const Config& c, const PlannedSet& p,
                                        const std::string& kind) {
  std::string text;
  if (auto it = c.build_params.find(kind); it != c.build_params.end()) text = it->second;
  const std::map<std::string, std::string>* extra =
      p.synthetic_keys > 0 ? &c.synthetic_params : p.copies > 0 ? &c.tiled_params : nullptr;
  if (extra != nullptr) {
    if (auto it = extra->find(kind); it != extra->end()) {
      text = text.empty() ? it->second : text + "," + it->second;
    }
  }
  auto parsed = ParamMap::Parse(text);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(kind, ": ", parsed.status().message()));
  }
  return parsed;
}

// The knob values to sweep for `index`: --efforts, else the default sweep.
std::vector<int64_t> EffortsFor(const Config& c, const std::string& kind, const KeyIndex& index) {
  if (index.SearchEffortKnob().empty()) return {0};
  if (auto it = c.efforts.find(kind); it != c.efforts.end()) return ParseInts(it->second);
  return Sweep(index.MaxSearchEffort(), c.step);
}

// Seconds per batch of all decode queries, best of the repetitions, on 1
// thread and on all threads. `first_s` is the time of the first untimed
// search on 1 thread (kept when --batch=0).
absl::Status TimePoint(const Config& c, const SetContext& sc, const KeyIndex& index,
                       SearchParams params, double first_s, Row* row) {
  const int64_t nq = sc.set->num_queries;
  // All decode queries at once (--batch=0) or calls of --batch queries.
  auto timed = [&](int threads) -> absl::StatusOr<double> {
    params.num_threads = threads;
    const int64_t step = c.batch > 0 ? c.batch : nq;
    const auto t1 = std::chrono::steady_clock::now();
    for (int64_t b = 0; b < nq; b += step) {
      VectorView part = sc.queries;
      part.data = sc.queries.row(b);
      part.rows = std::min(step, nq - b);
      KVR_RETURN_IF_ERROR(index.Search(part, 100, params).status());
    }
    return Seconds(t1);
  };
  // A slow point (seconds per batch) is timed once.
  double best1 = c.batch > 0 ? 1e30 : first_s, best_all = 1e30;
  const int point_reps = first_s > 1.0 ? 1 : c.reps;
  for (int rep = 0; rep < point_reps; ++rep) {
    if (c.batch > 0 || rep > 0) {
      KVR_ASSIGN_OR_RETURN(double s1, timed(1));
      best1 = std::min(best1, s1);
    }
    KVR_ASSIGN_OR_RETURN(double s_all, timed(c.all_threads));
    best_all = std::min(best_all, s_all);
  }
  row->us_1t = best1 * 1e6 / static_cast<double>(nq);
  row->us_all = best_all * 1e6 / static_cast<double>(nq);
  return absl::OkStatus();
}

// Builds `kind` over the set and sweeps its effort knob: a row per distinct
// operating point.
absl::Status RunKind(const Config& c, const PlannedSet& p, const SetContext& sc,
                     const std::string& kind, std::vector<Row>* rows) {
  const EvalSet& set = *sc.set;
  const int64_t n = set.num_keys;
  BuildOptions options;
  KVR_ASSIGN_OR_RETURN(options.params, BuildParamsFor(c, p, kind));
  StageProgress build_progress(&std::cerr, absl::StrCat("  build ", kind), c.progress_mode);
  options.progress = [&](const Progress& pr) { return build_progress.Update(pr); };
  const auto t0 = std::chrono::steady_clock::now();
  auto built = index::BuildIndex(kind, sc.keys, sc.training, options);
  const double build_s = Seconds(t0);
  build_progress.Clear();
  std::fprintf(stderr, "  build %s: %.2f s\n", kind.c_str(), build_s);
  if (!built.ok()) {
    return absl::Status(built.status().code(),
                        absl::StrCat("build ", kind, ": ", built.status().message()));
  }
  const KeyIndex& index = **built;
  const std::string knob(index.SearchEffortKnob());
  const std::vector<int64_t> values = EffortsFor(c, kind, index);
  Row previous;
  bool have_previous = false;
  StageProgress search_progress(&std::cerr, absl::StrCat("  search ", kind), c.progress_mode);
  for (size_t vi = 0; vi < values.size(); ++vi) {
    const int64_t effort = values[vi];
    Progress point;
    point.stage = knob.empty() ? "exact" : absl::StrCat("sweep of ", knob);
    point.done = static_cast<int64_t>(vi);
    point.total = static_cast<int64_t>(values.size());
    point.fraction = static_cast<double>(vi) / static_cast<double>(values.size());
    search_progress.Update(point);
    SearchParams params;
    if (!knob.empty()) params.knobs.SetInt(knob, effort);
    auto run = [&](int32_t k, int threads) {
      params.num_threads = threads;
      return index.Search(sc.queries, k, params);
    };
    const auto t_first = std::chrono::steady_clock::now();
    auto r100 = run(100, 1);
    const double first_s = Seconds(t_first);
    auto r32 = run(32, 0);
    auto r1 = run(sc.truth.k1pct, 0);
    if (!r100.ok() || !r32.ok() || !r1.ok()) {
      search_progress.Clear();
      const absl::Status s = !r100.ok() ? r100.status() : !r32.ok() ? r32.status() : r1.status();
      return absl::Status(s.code(), absl::StrCat("search ", kind, ": ", s.message()));
    }
    Row row = NewRow(set);
    row.kind = kind;
    row.knob = knob;
    row.effort = effort;
    row.build_s = build_s;
    row.index_bytes_per_key = static_cast<double>(index.IndexBytes()) / static_cast<double>(n);
    row.key_bytes_per_key = static_cast<double>(index.KeyBytes()) / static_cast<double>(n);
    FillQuality(set, sc.full, sc.truth, *r32, *r100, *r1, &row);
    // The same operating point as the previous value (e.g. ef < k): skip.
    if (have_previous && row.scanned == previous.scanned &&
        row.recall100 == previous.recall100) {
      continue;
    }
    params.num_threads = 0;
    const absl::Status timed = TimePoint(c, sc, index, params, first_s, &row);
    search_progress.Clear();
    KVR_RETURN_IF_ERROR(timed);
    PrintRow(row);
    rows->push_back(row);
    previous = row;
    have_previous = true;
  }
  search_progress.Clear();
  return absl::OkStatus();
}

// For one set: the cheapest point of each kind reaching recall@100 >= 0.95,
// against flat (latency) and faiss_hnsw (keys scanned).
void PrintSummary(const Config& c, const std::string& set_name, const std::vector<Row>& rows) {
  const Row* flat_row = nullptr;
  std::map<std::string, const Row*> at95;
  for (const Row& r : rows) {
    if (r.set != set_name) continue;
    if (r.kind == "flat") flat_row = &r;
    if (r.timed && r.recall100 >= 0.95) {
      auto it = at95.find(r.kind);
      if (it == at95.end() || r.scanned < it->second->scanned) at95[r.kind] = &r;
    }
  }
  std::printf("-- %s at recall@100 >= 0.95 (cheapest swept point):\n", set_name.c_str());
  for (const std::string& kind : c.kinds) {
    auto it = at95.find(kind);
    if (it == at95.end()) {
      std::printf("   %-11s not reached\n", kind.c_str());
      continue;
    }
    const Row& r = *it->second;
    std::string vs_hnsw;
    if (auto h = at95.find("faiss_hnsw"); h != at95.end() && kind != "faiss_hnsw") {
      vs_hnsw = absl::StrFormat(", %.1fx fewer keys than faiss_hnsw", h->second->scanned / r.scanned);
    }
    std::string vs_flat;
    if (flat_row != nullptr && kind != "flat") {
      vs_flat = absl::StrFormat(", %.1fx (1 thread) / %.1fx (%d threads) faster than flat",
                                flat_row->us_1t / r.us_1t, flat_row->us_all / r.us_all,
                                c.all_threads);
    }
    const std::string point = r.knob.empty() ? "exact" : absl::StrCat(r.knob, "=", r.effort);
    std::printf("   %-11s %s: %.2f%% scanned, %.1f us/query%s%s\n", kind.c_str(), point.c_str(),
                r.scanned, r.us_1t, vs_flat.c_str(), vs_hnsw.c_str());
  }
}

// Loads set `p`, computes its ground truth and runs every kind on it.
absl::Status RunSet(const Config& c, const PlannedSet& p, size_t ordinal, size_t count,
                    std::vector<Row>* rows) {
  KVR_ASSIGN_OR_RETURN(const EvalSet set, LoadSet(c, p));
  const int64_t n = set.num_keys, nq = set.num_queries;
  std::fprintf(stderr, "[%zu/%zu] %s: %lld keys, %lld queries, %lld training queries\n", ordinal,
               count, set.name.c_str(), static_cast<long long>(n), static_cast<long long>(nq),
               static_cast<long long>(set.num_training));
  SetContext sc;
  sc.set = &set;
  sc.keys = VectorView{set.keys.data(), n, set.dim, DType::kF16, 0};
  sc.training = VectorView{set.training.data(), set.num_training, set.dim, set.training_dtype, 0};
  sc.queries = VectorView::F32(set.queries.data(), nq, set.dim);
  // Ground truth and full attention.
  KVR_ASSIGN_OR_RETURN(auto flat, index::BuildIndex("flat", sc.keys, sc.training, BuildOptions()));
  sc.truth.k1pct = static_cast<int32_t>(std::max<int64_t>(1, n / 100));
  KVR_ASSIGN_OR_RETURN(sc.truth.top32, flat->Search(sc.queries, 32, {}));
  KVR_ASSIGN_OR_RETURN(sc.truth.top100, flat->Search(sc.queries, 100, {}));
  KVR_ASSIGN_OR_RETURN(sc.truth.top1pct, flat->Search(sc.queries, sc.truth.k1pct, {}));
  sc.full = ComputeFullAttention(set, 0);

  std::printf("\n== %s: %lld keys x %d dims, %lld decode queries, %lld training queries\n",
              set.name.c_str(), static_cast<long long>(n), set.dim, static_cast<long long>(nq),
              static_cast<long long>(set.num_training));
  PrintHeader();
  AddOracleRows(sc, *flat, rows);
  for (const std::string& kind : c.kinds) KVR_RETURN_IF_ERROR(RunKind(c, p, sc, kind, rows));
  PrintSummary(c, set.name, *rows);
  return absl::OkStatus();
}

absl::Status WriteCsv(const std::string& path, const std::vector<Row>& rows, int all_threads) {
  std::ofstream out(path);
  out << "set,layer,kv_head,n,kind,knob,effort,recall32,recall100,recall1pct,mass100,"
         "out_err100,pct_scanned,build_s,index_bytes_per_key,key_bytes_per_key,us_per_query_1t,"
         "us_per_query_all,threads\n";
  for (const Row& r : rows) {
    out << absl::StrFormat("%s,%d,%d,%d,%s,%s,%d,%.4f,%.4f,%.4f,%.4f,%.5f,%.4f,%.3f,%.1f,%.1f,%s,%s,%d\n",
                           r.set, r.layer, r.kv_head, r.n, r.kind, r.knob, r.effort, r.recall32,
                           r.recall100, r.recall1pct, r.mass, r.err, r.scanned, r.build_s,
                           r.index_bytes_per_key, r.key_bytes_per_key,
                           r.timed ? absl::StrFormat("%.2f", r.us_1t) : "",
                           r.timed ? absl::StrFormat("%.2f", r.us_all) : "", all_threads);
  }
  if (!out.good()) return absl::InternalError(absl::StrCat("cannot write ", path));
  std::printf("\nwrote %s\n", path.c_str());
  return absl::OkStatus();
}

absl::Status Plot(const std::string& csv, const std::string& png) {
  const std::string cmd = absl::StrCat("/usr/bin/python3 '", SourceDir(),
                                       "/bench/index/plot_index.py' '", csv, "' '", png, "'");
  if (std::system(cmd.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("plotting failed: ", cmd));
  }
  std::printf("wrote %s\n", png.c_str());
  return absl::OkStatus();
}

absl::Status Run(const Config& c) {
  std::printf("index_bench: %s\nmachine: %s\n", c.quick ? "quick" : "full sweep",
              MachineDescription().c_str());
  std::printf("kinds: %s\n", absl::StrJoin(c.kinds, ", ").c_str());
  std::printf("attention over the indexed prefix; latency = time of %s / decode queries\n",
              c.batch > 0 ? absl::StrCat("calls of ", c.batch, " queries").c_str()
                          : "one call with all decode queries");
  std::vector<Row> rows;
  const std::vector<PlannedSet> sets = PlanSets(c);
  for (size_t si = 0; si < sets.size(); ++si) {
    KVR_RETURN_IF_ERROR(RunSet(c, sets[si], si + 1, sets.size(), &rows));
  }
  const std::string csv = absl::GetFlag(FLAGS_csv);
  if (!csv.empty()) KVR_RETURN_IF_ERROR(WriteCsv(csv, rows, c.all_threads));
  const std::string plot = absl::GetFlag(FLAGS_plot);
  if (!plot.empty()) KVR_RETURN_IF_ERROR(Plot(csv, plot));
  return absl::OkStatus();
}

int Main() {
  absl::StatusOr<Config> config = ConfigFromFlags();
  absl::Status status = config.ok() ? Run(*config) : config.status();
  if (status.ok()) return 0;
  std::fprintf(stderr, "index_bench: %s\n", status.ToString().c_str());
  return absl::IsInvalidArgument(status) && !config.ok() ? 2 : 1;
}

}  // namespace
}  // namespace kvrecall::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvrecall::bench::Main();
}
