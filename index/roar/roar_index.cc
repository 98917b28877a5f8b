#include "index/roar/roar_index.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <functional>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/flat/flat_index.h"
#include "index/search_input.h"
#include "index/roar/build_progress.h"

namespace kvrecall::index {

using roar::AdjacencyLists;
using roar::BeamSearch;
using roar::OcclusionPrune;
using roar::Scored;
using roar::SearchCounters;
using roar::SortBestFirst;
using roar::StageProgress;
using roar::VisitedSet;

namespace {

enum Stage { kKnn = 0, kProjection = 1, kConnectivity = 2, kRepair = 3 };

// Training queries per kNN batch (one flat search each; progress between).
// Causal batches fetch up to (positions spanned - 1) extra neighbours, so
// batches stay small in positions.
constexpr int64_t kKnnBatch = 256;
// docs/formats/roar.md
constexpr uint32_t kRoarPayloadVersion = 1;
// Unused slots of a kNN row (a causal query early in the context has fewer
// than nq keys to choose from).
constexpr uint32_t kNoKey = std::numeric_limits<uint32_t>::max();
// Seed nodes of the connectivity searches besides the entry point.
constexpr int64_t kBuildSeeds = 64;
// Nodes per parallel work item of the per-node stages.
constexpr int64_t kNodeGrain = 64;

// Runs fn(i) for i in [0, n) on `threads` threads in chunks, reporting each
// chunk to `progress` stage `stage`; stops early once cancelled.
void ParallelNodes(int64_t n, int threads, StageProgress* progress, int stage,
                   const std::function<void(int64_t)>& fn) {
  ThreadPool::Default()->ParallelFor(
      n, kNodeGrain,
      [&](int64_t begin, int64_t end) {
        if (progress->cancelled()) return;
        for (int64_t i = begin; i < end; ++i) fn(i);
        progress->Advance(stage, end - begin, n);
      },
      threads);
}

// Scores `ids` against key `target` and sorts them best first (target and
// duplicates removed).
std::vector<Scored> ScoreAgainst(const roar::KeyStore& keys, uint32_t target,
                                 std::vector<uint32_t> ids, std::vector<float>* target_f32) {
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  target_f32->resize(keys.dim());
  keys.ToF32(target, target_f32->data());
  std::vector<Scored> out;
  out.reserve(ids.size());
  for (uint32_t id : ids) {
    if (id != target) out.push_back({keys.Score(target_f32->data(), id), id});
  }
  SortBestFirst(&out);
  return out;
}

// For every node u: lists[u] ∪ {t : u ∈ lists[t]}, occlusion-pruned to
// max_degree when longer.
void AddReverseEdges(const roar::KeyStore& keys, std::vector<std::vector<uint32_t>>* lists,
                     int32_t max_degree, int threads) {
  const int64_t n = static_cast<int64_t>(lists->size());
  std::vector<std::vector<uint32_t>> incoming(n);
  for (int64_t t = 0; t < n; ++t) {
    for (uint32_t u : (*lists)[t]) incoming[u].push_back(static_cast<uint32_t>(t));
  }
  ThreadPool::Default()->ParallelFor(
      n, kNodeGrain,
      [&](int64_t begin, int64_t end) {
        std::vector<float> scratch;
        std::vector<uint32_t> pruned;
        for (int64_t u = begin; u < end; ++u) {
          std::vector<uint32_t>& list = (*lists)[u];
          if (incoming[u].empty()) continue;
          std::vector<uint32_t> merged = list;
          merged.insert(merged.end(), incoming[u].begin(), incoming[u].end());
          std::vector<Scored> scored =
              ScoreAgainst(keys, static_cast<uint32_t>(u), std::move(merged), &scratch);
          if (static_cast<int32_t>(scored.size()) <= max_degree) {
            list.clear();
            for (const Scored& s : scored) list.push_back(s.id);
          } else {
            OcclusionPrune(keys, scored, max_degree, /*top_up=*/true, &pruned);
            list = pruned;
          }
        }
      },
      threads);
}

}  // namespace

absl::StatusOr<RoarOptions> RoarOptions::FromParams(const ParamMap& params) {
  KVR_RETURN_IF_ERROR(params.CheckKnown(
      "roar build", {"nq", "m", "l", "max_train", "targets", "entries", "causal", "storage"}));
  RoarOptions o;
  KVR_ASSIGN_OR_RETURN(int64_t nq, params.GetInt("nq", o.nq, 1, 1000));
  KVR_ASSIGN_OR_RETURN(int64_t m, params.GetInt("m", o.m, 4, 256));
  KVR_ASSIGN_OR_RETURN(int64_t l, params.GetInt("l", o.l, m, 10000));
  KVR_ASSIGN_OR_RETURN(o.max_train, params.GetInt("max_train", o.max_train, 0, INT64_MAX));
  KVR_ASSIGN_OR_RETURN(int64_t targets, params.GetInt("targets", o.targets, 1, 1000));
  o.targets = static_cast<int32_t>(targets);
  KVR_ASSIGN_OR_RETURN(int64_t entries, params.GetInt("entries", o.entries, 1, 1024));
  o.entries = static_cast<int32_t>(entries);
  KVR_ASSIGN_OR_RETURN(o.causal, params.GetBool("causal", o.causal));
  o.nq = static_cast<int32_t>(nq);
  o.m = static_cast<int32_t>(m);
  o.l = static_cast<int32_t>(l);
  const std::string storage = params.GetString("storage", "native");
  if (storage == "f32") {
    o.store_f32 = true;
  } else if (storage != "native") {
    return absl::InvalidArgumentError(
        absl::StrCat("roar: storage=", storage, " is not one of native, f32"));
  }
  return o;
}

ParamMap RoarOptions::ToParams() const {
  ParamMap p;
  p.SetInt("nq", nq);
  p.SetInt("m", m);
  p.SetInt("l", l);
  p.SetInt("max_train", max_train);
  p.SetInt("targets", targets);
  p.SetInt("entries", entries);
  p.SetInt("causal", causal ? 1 : 0);
  p.Set("storage", store_f32 ? "f32" : "native");
  return p;
}

RoarIndex::RoarIndex(int32_t dim, DType key_dtype, const RoarOptions& options)
    : key_dtype_(key_dtype),
      options_(options),
      build_params_(options.ToParams()),
      keys_(dim, options.store_f32 ? DType::kF32 : key_dtype),
      graph_(3 * options.m) {}

namespace {

absl::Status Cancelled() { return absl::CancelledError("roar build cancelled"); }

// The training queries of a build as f32, evenly sampled down to max_train.
// With causal training, row r of the training queries is the query at
// position r % n (the prefill queries of each head in position order): it
// only ever attended to keys 0..r % n, so its neighbours are taken among
// those. The rows are ordered by position so that a kNN batch shares one key
// range.
struct TrainingSample {
  int64_t rows = 0;
  std::vector<float> queries;     // [rows, d]
  std::vector<int64_t> position;  // the last key each row may have as a neighbour
};

absl::StatusOr<TrainingSample> SampleTrainingQueries(const VectorView& keys,
                                                     const VectorView& training_queries,
                                                     const RoarOptions& options) {
  const int64_t n = keys.rows;
  const int32_t d = keys.dim;
  const VectorView& source = training_queries.rows > 0 ? training_queries : keys;
  if (options.causal && source.rows % n != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "roar: causal=1 needs the training queries in position order, a multiple of the ", n,
        " keys (row r is the query at position r % n); got ", source.rows,
        " rows (pass causal=0 for unordered training queries)"));
  }
  int64_t t = source.rows;
  if (options.max_train > 0 && t > options.max_train) t = options.max_train;
  std::vector<int64_t> rows(t);
  for (int64_t i = 0; i < t; ++i) rows[i] = source.rows == t ? i : (i * source.rows) / t;
  TrainingSample sample;
  sample.rows = t;
  sample.position.assign(t, n - 1);
  if (options.causal) {
    std::stable_sort(rows.begin(), rows.end(),
                     [n](int64_t a, int64_t b) { return a % n < b % n; });
    for (int64_t i = 0; i < t; ++i) sample.position[i] = rows[i] % n;
  }
  sample.queries.resize(t * d);
  for (int64_t i = 0; i < t; ++i) {
    ConvertToFloat(source.row(rows[i]), source.dtype, d, sample.queries.data() + i * d);
  }
  return sample;
}

