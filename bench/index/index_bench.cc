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

// Main()'s own error exit for a StatusOr.
#define KVR_ASSIGN_OR_RETURN_MAIN(lhs, rexpr)                                        \
  auto KVR_STATUS_MACROS_CONCAT_(main_or_, __LINE__) = (rexpr);                        \
  if (!KVR_STATUS_MACROS_CONCAT_(main_or_, __LINE__).ok()) {                           \
    std::fprintf(stderr, "\nindex_bench: %s\n",                                       \
                 KVR_STATUS_MACROS_CONCAT_(main_or_, __LINE__).status().ToString().c_str()); \
    return 1;                                                                        \
  }                                                                                  \
  lhs = *KVR_STATUS_MACROS_CONCAT_(main_or_, __LINE__)

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

int Main() {
  const bool quick = absl::GetFlag(FLAGS_quick);
  std::string data_dir = absl::GetFlag(FLAGS_data);
  if (data_dir.empty()) data_dir = SourceDir() + "/../shared/data/attn-dev";
  std::vector<int64_t> layers = ParseInts(absl::GetFlag(FLAGS_layers));
  std::vector<int64_t> heads = ParseInts(absl::GetFlag(FLAGS_kv_heads));
  int64_t decode = absl::GetFlag(FLAGS_decode);
  std::vector<int64_t> synthetic = ParseInts(absl::GetFlag(FLAGS_synthetic));
  int64_t synthetic_decode = absl::GetFlag(FLAGS_synthetic_decode);
  double step = absl::GetFlag(FLAGS_sweep_step);
  int reps = absl::GetFlag(FLAGS_reps);
  const int64_t batch = absl::GetFlag(FLAGS_batch);
  if (quick) {
    layers = {3};
    heads = {0};
    decode = 32;
    synthetic_decode = 32;
    step = 4;
    reps = 1;
  }
  if (step <= 1) {
    std::fprintf(stderr, "--sweep_step must be > 1\n");
    return 2;
  }
  std::vector<std::string> kinds = index::IndexKinds();
  if (!absl::GetFlag(FLAGS_kinds).empty()) {
    kinds = absl::StrSplit(absl::GetFlag(FLAGS_kinds), ',', absl::SkipWhitespace());
  }
  const std::map<std::string, std::string> build_params =
      ParsePerKind(absl::GetFlag(FLAGS_build_params));
  const std::map<std::string, std::string> synthetic_params =
      ParsePerKind(absl::GetFlag(FLAGS_synthetic_build_params));
  const std::map<std::string, std::string> efforts = ParsePerKind(absl::GetFlag(FLAGS_efforts));
  const int all_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // Progress on stderr: a bar on a terminal, a line per stage otherwise.
  const ProgressMode progress_mode = StderrProgressMode();

  std::printf("index_bench: %s\nmachine: %s\n", quick ? "quick" : "full sweep",
              MachineDescription().c_str());
  std::printf("kinds: %s\n", absl::StrJoin(kinds, ", ").c_str());
  std::printf("attention over the indexed prefix; latency = time of %s / decode queries\n",
              batch > 0 ? absl::StrCat("calls of ", batch, " queries").c_str()
                        : "one call with all decode queries");

  std::vector<Row> rows;
  struct Pending {
    int32_t layer, head;
    int64_t synthetic_keys;
    int64_t copies;
  };
  std::vector<Pending> sets;
  const std::vector<int64_t> tiled = ParseInts(absl::GetFlag(FLAGS_tiled));
  for (int64_t l : layers) {
    for (int64_t h : heads) {
      if (tiled.empty()) sets.push_back({static_cast<int32_t>(l), static_cast<int32_t>(h), 0, 0});
      for (int64_t c : tiled) {
        sets.push_back({static_cast<int32_t>(l), static_cast<int32_t>(h), 0, c});
      }
    }
  }
  for (int64_t n : synthetic) sets.push_back({-1, -1, n, 0});
  const std::map<std::string, std::string> tiled_params =
      ParsePerKind(absl::GetFlag(FLAGS_tiled_build_params));

  for (size_t si = 0; si < sets.size(); ++si) {
    const Pending& p = sets[si];
    absl::StatusOr<EvalSet> loaded =
        p.synthetic_keys > 0 ? MakeSynthetic(p.synthetic_keys, synthetic_decode, 1)
        : p.copies > 0       ? MakeTiledCapture(data_dir, p.layer, p.head, decode, p.copies)
                             : LoadCapture(data_dir, p.layer, p.head, decode);
    if (quick && absl::IsNotFound(loaded.status())) {
      // The smoke test runs without the capture too (a bare CI checkout).
      std::printf("capture not found under %s: quick run on a synthetic set\n", data_dir.c_str());
      loaded = MakeSynthetic(4096, synthetic_decode, 1);
    }
    if (!loaded.ok()) {
      std::fprintf(stderr, "index_bench: %s\n", loaded.status().ToString().c_str());
      return 1;
    }
    const EvalSet& set = *loaded;
    const int64_t n = set.num_keys, nq = set.num_queries;
    std::fprintf(stderr, "[%zu/%zu] %s: %lld keys, %lld queries, %lld training queries\n", si + 1,
                 sets.size(), set.name.c_str(), static_cast<long long>(n),
                 static_cast<long long>(nq), static_cast<long long>(set.num_training));
    const VectorView keys{set.keys.data(), n, set.dim, DType::kF16, 0};
    const VectorView training{set.training.data(), set.num_training, set.dim, set.training_dtype,
                              0};
    const VectorView queries = VectorView::F32(set.queries.data(), nq, set.dim);

    // Ground truth and full attention.
    auto flat = index::BuildIndex("flat", keys, training, BuildOptions());
    if (!flat.ok()) {
      std::fprintf(stderr, "index_bench: %s\n", flat.status().ToString().c_str());
      return 1;
    }
    Truth truth;
    truth.k1pct = static_cast<int32_t>(std::max<int64_t>(1, n / 100));
    truth.top32 = (*flat)->Search(queries, 32, {}).value();
    truth.top100 = (*flat)->Search(queries, 100, {}).value();
    truth.top1pct = (*flat)->Search(queries, truth.k1pct, {}).value();
    const FullAttention full = ComputeFullAttention(set, 0);

    std::printf("\n== %s: %lld keys x %d dims, %lld decode queries, %lld training queries\n",
                set.name.c_str(), static_cast<long long>(n), set.dim, static_cast<long long>(nq),
                static_cast<long long>(set.num_training));
    PrintHeader();
    // Oracle rows.
    {
      const int64_t budget = std::max<int64_t>(
          1, std::llround(absl::GetFlag(FLAGS_window_budget) * static_cast<double>(n)));
      auto top = (*flat)->Search(queries, static_cast<int32_t>(budget), {}).value();
      const int64_t sinks = std::min(absl::GetFlag(FLAGS_sinks), budget);
      std::vector<int64_t> window;
      for (int64_t i = 0; i < sinks; ++i) window.push_back(i);
      for (int64_t i = n - (budget - sinks); i < n; ++i) window.push_back(i);
      for (int which = 0; which < 2; ++which) {
        Row row;
        row.set = set.name;
        row.layer = set.layer;
        row.kv_head = set.kv_head;
        row.n = n;
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
          const SetQuality quality = EvaluateSet(set, full, q, ids, budget);
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
        rows.push_back(row);
      }
    }

    for (const std::string& kind : kinds) {
      BuildOptions options;
      std::string params_text;
      if (auto it = build_params.find(kind); it != build_params.end()) params_text = it->second;
      const std::map<std::string, std::string>* extra =
          p.synthetic_keys > 0 ? &synthetic_params : p.copies > 0 ? &tiled_params : nullptr;
      if (extra != nullptr) {
        if (auto it = extra->find(kind); it != extra->end()) {
          params_text = params_text.empty() ? it->second : params_text + "," + it->second;
        }
      }
      auto parsed = ParamMap::Parse(params_text);
      if (!parsed.ok()) {
        std::fprintf(stderr, "index_bench: %s: %s\n", kind.c_str(),
                     parsed.status().ToString().c_str());
        return 2;
      }
      options.params = *parsed;
      StageProgress build_progress(&std::cerr, absl::StrCat("  build ", kind), progress_mode);
      options.progress = [&](const Progress& pr) { return build_progress.Update(pr); };
      const auto t0 = std::chrono::steady_clock::now();
      auto built = index::BuildIndex(kind, keys, training, options);
      const double build_s = Seconds(t0);
      build_progress.Clear();
      std::fprintf(stderr, "  build %s: %.2f s\n", kind.c_str(), build_s);
      if (!built.ok()) {
        std::fprintf(stderr, "index_bench: build %s: %s\n", kind.c_str(),
                     built.status().ToString().c_str());
        return 1;
      }
      const KeyIndex& index = **built;
      const std::string knob(index.SearchEffortKnob());
      std::vector<int64_t> values;
      if (knob.empty()) {
        values = {0};
      } else if (auto it = efforts.find(kind); it != efforts.end()) {
        values = ParseInts(it->second);
      } else {
        values = Sweep(index.MaxSearchEffort(), step);
      }
      Row previous;
      bool have_previous = false;
      StageProgress search_progress(&std::cerr, absl::StrCat("  search ", kind), progress_mode);
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
          return index.Search(queries, k, params);
        };
        // The timed query batches: all decode queries at once (--batch=0)
        // or calls of --batch queries, one after another.
        auto timed = [&](int threads) -> absl::StatusOr<double> {
          params.num_threads = threads;
          const int64_t step = batch > 0 ? batch : nq;
          const auto t1 = std::chrono::steady_clock::now();
          for (int64_t b = 0; b < nq; b += step) {
            VectorView part = queries;
            part.data = queries.row(b);
            part.rows = std::min(step, nq - b);
            KVR_RETURN_IF_ERROR(index.Search(part, 100, params).status());
          }
          return Seconds(t1);
        };
        const auto t_first = std::chrono::steady_clock::now();
        auto r100 = run(100, 1);
        const double first_s = Seconds(t_first);
        auto r32 = run(32, 0);
        auto r1 = run(truth.k1pct, 0);
        if (!r100.ok() || !r32.ok() || !r1.ok()) {
          const absl::Status s = !r100.ok() ? r100.status() : !r32.ok() ? r32.status() : r1.status();
          search_progress.Clear();
          std::fprintf(stderr, "index_bench: search %s: %s\n", kind.c_str(), s.ToString().c_str());
          return 1;
        }
        Row row;
        row.set = set.name;
        row.layer = set.layer;
        row.kv_head = set.kv_head;
        row.n = n;
        row.kind = kind;
        row.knob = knob;
        row.effort = effort;
        row.build_s = build_s;
        row.index_bytes_per_key = static_cast<double>(index.IndexBytes()) / static_cast<double>(n);
        row.key_bytes_per_key = static_cast<double>(index.KeyBytes()) / static_cast<double>(n);
        FillQuality(set, full, truth, *r32, *r100, *r1, &row);
        // The same operating point as the previous value (e.g. ef < k): skip.
        if (have_previous && row.scanned == previous.scanned &&
            row.recall100 == previous.recall100) {
          continue;
        }
        // A slow point (seconds per batch) is timed once.
        double best1 = batch > 0 ? 1e30 : first_s, best_all = 1e30;
        const int point_reps = first_s > 1.0 ? 1 : reps;
        for (int rep = 0; rep < point_reps; ++rep) {
          if (batch > 0 || rep > 0) {
            KVR_ASSIGN_OR_RETURN_MAIN(double s1, timed(1));
            best1 = std::min(best1, s1);
          }
          KVR_ASSIGN_OR_RETURN_MAIN(double s_all, timed(all_threads));
          best_all = std::min(best_all, s_all);
        }
        row.us_1t = best1 * 1e6 / static_cast<double>(nq);
        row.us_all = best_all * 1e6 / static_cast<double>(nq);
        search_progress.Clear();
        PrintRow(row);
        rows.push_back(row);
        previous = row;
        have_previous = true;
      }
      search_progress.Clear();
    }

    // Summary for this set: the cheapest point of each kind reaching
    // recall@100 >= 0.95, against flat (latency) and faiss_hnsw (scanned).
    const Row* flat_row = nullptr;
    std::map<std::string, const Row*> at95;
    for (const Row& r : rows) {
      if (r.set != set.name) continue;
      if (r.kind == "flat") flat_row = &r;
      if (r.timed && r.recall100 >= 0.95) {
        auto it = at95.find(r.kind);
        if (it == at95.end() || r.scanned < it->second->scanned) at95[r.kind] = &r;
      }
    }
    std::printf("-- %s at recall@100 >= 0.95 (cheapest swept point):\n", set.name.c_str());
    for (const std::string& kind : kinds) {
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
                                  all_threads);
      }
      const std::string point =
          r.knob.empty() ? "exact" : absl::StrCat(r.knob, "=", r.effort);
      std::printf("   %-11s %s: %.2f%% scanned, %.1f us/query%s%s\n", kind.c_str(),
                  point.c_str(), r.scanned, r.us_1t, vs_flat.c_str(), vs_hnsw.c_str());
    }
  }

  const std::string csv = absl::GetFlag(FLAGS_csv);
  if (!csv.empty()) {
    std::ofstream out(csv);
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
    if (!out.good()) {
      std::fprintf(stderr, "index_bench: cannot write %s\n", csv.c_str());
      return 1;
    }
    std::printf("\nwrote %s\n", csv.c_str());
  }
  const std::string plot = absl::GetFlag(FLAGS_plot);
  if (!plot.empty()) {
    if (csv.empty()) {
      std::fprintf(stderr, "index_bench: --plot needs --csv\n");
      return 2;
    }
    const std::string cmd = absl::StrCat("/usr/bin/python3 '", SourceDir(),
                                         "/bench/index/plot_index.py' '", csv, "' '", plot, "'");
    if (std::system(cmd.c_str()) != 0) {
      std::fprintf(stderr, "index_bench: plotting failed: %s\n", cmd.c_str());
      return 1;
    }
    std::printf("wrote %s\n", plot.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace kvrecall::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvrecall::bench::Main();
}
