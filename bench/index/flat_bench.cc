// flat_bench: speed of exact top-k search (FlatIndex) against the plain
// row-at-a-time scan it replaces (ScoreRows per query + a top-k), measured in
// the same run, for tiles stored in the keys' dtype (f16) and in f32.
//
//   build/bin/flat_bench [--keys=131072] [--dim=128] [--queries=16] [--k=100]
//
// Prints microseconds per query, GFLOP/s and the ratio to the row scan, for
// 1 thread and all threads.

#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "bench/index/machine_info.h"
#include "common/half.h"
#include "common/thread_pool.h"
#include "index/distance.h"
#include "index/flat/flat_index.h"
#include "index/tile_scoring.h"

ABSL_FLAG(int64_t, keys, 131072, "keys in the index");
ABSL_FLAG(int32_t, dim, 128, "head dimension");
ABSL_FLAG(int64_t, queries, 16, "queries per search batch");
ABSL_FLAG(int32_t, k, 100, "results per query");
ABSL_FLAG(int32_t, reps, 5, "timed repetitions (the best is reported)");

namespace kvrecall::bench {
namespace {

using ::kvrecall::DType;
using index::FlatIndex;
using index::FlatOptions;
using index::SearchParams;
using index::VectorView;

template <typename Fn>
double BestSeconds(int reps, Fn&& fn) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

int Main() {
  const int64_t n = absl::GetFlag(FLAGS_keys), nq = absl::GetFlag(FLAGS_queries);
  const int32_t d = absl::GetFlag(FLAGS_dim), k = absl::GetFlag(FLAGS_k);
  const int reps = absl::GetFlag(FLAGS_reps);
  std::printf("flat_bench: %lld keys x %d dims (f16), %lld queries, k=%d\nmachine: %s; tile path %s\n",
              static_cast<long long>(n), d, static_cast<long long>(nq), k, MachineDescription().c_str(),
              index::TilePathName(index::ChooseTilePath(d)));
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::vector<uint16_t> keys(n * d);
  for (auto& h : keys) h = FloatToHalf(nd(rng));
  std::vector<float> q(nq * d);
  for (auto& x : q) x = nd(rng);
  const VectorView key_view{keys.data(), n, d, DType::kF16, 0};
  const VectorView query_view = VectorView::F32(q.data(), nq, d);

  const int all = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int threads : {1, all}) {
    // The peer: one row at a time (DotRow via ScoreRows), then a top-k.
    const double naive = BestSeconds(reps, [&] {
      ThreadPool::Default()->ParallelFor(
          nq, 1,
          [&](int64_t b, int64_t e) {
            static thread_local std::vector<float> sc;
            sc.resize(n);
            for (int64_t i = b; i < e; ++i) {
              index::ScoreRows(q.data() + i * d, keys.data(), DType::kF16, n, d, d, sc.data());
              index::TopK top(k);
              for (int64_t j = 0; j < n; ++j) {
                if (sc[j] >= top.threshold()) top.Push(sc[j], j);
              }
            }
          },
          threads);
    });
    std::printf("\nthreads=%d\n  %-28s %10.1f us/query %8.1f GFLOP/s   1.00x\n", threads,
                "row scan (ScoreRows+top-k)", naive * 1e6 / nq, 2.0 * n * nq * d / naive / 1e9);
    for (bool f32 : {false, true}) {
      FlatOptions options;
      options.store_f32 = f32;
      auto index = FlatIndex::Build(key_view, options);
      if (!index.ok()) {
        std::fprintf(stderr, "%s\n", index.status().ToString().c_str());
        return 1;
      }
      SearchParams params;
      params.num_threads = threads;
      const double s = BestSeconds(reps, [&] {
        auto r = (*index)->Search(query_view, k, params);
        if (!r.ok()) std::abort();
      });
      std::printf("  %-28s %10.1f us/query %8.1f GFLOP/s %6.2fx\n",
                  f32 ? "flat, f32 tiles" : "flat, f16 tiles (native)", s * 1e6 / nq,
                  2.0 * n * nq * d / s / 1e9, naive / s);
    }
  }
  return 0;
}

}  // namespace
}  // namespace kvrecall::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvrecall::bench::Main();
}