// Stage 1: the exact `nq` nearest keys of every training query (among the
// keys up to its position), [rows, nq] with kNoKey in unused slots.
absl::StatusOr<std::vector<uint32_t>> ExactKnn(const VectorView& keys,
                                               const TrainingSample& sample, int32_t nq,
                                               int threads, StageProgress* progress) {
  const int64_t n = keys.rows, t = sample.rows;
  const int32_t d = keys.dim;
  std::vector<uint32_t> knn(t * nq, kNoKey);
  KVR_ASSIGN_OR_RETURN(auto flat, FlatIndex::Build(keys, FlatOptions()));
  for (int64_t b = 0; b < t; b += kKnnBatch) {
    const int64_t count = std::min(kKnnBatch, t - b);
    const int64_t first = sample.position[b], last = sample.position[b + count - 1];
    // Keys after the batch's last position never qualify; keys in
    // (position, last] may, for earlier rows of the batch: fetch that many
    // more and drop them below.
    std::vector<PositionRange> after;
    if (last + 1 < n) after.push_back({last + 1, n});
    KVR_ASSIGN_OR_RETURN(ExcludeSet exclude, ExcludeSet::Create(after, n));
    const int32_t fetch = static_cast<int32_t>(std::min<int64_t>(nq + (last - first), n));
    SearchResult r = flat->SearchF32(sample.queries.data() + b * d, count, fetch, exclude, threads);
    for (int64_t i = 0; i < count; ++i) {
      int32_t filled = 0;
      for (int32_t j = 0; j < fetch && filled < nq; ++j) {
        const int64_t id = r.ids[i * fetch + j];
        if (id >= 0 && id <= sample.position[b + i]) {
          knn[(b + i) * nq + filled++] = static_cast<uint32_t>(id);
        }
      }
    }
    if (!progress->Advance(kKnn, count, t)) return Cancelled();
  }
  return knn;
}

