// index_lrq_eval: quality of the loki, quest and inverted key indexes on the
// real attention captures of kvr-tiny-llama (--data_dir, attn-dev), with
// the flat index as the exact peer measured in the same run.
//
// Protocol (docs/index_lrq.md): per layer and KV head g, queries = the last
// --queries positions of the two query heads of the group (2g, 2g+1), keys =
// the prefix before them, p = softmax over the prefix of q·k/sqrt(d), budget
// B = round(--budget × prefix). Each method returns B positions per query;
// we report mass(method, B) / mass(exact top-B) (ratio of means over the
// queries), recall@B, the relative output error ‖o_S − o*‖/‖o*‖ of attention
// restricted to the returned positions, the fractions of keys scanned and
// scored exactly, posting entries visited, and CPU time per query against
// flat's. Calibration (PCA, encoder training) uses the prefix keys (and, for
// the query-trained encoder, the prefix queries): never the evaluated queries.
//
//   build-idxb/bin/index_lrq_eval [--layers=1,3,5,7] [--kinds=loki,quest,inverted]

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/index/machine_info.h"
#include "common/half.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "index/distance.h"
#include "index/flat/flat_index.h"
#include "index/inverted/inverted_index.h"
#include "index/loki/loki_index.h"
#include "index/quest/quest_index.h"

ABSL_FLAG(std::string, data_dir, "", "attn-dev directory (default ../shared/data/attn-dev)");
ABSL_FLAG(std::string, layers, "1,3,5,7", "layers to evaluate");
ABSL_FLAG(std::string, kinds, "loki,quest,inverted", "kinds to evaluate");
ABSL_FLAG(int, queries, 256, "last positions used as queries; the prefix before them is indexed");
ABSL_FLAG(double, budget, 0.02, "B as a fraction of the prefix");
ABSL_FLAG(int, threads, 1, "search threads (1 gives per-query CPU time)");
ABSL_FLAG(int, encoder_features, 1024, "sparse encoder F");
ABSL_FLAG(int, encoder_k, 8, "sparse encoder κ");
ABSL_FLAG(int, encoder_epochs, 10, "sparse encoder training epochs");
ABSL_FLAG(int, encoder_aux_k, -1, "AuxK dead-feature loss: -1 = 2κ, 0 = off");
ABSL_FLAG(bool, per_head, true, "print the table of every (layer, KV head)");