// The key nearest (L2) to the keys' mean: RoarGraph's single entry point.
uint32_t Medoid(const roar::KeyStore& store) {
  const int64_t n = store.size();
  const int32_t d = store.dim();
  uint32_t medoid = 0;
  std::vector<double> mean(d, 0.0);
  std::vector<float> row(d);
  for (int64_t i = 0; i < n; ++i) {
    store.ToF32(i, row.data());
    for (int32_t j = 0; j < d; ++j) mean[j] += row[j];
  }
  double best = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    store.ToF32(i, row.data());
    double dist = 0;
    for (int32_t j = 0; j < d; ++j) {
      const double diff = row[j] - mean[j] / static_cast<double>(n);
      dist += diff * diff;
    }
    if (dist < best) {
      best = dist;
      medoid = static_cast<uint32_t>(i);
    }
  }
  return medoid;
}

// Stage 2: the entry points, the medoid and then the best keys of the latest
// training queries (rows are in position order): the queries most like the
// decode queries that follow. At most `entries`.
std::vector<uint32_t> ChooseEntryPoints(const roar::KeyStore& store,
                                        const std::vector<uint32_t>& knn, int64_t t, int32_t nq,
                                        int32_t entries) {
  std::vector<uint32_t> points = {Medoid(store)};
  for (int64_t q = t - 1; q >= 0 && static_cast<int32_t>(points.size()) < entries; --q) {
    const uint32_t best = knn[q * nq];
    if (std::find(points.begin(), points.end(), best) == points.end()) points.push_back(best);
  }
  return points;
}

// Keeps the `l` ids of `ids` (with repeats) that occur most often.
void KeepMostFrequent(int64_t l, std::vector<uint32_t>* ids) {
  if (static_cast<int64_t>(ids->size()) <= l) return;
  std::sort(ids->begin(), ids->end());
  std::vector<std::pair<int32_t, uint32_t>> counted;  // (-count, id)
  for (size_t i = 0; i < ids->size();) {
    size_t e = i;
    while (e < ids->size() && (*ids)[e] == (*ids)[i]) ++e;
    counted.push_back({-static_cast<int32_t>(e - i), (*ids)[i]});
    i = e;
  }
  if (static_cast<int64_t>(counted.size()) > l) {
    std::nth_element(counted.begin(), counted.begin() + l, counted.end());
    counted.resize(l);
  }
  ids->clear();
  for (const auto& c : counted) ids->push_back(c.second);
}

// Stage 3, projection: each of the first `targets` neighbours of a training
// query gets the query's other neighbours as candidates; a key's candidates
// are pooled over all queries (the `l` most frequent kept), pruned against
// it to `m`, then reverse edges are added.
absl::StatusOr<std::vector<std::vector<uint32_t>>> Project(const roar::KeyStore& store,
                                                           const std::vector<uint32_t>& knn,
                                                           int64_t t, int32_t nq,
                                                           const RoarOptions& options, int threads,
                                                           StageProgress* progress) {
  const int64_t n = store.size();
  const int32_t targets = std::min<int32_t>(options.targets, nq);
  // The (query, slot) pairs of each target, grouped by target.
  std::vector<int64_t> offsets(n + 1, 0);
  for (int64_t q = 0; q < t; ++q) {
    for (int32_t j = 0; j < targets && knn[q * nq + j] != kNoKey; ++j) {
      ++offsets[knn[q * nq + j] + 1];
    }
  }
  for (int64_t i = 0; i < n; ++i) offsets[i + 1] += offsets[i];
  std::vector<int64_t> by_target(offsets[n]);  // q * nq + j
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (int64_t q = 0; q < t; ++q) {
    for (int32_t j = 0; j < targets && knn[q * nq + j] != kNoKey; ++j) {
      by_target[fill[knn[q * nq + j]]++] = q * nq + j;
    }
  }
  std::vector<std::vector<uint32_t>> projected(n);
  ParallelNodes(n, threads, progress, kProjection, [&](int64_t target) {
    if (offsets[target] == offsets[target + 1]) return;
    std::vector<uint32_t> ids;
    for (int64_t at = offsets[target]; at < offsets[target + 1]; ++at) {
      const int64_t q = by_target[at] / nq, j = by_target[at] % nq;
      const uint32_t* row = knn.data() + q * nq;
      for (int64_t c = 0; c < nq && row[c] != kNoKey; ++c) {
        if (c != j) ids.push_back(row[c]);
      }
    }
    // Keep the l candidates co-retrieved with the target most often.
    KeepMostFrequent(options.l, &ids);
    std::vector<float> scratch;
    const std::vector<Scored> scored =
        ScoreAgainst(store, static_cast<uint32_t>(target), std::move(ids), &scratch);
    OcclusionPrune(store, scored, options.m, /*top_up=*/true, &projected[target]);
  });
  if (progress->cancelled()) return Cancelled();
  AddReverseEdges(store, &projected, options.m, threads);
  return projected;
}

}  // namespace