namespace kvrecall::index {
namespace {

constexpr int kHeadDim = 128;
constexpr int kPositions = 8192;

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// One (layer, KV head) of the protocol.
struct Head {
  int layer = 0;
  int kv_head = 0;
  int64_t prefix = 0;           // P
  int64_t m = 0;                // query rows (2 × queries)
  int32_t budget = 0;           // B
  std::vector<uint16_t> keys;   // [P, d] f16
  std::vector<uint16_t> queries;  // [m, d] f16: head 2g rows, then head 2g+1 rows
  std::vector<uint16_t> prefix_queries;  // [2P, d] f16, for the query-trained encoder
  std::vector<uint16_t> heldout_keys;    // [queries, d] f16 keys at the query positions
  std::vector<float> values;  // [P, d]
  std::vector<float> scores;  // [m, P] exact q·k
  std::vector<float> probs;   // [m, P] softmax(q·k / sqrt(d))
  std::vector<std::vector<int64_t>> top;  // [m] exact top-B positions
  std::vector<double> oracle_mass;        // [m]
  std::vector<std::vector<float>> full_out;  // [m][d] o*
  VectorView key_view() const { return VectorView{keys.data(), prefix, kHeadDim, DType::kF16, 0}; }
  VectorView query_view() const { return VectorView{queries.data(), m, kHeadDim, DType::kF16, 0}; }
};

absl::StatusOr<Head> LoadHead(const std::string& dir, int layer, int g, int num_queries,
                              double budget_fraction) {
  const std::string prefix = absl::StrFormat("%s/layer%02d_", dir, layer);
  KVR_ASSIGN_OR_RETURN(NpyArray k, ReadNpy(prefix + "k.npy"));
  KVR_ASSIGN_OR_RETURN(NpyArray q, ReadNpy(prefix + "q.npy"));
  KVR_ASSIGN_OR_RETURN(NpyArray v, ReadNpy(prefix + "v.npy"));
  if (k.descr != "<f2" || k.shape != std::vector<int64_t>{2, kPositions, kHeadDim} ||
      q.shape != std::vector<int64_t>{4, kPositions, kHeadDim} || v.shape != k.shape) {
    return absl::InvalidArgumentError("unexpected capture shapes");
  }
  Head h;
  h.layer = layer;
  h.kv_head = g;
  h.prefix = kPositions - num_queries;
  h.m = 2 * num_queries;
  h.budget = static_cast<int32_t>(std::llround(budget_fraction * h.prefix));
  const uint16_t* kb = k.as<uint16_t>() + static_cast<size_t>(g) * kPositions * kHeadDim;
  const uint16_t* vb = v.as<uint16_t>() + static_cast<size_t>(g) * kPositions * kHeadDim;
  h.keys.assign(kb, kb + h.prefix * kHeadDim);
  h.heldout_keys.assign(kb + h.prefix * kHeadDim, kb + kPositions * kHeadDim);
  h.values.resize(static_cast<size_t>(h.prefix) * kHeadDim);
  ConvertToFloat(vb, DType::kF16, h.values.size(), h.values.data());
  for (int qh = 2 * g; qh < 2 * g + 2; ++qh) {
    const uint16_t* qb = q.as<uint16_t>() + static_cast<size_t>(qh) * kPositions * kHeadDim;
    h.queries.insert(h.queries.end(), qb + h.prefix * kHeadDim, qb + kPositions * kHeadDim);
    h.prefix_queries.insert(h.prefix_queries.end(), qb, qb + h.prefix * kHeadDim);
  }
  // Exact scores, softmax, top-B and o*.
  h.scores.resize(static_cast<size_t>(h.m) * h.prefix);
  h.probs.resize(h.scores.size());
  h.top.resize(static_cast<size_t>(h.m));
  h.oracle_mass.resize(static_cast<size_t>(h.m));
  h.full_out.assign(static_cast<size_t>(h.m), std::vector<float>(kHeadDim, 0.0f));
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  std::vector<float> qf(kHeadDim);
  for (int64_t i = 0; i < h.m; ++i) {
    ConvertToFloat(h.queries.data() + i * kHeadDim, DType::kF16, kHeadDim, qf.data());
    float* s = h.scores.data() + i * h.prefix;
    ScoreRows(qf.data(), h.keys.data(), DType::kF16, h.prefix, kHeadDim, kHeadDim, s);
    const float mx = *std::max_element(s, s + h.prefix);
    double z = 0;
    float* p = h.probs.data() + i * h.prefix;
    for (int64_t t = 0; t < h.prefix; ++t) z += p[t] = std::exp((s[t] - mx) * scale);
    for (int64_t t = 0; t < h.prefix; ++t) p[t] = static_cast<float>(p[t] / z);
    std::vector<int64_t> order(static_cast<size_t>(h.prefix));
    for (int64_t t = 0; t < h.prefix; ++t) order[static_cast<size_t>(t)] = t;
    std::partial_sort(order.begin(), order.begin() + h.budget, order.end(),
                      [&](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
    order.resize(static_cast<size_t>(h.budget));
    double mass = 0;
    for (int64_t t : order) mass += p[t];
    h.oracle_mass[static_cast<size_t>(i)] = mass;
    h.top[static_cast<size_t>(i)] = std::move(order);
    for (int64_t t = 0; t < h.prefix; ++t) {
      const float* vt = h.values.data() + t * kHeadDim;
      for (int j = 0; j < kHeadDim; ++j) h.full_out[static_cast<size_t>(i)][j] += p[t] * vt[j];
    }
  }
  return h;
}

// One evaluated configuration.
struct Row {
  std::string method;
  std::string config;
  double mass_ratio = 0;    // mean mass / mean oracle mass
  double recall = 0;        // mean recall@B
  double out_err = 0;       // mean ‖o_S − o*‖ / ‖o*‖
  double scanned = 0;       // keys_scanned / (m · P)
  double exact = 0;         // exact_scores / (m · P)
  double visited = 0;       // visited / m
  double ms_per_query = 0;  // CPU time per query row
  double vs_flat = 0;       // ms_per_query / flat's ms_per_query
  double tokens = 0;        // mean positions selected per query (spans may select fewer than B)
};

// Metrics of position sets ids[i] (for query row i).
void Score(const Head& h, const std::vector<std::vector<int64_t>>& ids, Row* row) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  double mass = 0, oracle = 0, recall = 0, err = 0, tokens = 0;
  for (int64_t i = 0; i < h.m; ++i) {
    const std::vector<int64_t>& sel = ids[static_cast<size_t>(i)];
    const float* p = h.probs.data() + i * h.prefix;
    const float* s = h.scores.data() + i * h.prefix;
    const std::set<int64_t> top(h.top[static_cast<size_t>(i)].begin(), h.top[static_cast<size_t>(i)].end());
    double m = 0, hit = 0, mx = -INFINITY, z = 0;
    for (int64_t t : sel) {
      m += p[t];
      hit += top.count(t);
      mx = std::max<double>(mx, s[t]);
    }
    std::vector<double> o(kHeadDim, 0.0);
    for (int64_t t : sel) {
      const double w = std::exp((s[t] - mx) * scale);
      z += w;
      for (int j = 0; j < kHeadDim; ++j) o[j] += w * h.values[static_cast<size_t>(t) * kHeadDim + j];
    }
    double num = 0, den = 0;
    for (int j = 0; j < kHeadDim; ++j) {
      const double oj = sel.empty() ? 0.0 : o[j] / z;
      const double ref = h.full_out[static_cast<size_t>(i)][j];
      num += (oj - ref) * (oj - ref);
      den += ref * ref;
    }
    mass += m;
    oracle += h.oracle_mass[static_cast<size_t>(i)];
    recall += hit / h.budget;
    err += std::sqrt(num / den);
    tokens += static_cast<double>(sel.size());
  }
  row->mass_ratio = mass / oracle;
  row->recall = recall / h.m;
  row->out_err = err / h.m;
  row->tokens = tokens / h.m;
}

// Runs index.Search at k = B and scores it.
Row Evaluate(const Head& h, const KeyIndex& index, const std::string& method,
             const std::string& knobs, double flat_ms) {
  SearchParams params;
  params.knobs = *ParamMap::Parse(knobs);
  params.num_threads = absl::GetFlag(FLAGS_threads);
  const auto start = std::chrono::steady_clock::now();
  auto result = index.Search(h.query_view(), h.budget, params);
  const double secs = Seconds(start);
  Row row;
  row.method = method;
  row.config = knobs;
  if (!result.ok()) {
    row.config += absl::StrCat(" FAILED: ", result.status().ToString());
    return row;
  }
  std::vector<std::vector<int64_t>> ids(static_cast<size_t>(h.m));
  for (int64_t i = 0; i < h.m; ++i) {
    for (int32_t j = 0; j < h.budget; ++j) {
      const int64_t id = result->ids[static_cast<size_t>(i * h.budget + j)];
      if (id >= 0) ids[static_cast<size_t>(i)].push_back(id);
    }
  }
  Score(h, ids, &row);
  const double denom = static_cast<double>(h.m) * h.prefix;
  row.scanned = result->stats.keys_scanned / denom;
  row.exact = result->stats.exact_scores / denom;
  row.visited = static_cast<double>(result->stats.visited) / h.m;
  row.ms_per_query = 1e3 * secs / h.m;
  row.vs_flat = flat_ms > 0 ? row.ms_per_query / flat_ms : 0;
  return row;
}

void PrintRows(const std::vector<Row>& rows) {
  std::printf("| method | config | mass / exact top-B | recall@B | out err | keys scanned | exact scored | visited/q | ms/q | × flat time |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %s | %.3f | %.3f | %.3f | %.1f%% | %.1f%% | %.0f | %.3f | %.2f |\n",
                r.method.c_str(), r.config.c_str(), r.mass_ratio, r.recall, r.out_err,
                100 * r.scanned, 100 * r.exact, r.visited, r.ms_per_query, r.vs_flat);
  }
}

// Loki at ranks 16, 32, 64 with k' = 1, 2, 4, 8 B candidates.
absl::StatusOr<std::vector<Row>> EvaluateLoki(const Head& h, double flat_ms) {
  const int32_t B = h.budget;
  KVR_ASSIGN_OR_RETURN(loki::PcaBasis basis, loki::FitPcaBasis(h.key_view(), {}));
  std::vector<Row> rows;
  for (int r : {16, 32, 64}) {
    loki::LokiOptions options;
    options.rank = r;
    options.basis = basis;
    KVR_ASSIGN_OR_RETURN(auto index, loki::LokiIndex::Create(h.key_view(), options));
    for (int mult : {1, 2, 4, 8}) {
      Row row = Evaluate(h, *index, "loki", absl::StrCat("rank=", r, ",candidates=", mult * B),
                         flat_ms);
      row.config = absl::StrCat("r=", r, ", k'=", mult, "B");
      rows.push_back(row);
    }
  }
  return rows;
}

// Quest with 1 to 16 times B/16 pages.
absl::StatusOr<std::vector<Row>> EvaluateQuest(const Head& h, double flat_ms) {
  KVR_ASSIGN_OR_RETURN(auto index, quest::QuestIndex::Create(h.key_view(), {}));
  const int base = (h.budget + 15) / 16;
  std::vector<Row> rows;
  for (int mult : {1, 2, 4, 8, 16}) {
    Row row = Evaluate(h, *index, "quest", absl::StrCat("pages=", mult * base), flat_ms);
    row.config = absl::StrCat("pages=", mult * base, " (", mult, "B/16)");
    rows.push_back(row);
  }
  return rows;
}

// The inverted index's span retrieval: one call per decode step (the 2
// query rows of a position), windows of 0, ±2 and ±8 around each hit.
absl::StatusOr<std::vector<Row>> EvaluateInvertedSpans(const Head& h,
                                                       const inverted::InvertedIndex& index,
                                                       double flat_ms) {
  std::vector<Row> rows;
  for (int window : {0, 2, 8}) {
    SearchParams params;
    params.knobs.SetInt("window", window);
    params.knobs.SetInt("query_features", 128);
    std::vector<std::vector<int64_t>> ids(static_cast<size_t>(h.m));
    int64_t visited = 0;
    const int64_t nq = h.m / 2;
    const auto start = std::chrono::steady_clock::now();
    for (int64_t t = 0; t < nq; ++t) {
      std::vector<uint16_t> pair(h.queries.begin() + t * kHeadDim,
                                 h.queries.begin() + (t + 1) * kHeadDim);
      pair.insert(pair.end(), h.queries.begin() + (nq + t) * kHeadDim,
                  h.queries.begin() + (nq + t + 1) * kHeadDim);
      KVR_ASSIGN_OR_RETURN(
          auto spans,
          index.SearchSpans(VectorView{pair.data(), 2, kHeadDim, DType::kF16, 0}, h.budget, params));
      visited += spans.stats.visited;
      std::vector<int64_t> sel;
      for (const inverted::Span& s : spans.spans) {
        for (int64_t p = s.begin; p < s.end; ++p) sel.push_back(p);
      }
      ids[static_cast<size_t>(t)] = sel;
      ids[static_cast<size_t>(nq + t)] = sel;
    }
    Row row;
    row.method = "inverted spans";
    row.config = absl::StrCat("window=±", window, ", #F_q=128, budget B");
    Score(h, ids, &row);
    row.visited = static_cast<double>(visited) / h.m;
    row.ms_per_query = 1e3 * Seconds(start) / h.m;
    row.vs_flat = row.ms_per_query / flat_ms;
    rows.push_back(row);
  }
  return rows;
}

// The inverted index: an encoder trained on the keys (projected queries,
// with and without idf, and spans), then one trained on keys and prefix
// queries (queries encoded or projected). Adds a line per encoder to
// `encoder_lines`.
absl::StatusOr<std::vector<Row>> EvaluateInverted(const Head& h, double flat_ms,
                                                  std::vector<std::string>* encoder_lines) {
  const int32_t B = h.budget;
  std::fprintf(stderr, "  inverted: training the sparse encoder\n");
  inverted::InvertedOptions options;
  options.train.num_features = absl::GetFlag(FLAGS_encoder_features);
  options.train.k = absl::GetFlag(FLAGS_encoder_k);
  options.train.epochs = absl::GetFlag(FLAGS_encoder_epochs);
  options.train.aux_k = absl::GetFlag(FLAGS_encoder_aux_k);
  const auto train_start = std::chrono::steady_clock::now();
  KVR_ASSIGN_OR_RETURN(auto index, inverted::InvertedIndex::Create(
                                       h.key_view(), VectorView::Empty(kHeadDim), options));
  const double train_s = Seconds(train_start);
  KVR_ASSIGN_OR_RETURN(auto train_q, inverted::EvaluateSparseEncoder(index->encoder(), h.key_view()));
  KVR_ASSIGN_OR_RETURN(
      auto held_q,
      inverted::EvaluateSparseEncoder(
          index->encoder(),
          VectorView{h.heldout_keys.data(), static_cast<int64_t>(h.heldout_keys.size() / kHeadDim),
                     kHeadDim, DType::kF16, 0}));
  encoder_lines->push_back(absl::StrFormat(
      "| %d | %d | keys | %d | %d | %.3f | %.3f | %d | %.2f | %.3f | %.1f | %.2f |", h.layer,
      h.kv_head, index->encoder().num_features(), index->encoder().k(), train_q.fvu, held_q.mse,
      train_q.dead_features, train_q.mean_active, train_q.max_feature_share, train_s,
      static_cast<double>(index->PostingBytes()) / h.prefix));
  std::vector<Row> rows;
  for (int features : {32, 64, 128}) {
    for (int mult : {1, 4, 8}) {
      Row row = Evaluate(h, *index, "inverted",
                         absl::StrCat("query_features=", features, ",candidates=", mult * B),
                         flat_ms);
      row.config = absl::StrCat("project, #F_q=", features, ", k'=", mult, "B");
      rows.push_back(row);
    }
  }
  Row idf = Evaluate(h, *index, "inverted",
                     absl::StrCat("query_features=128,idf=1,candidates=", 8 * B), flat_ms);
  idf.config = "project+idf, #F_q=128, k'=8B";
  rows.push_back(idf);
  KVR_ASSIGN_OR_RETURN(std::vector<Row> spans, EvaluateInvertedSpans(h, *index, flat_ms));
  rows.insert(rows.end(), spans.begin(), spans.end());

  std::fprintf(stderr, "  inverted: training on keys + prefix queries (encode mode)\n");
  inverted::InvertedOptions kq = options;
  kq.train_on_queries = true;
  KVR_ASSIGN_OR_RETURN(
      auto kq_index,
      inverted::InvertedIndex::Create(
          h.key_view(), VectorView{h.prefix_queries.data(), 2 * h.prefix, kHeadDim, DType::kF16, 0},
          kq));
  KVR_ASSIGN_OR_RETURN(auto kq_quality,
                       inverted::EvaluateSparseEncoder(kq_index->encoder(), h.key_view()));
  encoder_lines->push_back(absl::StrFormat(
      "| %d | %d | keys+queries | %d | %d | %.3f | | %d | %.2f | %.3f | | |", h.layer, h.kv_head,
      kq_index->encoder().num_features(), kq_index->encoder().k(), kq_quality.fvu,
      kq_quality.dead_features, kq_quality.mean_active, kq_quality.max_feature_share));
  for (const char* mode : {"encode", "project"}) {
    Row row = Evaluate(h, *kq_index, "inverted",
                       absl::StrCat("query_mode=", mode, ",query_features=128,candidates=", 8 * B),
                       flat_ms);
    row.config = absl::StrCat(mode, " (encoder on keys+queries), k'=8B");
    rows.push_back(row);
  }
  return rows;
}

// Every configuration of the kinds in `kinds` on one (layer, KV head),
// after the flat peer; prints the head's table with --per_head.
absl::StatusOr<std::vector<Row>> EvaluateHead(const std::string& dir, int layer, int g,
                                              const std::set<std::string>& kinds,
                                              std::vector<std::string>* encoder_lines) {
  KVR_ASSIGN_OR_RETURN(const Head h, LoadHead(dir, layer, g, absl::GetFlag(FLAGS_queries),
                                              absl::GetFlag(FLAGS_budget)));
  std::vector<Row> rows;
  // The exact peer.
  KVR_ASSIGN_OR_RETURN(auto flat, FlatIndex::Build(h.key_view(), FlatOptions{}));
  Row flat_row = Evaluate(h, *flat, "flat", "", 0);
  const double flat_ms = flat_row.ms_per_query;
  flat_row.vs_flat = 1.0;
  rows.push_back(flat_row);
  auto append = [&](absl::StatusOr<std::vector<Row>> more) -> absl::Status {
    KVR_RETURN_IF_ERROR(more.status());
    rows.insert(rows.end(), more->begin(), more->end());
    return absl::OkStatus();
  };
  if (kinds.count("loki")) {
    std::fprintf(stderr, "  loki\n");
    KVR_RETURN_IF_ERROR(append(EvaluateLoki(h, flat_ms)));
  }
  if (kinds.count("quest")) {
    std::fprintf(stderr, "  quest\n");
    KVR_RETURN_IF_ERROR(append(EvaluateQuest(h, flat_ms)));
  }
  if (kinds.count("inverted")) {
    KVR_RETURN_IF_ERROR(append(EvaluateInverted(h, flat_ms, encoder_lines)));
  }
  if (absl::GetFlag(FLAGS_per_head)) {
    double oracle = 0;
    for (double m : h.oracle_mass) oracle += m;
    oracle /= h.m;
    std::printf("## layer %d, KV head %d: prefix %lld keys, %lld query rows, B = %d, exact top-B mass %.3f\n\n",
                layer, g, static_cast<long long>(h.prefix), static_cast<long long>(h.m), h.budget,
                oracle);
    PrintRows(rows);
    std::printf("\n");
    std::fflush(stdout);
  }
  return rows;
}

// The summary table: per configuration, the mean (and min) over the heads.
void PrintSummary(const std::vector<std::pair<std::string, std::string>>& config_order,
                  const std::map<std::pair<std::string, std::string>, std::vector<Row>>& by_config,
                  int heads) {
  std::printf("## Summary over %d (layer, KV head) pairs: mean (min) of mass / exact top-B\n\n", heads);
  std::printf("| method | config | mass / exact top-B, mean | min | recall@B | out err | keys scanned | exact scored | visited/q | × flat time |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& key : config_order) {
    const std::vector<Row>& rs = by_config.at(key);
    double mass = 0, mn = 1e9, recall = 0, err = 0, scanned = 0, exact = 0, visited = 0, time = 0;
    for (const Row& r : rs) {
      mass += r.mass_ratio;
      mn = std::min(mn, r.mass_ratio);
      recall += r.recall;
      err += r.out_err;
      scanned += r.scanned;
      exact += r.exact;
      visited += r.visited;
      time += r.vs_flat;
    }
    const double n = static_cast<double>(rs.size());
    std::printf("| %s | %s | %.3f | %.3f | %.3f | %.3f | %.1f%% | %.1f%% | %.0f | %.2f |\n",
                key.first.c_str(), key.second.c_str(), mass / n, mn, recall / n, err / n,
                100 * scanned / n, 100 * exact / n, visited / n, time / n);
  }
}

void PrintEncoders(const std::vector<std::string>& encoder_lines) {
  if (encoder_lines.empty()) return;
  std::printf("\n## Sparse encoders (trained on the prefix; held-out = the keys at the query positions)\n\n");
  std::printf("FVU = unexplained fraction of the training keys' variance; held-out = the %d keys at the query positions, their squared error relative to the same training variance. build s = training + encoding.\n\n", absl::GetFlag(FLAGS_queries));
  std::printf("| layer | KV head | trained on | F | κ | FVU train | FVU held-out | dead | mean active | max feature share | build s | posting bytes/key |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string& line : encoder_lines) std::printf("%s\n", line.c_str());
}

int Main() {
  std::string dir = absl::GetFlag(FLAGS_data_dir);
  if (dir.empty()) {
    const char* src = std::getenv("KVRECALL_SOURCE_DIR");
    dir = absl::StrCat(src != nullptr ? src : ".", "/../shared/data/attn-dev");
  }
  const std::set<std::string> kinds = absl::StrSplit(absl::GetFlag(FLAGS_kinds), ',');
  std::vector<int> layers;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_layers), ',')) {
    int layer = 0;
    if (!absl::SimpleAtoi(s, &layer)) {
      std::fprintf(stderr, "index_lrq_eval: --layers: '%s' is not a layer\n", std::string(s).c_str());
      return 2;
    }
    layers.push_back(layer);
  }
  std::printf("# index_lrq_eval\nmachine: %s\ndata: %s\n", bench::MachineDescription().c_str(),
              dir.c_str());
  std::printf("protocol: queries = last %d positions x 2 query heads per KV head, keys = prefix, "
              "B = %.1f%% of the prefix, threads = %d\n\n",
              absl::GetFlag(FLAGS_queries), 100 * absl::GetFlag(FLAGS_budget),
              absl::GetFlag(FLAGS_threads));
  std::map<std::pair<std::string, std::string>, std::vector<Row>> by_config;
  std::vector<std::pair<std::string, std::string>> config_order;
  std::vector<std::string> encoder_lines;
  const int total_heads = static_cast<int>(layers.size()) * 2;
  int done_heads = 0;
  for (int layer : layers) {
    for (int g = 0; g < 2; ++g) {
      const auto head_start = std::chrono::steady_clock::now();
      std::fprintf(stderr, "[%d/%d] layer %d KV head %d: loading and exact scores\n",
                   done_heads + 1, total_heads, layer, g);
      absl::StatusOr<std::vector<Row>> rows = EvaluateHead(dir, layer, g, kinds, &encoder_lines);
      if (!rows.ok()) {
        std::fprintf(stderr, "index_lrq_eval: layer %d KV head %d: %s\n", layer, g,
                     rows.status().ToString().c_str());
        return 1;
      }
      for (const Row& r : *rows) {
        const auto key = std::make_pair(r.method, r.config);
        if (!by_config.count(key)) config_order.push_back(key);
        by_config[key].push_back(r);
      }
      ++done_heads;
      std::fprintf(stderr, "[%d/%d] layer %d KV head %d done in %.1f s\n", done_heads, total_heads,
                   layer, g, Seconds(head_start));
    }
  }
  PrintSummary(config_order, by_config, done_heads);
  PrintEncoders(encoder_lines);
  return 0;
}

}  // namespace
}  // namespace kvrecall::index

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvrecall::index::Main();
}