absl::StatusOr<std::unique_ptr<RoarIndex>> RoarIndex::Build(const VectorView& keys,
                                                            const VectorView& training_queries,
                                                            const RoarOptions& options) {
  KVR_RETURN_IF_ERROR(ValidateVectors("keys", keys, -1));
  KVR_RETURN_IF_ERROR(ValidateVectors("training queries", training_queries, keys.dim));
  KVR_ASSIGN_OR_RETURN(RoarOptions checked, RoarOptions::FromParams(options.ToParams()));
  if (keys.rows >= std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError("roar: more than 2^32-1 keys");
  }
  checked.num_threads = options.num_threads;
  checked.progress = options.progress;
  std::unique_ptr<RoarIndex> index(new RoarIndex(keys.dim, keys.dtype, checked));
  index->keys_.Append(keys.data, keys.dtype, keys.rows, keys.row_stride());
  const int64_t n = keys.rows;
  index->graph_.Resize(n);
  if (n == 0) return index;

  const int threads = ResolveThreads(options.num_threads);
  StageProgress progress(options.progress, {{"knn", 0.35},
                                            {"projection", 0.15},
                                            {"connectivity", 0.45},
                                            {"repair", 0.05}});
  KVR_ASSIGN_OR_RETURN(TrainingSample sample,
                       SampleTrainingQueries(keys, training_queries, checked));
  const int64_t t = sample.rows;
  const int32_t nq = static_cast<int32_t>(std::min<int64_t>(checked.nq, n));
  KVR_ASSIGN_OR_RETURN(std::vector<uint32_t> knn, ExactKnn(keys, sample, nq, threads, &progress));
  sample = {};
  index->entry_points_ = ChooseEntryPoints(index->keys_, knn, t, nq, checked.entries);
  KVR_ASSIGN_OR_RETURN(std::vector<std::vector<uint32_t>> projected,
                       Project(index->keys_, knn, t, nq, checked, threads, &progress));
  knn = {};
  KVR_RETURN_IF_ERROR(index->Connect(projected, threads, &progress));
  projected = {};
  KVR_RETURN_IF_ERROR(index->Repair(&progress));
  return index;
}

absl::Status RoarIndex::Connect(const std::vector<std::vector<uint32_t>>& projected, int threads,
                                roar::StageProgress* progress) {
  const roar::KeyStore& store = keys_;
  const int64_t n = store.size();
  const int32_t d = store.dim();
  const int32_t m = options_.m;
  AdjacencyLists g1(m);
  g1.Resize(n);
  for (int64_t i = 0; i < n; ++i) g1.Set(i, projected[i]);
  std::vector<std::vector<uint32_t>> supply(n);
  // Seeds of these searches: the entry point and keys spread evenly over
  // the positions, since the projected graph alone may not connect them
  // (as NSG and RoarGraph seed their build searches).
  std::vector<uint32_t> seeds = entry_points_;
  const int64_t num_seeds = std::min<int64_t>(kBuildSeeds, n);
  for (int64_t i = 0; i < num_seeds; ++i) seeds.push_back(static_cast<uint32_t>(i * n / num_seeds));
  ParallelNodes(n, threads, progress, kConnectivity, [&](int64_t x) {
    thread_local std::vector<float> q;
    thread_local std::vector<Scored> pool;
    q.resize(d);
    store.ToF32(x, q.data());
    std::unique_ptr<VisitedSet> visited = visited_pool_.Get(n);
    SearchCounters counters;
    BeamSearch(store, g1, seeds, q.data(), options_.l, nullptr, visited.get(), &pool, &counters);
    visited_pool_.Release(std::move(visited));
    pool.erase(std::remove_if(pool.begin(), pool.end(),
                              [&](const Scored& s) { return s.id == x; }),
               pool.end());
    OcclusionPrune(store, pool, m, /*top_up=*/true, &supply[x]);
  });
  if (progress->cancelled()) return Cancelled();

  AddReverseEdges(store, &supply, 2 * m, threads);

  for (int64_t x = 0; x < n; ++x) {
    std::vector<uint32_t> list = projected[x];
    int32_t added = 0;
    for (uint32_t v : supply[x]) {
      if (added >= 2 * m) break;
      if (v != x && std::find(list.begin(), list.end(), v) == list.end()) {
        list.push_back(v);
        ++added;
      }
    }
    graph_.Set(x, list);
  }
  return absl::OkStatus();
}

absl::Status RoarIndex::Repair(roar::StageProgress* progress) {
  const int64_t n = keys_.size();
  std::vector<uint8_t> reached(n, 0);
  std::deque<uint32_t> frontier;
  auto flood = [&](uint32_t from) {
    if (reached[from]) return;
    reached[from] = 1;
    frontier.push_back(from);
    while (!frontier.empty()) {
      const uint32_t u = frontier.front();
      frontier.pop_front();
      for (uint32_t v : graph_.Neighbors(u)) {
        if (!reached[v]) {
          reached[v] = 1;
          frontier.push_back(v);
        }
      }
    }
  };
  for (uint32_t ep : entry_points_) flood(ep);
  std::vector<float> q(keys_.dim());
  std::vector<Scored> pool;
  for (int64_t u = 0; u < n; ++u) {
    if (reached[u]) continue;
    keys_.ToF32(u, q.data());
    std::unique_ptr<VisitedSet> visited = visited_pool_.Get(n);
    SearchCounters counters;
    BeamSearch(keys_, graph_, entry_points_, q.data(), options_.l, nullptr, visited.get(), &pool,
               &counters);
    visited_pool_.Release(std::move(visited));
    // Every search result is reachable; link from the best one with room.
    bool linked = false;
    for (const Scored& s : pool) {
      if (s.id != u && graph_.Append(s.id, static_cast<uint32_t>(u))) {
        linked = true;
        break;
      }
    }
    if (!linked) AddEdgeWithPrune(pool.front().id, static_cast<uint32_t>(u), 3 * options_.m);
    flood(static_cast<uint32_t>(u));
    if (!progress->Advance(kRepair, 0, 1)) return Cancelled();
  }
  if (!progress->Advance(kRepair, 1, 1)) return Cancelled();
  return absl::OkStatus();
}

void RoarIndex::AddEdgeWithPrune(uint32_t u, uint32_t v, int32_t max_degree) {
  if (graph_.Append(u, v)) return;
  const absl::Span<const uint32_t> current = graph_.Neighbors(u);
  std::vector<uint32_t> ids(current.begin(), current.end());
  ids.push_back(v);
  std::vector<float> scratch;
  const std::vector<Scored> scored = ScoreAgainst(keys_, u, std::move(ids), &scratch);
  std::vector<uint32_t> pruned;
  OcclusionPrune(keys_, scored, max_degree, /*top_up=*/true, &pruned);
  graph_.Set(u, pruned);
}

void RoarIndex::Insert(uint32_t id) {
  const int64_t n = keys_.size();
  if (id == 0) return;  // the first key has no one to link to
  std::vector<float> q(keys_.dim());
  keys_.ToF32(id, q.data());
  std::vector<Scored> pool;
  std::unique_ptr<VisitedSet> visited = visited_pool_.Get(n);
  SearchCounters counters;
  BeamSearch(keys_, graph_, entry_points_, q.data(), options_.l, nullptr,
             visited.get(), &pool, &counters);
  visited_pool_.Release(std::move(visited));
  pool.erase(std::remove_if(pool.begin(), pool.end(), [&](const Scored& s) { return s.id == id; }),
             pool.end());
  std::vector<uint32_t> neighbors;
  OcclusionPrune(keys_, pool, options_.m, /*top_up=*/true, &neighbors);
  graph_.Set(id, neighbors);
  for (uint32_t u : neighbors) AddEdgeWithPrune(u, id, graph_.capacity());
}

absl::Status RoarIndex::Add(const VectorView& keys) {
  KVR_RETURN_IF_ERROR(ValidateAddedKeys("roar", keys, dim(), key_dtype_));
  if (size() + keys.rows >= std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError("roar: more than 2^32-1 keys");
  }
  for (int64_t i = 0; i < keys.rows; ++i) {
    keys_.Append(keys.row(i), keys.dtype, 1, keys.row_stride());
    graph_.Resize(keys_.size());
    Insert(static_cast<uint32_t>(keys_.size() - 1));
  }
  return absl::OkStatus();
}

absl::StatusOr<SearchResult> RoarIndex::Search(const VectorView& queries, int32_t k,
                                               const SearchParams& params) const {
  KVR_RETURN_IF_ERROR(ValidateVectors("queries", queries, dim()));
  KVR_RETURN_IF_ERROR(ValidateK(k));
  KVR_RETURN_IF_ERROR(params.knobs.CheckKnown("roar search", {"ef"}));
  KVR_ASSIGN_OR_RETURN(int64_t ef64, params.knobs.GetInt("ef", kDefaultEf, 1, INT32_MAX));
  KVR_ASSIGN_OR_RETURN(ExcludeSet exclude, ExcludeSet::Create(params.exclude, size()));
  const int32_t ef = std::max<int32_t>(static_cast<int32_t>(ef64), k);
  const int64_t nq = queries.rows, n = size();
  SearchResult result = SearchResult::Padded(nq, k);
  if (nq == 0 || n == 0) return result;
  const std::vector<float> q = VectorsToF32(queries);
  std::vector<SearchCounters> counters(nq);
  ThreadPool::Default()->ParallelFor(
      nq, 1,
      [&](int64_t begin, int64_t end) {
        std::unique_ptr<VisitedSet> visited = visited_pool_.Get(n);
        std::vector<Scored> pool;
        for (int64_t i = begin; i < end; ++i) {
          if (i > begin) visited->Clear();
          BeamSearch(keys_, graph_, entry_points_, q.data() + i * dim(),
                     ef, &exclude, visited.get(), &pool, &counters[i]);
          const size_t m = std::min<size_t>(pool.size(), k);
          for (size_t j = 0; j < m; ++j) {
            result.ids[i * k + j] = pool[j].id;
            result.scores[i * k + j] = pool[j].score;
          }
        }
        visited_pool_.Release(std::move(visited));
      },
      ResolveThreads(params.num_threads));
  for (const SearchCounters& c : counters) {
    result.stats.keys_scanned += c.scored;
    result.stats.visited += c.expanded;
  }
  result.stats.exact_scores = result.stats.keys_scanned;
  return result;
}

int64_t RoarIndex::IndexBytes() const {
  return graph_.bytes() + static_cast<int64_t>(entry_points_.size() * sizeof(uint32_t));
}

double RoarIndex::AverageDegree() const {
  return size() == 0 ? 0.0
                     : static_cast<double>(graph_.TotalEdges()) / static_cast<double>(size());
}

absl::StatusOr<std::string> RoarIndex::Serialize() const {
  std::string payload;
  ByteWriter w(&payload);
  w.Put<uint32_t>(kRoarPayloadVersion);
  w.Put<uint32_t>(static_cast<uint32_t>(entry_points_.size()));
  for (uint32_t ep : entry_points_) w.Put<uint32_t>(ep);
  w.Put<uint32_t>(static_cast<uint32_t>(graph_.capacity()));
  for (int64_t i = 0; i < size(); ++i) {
    const absl::Span<const uint32_t> nbrs = graph_.Neighbors(i);
    w.Put<uint32_t>(static_cast<uint32_t>(nbrs.size()));
    w.PutBytes(nbrs.data(), nbrs.size() * sizeof(uint32_t));
  }
  // Keys as dense rows in the dtype they were given in.
  std::vector<char> row(static_cast<size_t>(dim()) * DTypeSize(key_dtype_));
  std::vector<float> f32(dim());
  for (int64_t i = 0; i < size(); ++i) {
    if (keys_.dtype() == key_dtype_) {
      w.PutBytes(keys_.row(i), keys_.row_bytes());
    } else {  // f32 storage of f16/bf16 keys: converting back is exact
      keys_.ToF32(i, f32.data());
      ConvertFromFloat(f32.data(), dim(), key_dtype_, row.data());
      w.PutBytes(row.data(), row.size());
    }
  }
  return EncodeIndex(IndexHeader{std::string("roar"), dim(), size(), key_dtype_, build_params_}, payload);
}

absl::StatusOr<std::unique_ptr<RoarIndex>> RoarIndex::Load(const IndexHeader& header,
                                                           absl::string_view payload) {
  if (header.kind != "roar") return absl::InvalidArgumentError("not a roar index");
  if (header.dim <= 0 || header.size < 0 ||
      header.size >= std::numeric_limits<uint32_t>::max()) {
    return absl::DataLossError("roar: bad dim or size");
  }
  auto options = RoarOptions::FromParams(header.build_params);
  if (!options.ok()) return absl::DataLossError(options.status().message());
  std::unique_ptr<RoarIndex> index(new RoarIndex(header.dim, header.key_dtype, *options));
  const int64_t n = header.size;
  ByteReader r(payload);
  KVR_ASSIGN_OR_RETURN(uint32_t version, r.Get<uint32_t>());
  if (version != kRoarPayloadVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("roar: payload version ", version, " is not supported"));
  }
  KVR_ASSIGN_OR_RETURN(uint32_t num_entries, r.Get<uint32_t>());
  if (num_entries > 1u + static_cast<uint32_t>(index->options_.entries) ||
      (n > 0 && num_entries == 0) || (n == 0 && num_entries > 1)) {
    return absl::DataLossError("roar: bad entry points");
  }
  index->entry_points_.resize(num_entries);
  for (uint32_t& ep : index->entry_points_) {
    KVR_ASSIGN_OR_RETURN(ep, r.Get<uint32_t>());
    if (n > 0 && ep >= n) return absl::DataLossError("roar: entry point out of range");
  }
  if (n == 0) index->entry_points_ = {0};
  KVR_ASSIGN_OR_RETURN(uint32_t capacity, r.Get<uint32_t>());
  if (capacity != static_cast<uint32_t>(index->graph_.capacity())) {
    return absl::DataLossError("roar: bad graph header");
  }
  // Every node has a count and a key row: a size the payload cannot hold is
  // refused before anything is allocated for it.
  const int64_t row_bytes = int64_t{header.dim} * DTypeSize(header.key_dtype);
  if (n > 0 && static_cast<int64_t>(r.remaining()) / n <
                   static_cast<int64_t>(sizeof(uint32_t)) + row_bytes) {
    return absl::DataLossError(absl::StrCat("roar: a payload of ", r.remaining(),
                                            " bytes cannot hold ", n, " nodes"));
  }
  index->graph_.Resize(n);
  std::vector<uint32_t> nbrs;
  for (int64_t i = 0; i < n; ++i) {
    KVR_ASSIGN_OR_RETURN(uint32_t count, r.Get<uint32_t>());
    if (count > capacity) return absl::DataLossError("roar: adjacency list too long");
    nbrs.resize(count);
    KVR_RETURN_IF_ERROR(r.GetBytes(nbrs.data(), count * sizeof(uint32_t)));
    for (uint32_t v : nbrs) {
      if (v >= n) return absl::DataLossError("roar: neighbour id out of range");
    }
    index->graph_.Set(i, nbrs);
  }
  const size_t key_bytes = static_cast<size_t>(n) * header.dim * DTypeSize(header.key_dtype);
  if (r.remaining() != key_bytes) return absl::DataLossError("roar: key bytes do not match");
  std::string keys(key_bytes, '\0');
  KVR_RETURN_IF_ERROR(r.GetBytes(keys.data(), key_bytes));
  index->keys_.Append(keys.data(), header.key_dtype, n, header.dim);
  return index;
}

}  // namespace kvrecall::index
