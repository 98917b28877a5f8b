// kvrecall_soak: N clients of a real kvrecalld on loopback for a fixed time,
// each looping put / get / lookup / attend (and a delete now and then, so
// that puts keep storing), over a bounded set of chains per client. Samples
// the daemon's RSS and each operation's p50/p99 latency every second into a
// CSV (deploy/soak_plot.py draws it), and fails (exit 1) on any error or on
// an RSS above --rss_bound_factor x (the memory tier's capacity + the RocksDB
// memtables as configured (--rss_extra_mib) + the daemon's RSS at start).
// Self-stopping: it ends after --seconds.
//
//   kvrecall_soak --clients=64 --seconds=600 --csv=soak.csv
//
// docs/reliability.md records the latest run.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/retrieval_client.h"
#include "clients/cpp/span_keys.h"
#include "common/span_hash.h"
#include "tests/integration/daemon_process.h"
#include "tests/testing/test_data.h"

ABSL_FLAG(int, clients, 64, "concurrent clients (one channel and thread each)");
ABSL_FLAG(int, seconds, 600, "how long the load runs");
ABSL_FLAG(int, chains_per_client, 16, "distinct chains of 4 spans (64 KiB each) per client");
ABSL_FLAG(std::string, memory_capacity, "128MiB", "kvrecalld --memory_capacity_bytes");
ABSL_FLAG(double, rss_bound_factor, 1.10,
          "fail when RSS > factor x (memory capacity + rss_extra_mib + RSS at start)");
ABSL_FLAG(int, rss_extra_mib, 272,
          "memory RocksDB may hold by its configuration (service/store/rocksdb_tier.cc): two "
          "column families x 2 write buffers x 64 MiB, and an 8 MiB block cache for each");
ABSL_FLAG(std::string, csv, "soak.csv", "per-second samples");

namespace kvrecall {
namespace {

using ::kvrecall::testing::DaemonProcess;

constexpr char kModel[] = "soak-model";
constexpr int kTokens = 64;
constexpr int kLayers = 4, kQHeads = 8, kKvHeads = 4, kDim = 16;
constexpr int64_t kSpanBytes = int64_t{kLayers} * 2 * kKvHeads * kTokens * kDim * 2;  // 64 KiB
constexpr int kChainSpans = 4;

enum Op { kPut, kGet, kLookup, kAttend, kDelete, kNumOps };
constexpr const char* kOpNames[kNumOps] = {"put", "get", "lookup", "attend", "delete"};

v1::ModelGeometry Model() {
  v1::ModelGeometry g;
  g.set_model_id(kModel);
  g.set_num_layers(kLayers);
  g.set_num_q_heads(kQHeads);
  g.set_num_kv_heads(kKvHeads);
  g.set_head_dim(kDim);
  g.set_dtype(v1::DTYPE_BF16);
  g.set_block_tokens(kTokens);
  return g;
}

// Chain `c` of client `client`: finite bf16 values, token ids, chained hashes.
std::vector<client::OwnedSpan> MakeChain(int client, int c) {
  std::mt19937_64 rng(static_cast<uint64_t>(client) * 100003 + c);
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  std::vector<client::OwnedSpan> chain;
  Hash128 parent = SpanRootHash(kModel);
  for (int i = 0; i < kChainSpans; ++i) {
    client::OwnedSpan s;
    s.parent = parent;
    s.token_ids.resize(kTokens);
    for (auto& t : s.token_ids) t = static_cast<uint32_t>(rng() % 128000);
    s.hash = SpanHash(parent, s.token_ids);
    s.payload.resize(kSpanBytes);
    for (size_t b = 0; b < s.payload.size(); b += 2) {
      const float f = value(rng);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      const uint16_t bf16 = static_cast<uint16_t>(bits >> 16);
      std::memcpy(s.payload.data() + b, &bf16, 2);
    }
    parent = s.hash;
    chain.push_back(std::move(s));
  }
  return chain;
}

std::vector<Hash128> HashesOf(const std::vector<client::OwnedSpan>& chain) {
  std::vector<Hash128> out;
  for (const auto& s : chain) out.push_back(s.hash);
  return out;
}

int64_t RssBytes(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;
  }
  return -1;
}

// Latencies of the current second, per operation.
class Recorder {
 public:
  void Add(Op op, absl::Duration d, bool ok) {
    absl::MutexLock lock(&mu_);
    lat_[op].push_back(absl::ToDoubleMilliseconds(d));
    if (!ok) ++errors_;
  }
  // Takes the second's samples.
  void Take(std::vector<double> (&lat)[kNumOps], int64_t* errors) {
    absl::MutexLock lock(&mu_);
    for (int i = 0; i < kNumOps; ++i) lat[i] = std::move(lat_[i]), lat_[i].clear();
    *errors = errors_;
    errors_ = 0;
  }

 private:
  absl::Mutex mu_;
  std::vector<double> lat_[kNumOps] ABSL_GUARDED_BY(mu_);
  int64_t errors_ ABSL_GUARDED_BY(mu_) = 0;
};

double Percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  const size_t k = std::min(v.size() - 1, static_cast<size_t>(p * v.size()));
  std::nth_element(v.begin(), v.begin() + k, v.end());
  return v[k];
}

int Run() {
  const int clients = absl::GetFlag(FLAGS_clients);
  const int chains = absl::GetFlag(FLAGS_chains_per_client);
  const std::string dir = kvrecall::testing::MakeTempDir("kvrecall-soak");
  DaemonProcess daemon(dir + "/data",
                       {absl::StrCat("--memory_capacity_bytes=", absl::GetFlag(FLAGS_memory_capacity))});
  if (absl::Status st = daemon.Start(); !st.ok()) {
    std::cerr << "soak: " << st << "\n";
    return 1;
  }
  client::ClientOptions o;
  o.target = daemon.address();
  o.deadline_ms = 30000;
  o.max_attempts = 1;
  {
    auto kv = client::KvStoreClient::Create(o);
    if (!kv.ok() || !(*kv)->RegisterModel(Model()).ok()) {
      std::cerr << "soak: cannot register the model\n";
      return 1;
    }
  }
  absl::StatusOr<v1::GetConfigResponse> config = client::KvStoreClient::Create(o).value()->GetConfig();
  int64_t memory_capacity = 0;
  if (config.ok()) {
    for (const auto& e : config->options()) {
      if (e.name() == "memory_capacity_bytes") memory_capacity = std::atoll(e.value().c_str());
    }
  }
  const int64_t rss_start = RssBytes(daemon.pid());
  const int64_t rss_bound =
      static_cast<int64_t>(absl::GetFlag(FLAGS_rss_bound_factor) *
                           (memory_capacity + (int64_t{absl::GetFlag(FLAGS_rss_extra_mib)} << 20) +
                            rss_start));
  std::cout << "soak: " << clients << " clients x " << absl::GetFlag(FLAGS_seconds)
            << " s; memory tier " << memory_capacity << " bytes, RSS at start " << rss_start
            << ", bound " << rss_bound << std::endl;

  Recorder rec;
  std::atomic<bool> stop{false};
  std::atomic<int64_t> total_ops{0};
  absl::Mutex err_mu;
  std::map<std::string, int64_t> error_kinds;
  auto note_error = [&](Op op, const absl::Status& st) {
    absl::MutexLock lock(&err_mu);
    if (error_kinds[absl::StrCat(kOpNames[op], ": ", st.ToString())]++ == 0) {
      std::cerr << "soak: " << kOpNames[op] << ": " << st << "\n";
    }
  };
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      auto kv = client::KvStoreClient::Create(o);
      auto rc = client::RetrievalClient::Create(o);
      if (!kv.ok() || !rc.ok()) return;
      std::vector<std::vector<client::OwnedSpan>> mine;
      for (int j = 0; j < chains; ++j) mine.push_back(MakeChain(c, j));
      std::mt19937_64 rng(c);
      Hash128 context;
      std::vector<float> q(kQHeads * kDim);
      for (auto& x : q) x = std::uniform_real_distribution<float>(-1, 1)(rng);
      client::RetrieveOptions attend;
      attend.positions.assign(kKvHeads, {});
      for (int h = 0; h < kKvHeads; ++h) {
        for (int p = 0; p < 32; ++p) attend.positions[h].push_back((p * 7 + h) % (kTokens * kChainSpans));
      }
      auto timed = [&](Op op, auto&& call) {
        const absl::Time t0 = absl::Now();
        absl::Status st = call();
        rec.Add(op, absl::Now() - t0, st.ok());
        total_ops.fetch_add(1, std::memory_order_relaxed);
        if (!st.ok()) note_error(op, st);  // counted and reported: the run fails
      };
      for (int64_t i = 0; !stop.load(); ++i) {
        const auto& chain = mine[i % chains];
        const std::vector<Hash128> hashes = HashesOf(chain);
        timed(kPut, [&] {
          std::vector<client::SpanToPut> put;
          for (const auto& s : chain) {
            put.push_back({s.hash, s.parent, kTokens, s.token_ids, s.payload, (i % 2) == 0});
          }
          return (*kv)->PutSpans(kModel, put).status();
        });
        timed(kGet, [&] { return (*kv)->GetSpans(kModel, hashes).status(); });
        timed(kLookup, [&] { return (*kv)->Lookup(kModel, hashes).status(); });
        if (context.IsZero()) {
          auto opened = (*rc)->OpenContext(kModel, HashesOf(mine[0]));
          if (opened.ok()) context = Hash128::FromBytes(opened->context()).value_or(Hash128());
        }
        if (!context.IsZero()) {
          timed(kAttend, [&] {
            return (*rc)->Attend(context, static_cast<int32_t>(i % kLayers), q, kQHeads, attend).status();
          });
        }
        if (i % 4 == 3 && i % chains != 0) {  // chain 0 backs the context
          timed(kDelete, [&] { return (*kv)->DeleteSpans(hashes).status(); });
        }
      }
    });
  }

  std::ofstream csv(absl::GetFlag(FLAGS_csv));
  csv << "t_s,rss_mib,ops,errors";
  for (const char* n : kOpNames) csv << "," << n << "_p50_ms," << n << "_p99_ms";
  csv << "\n";
  int64_t rss_max = 0, errors_total = 0;
  const absl::Time start = absl::Now();
  for (int s = 1; s <= absl::GetFlag(FLAGS_seconds); ++s) {
    absl::SleepFor(start + absl::Seconds(s) - absl::Now());
    std::vector<double> lat[kNumOps];
    int64_t errors = 0;
    rec.Take(lat, &errors);
    errors_total += errors;
    const int64_t rss = RssBytes(daemon.pid());
    rss_max = std::max(rss_max, rss);
    size_t ops = 0;
    for (auto& l : lat) ops += l.size();
    csv << s << "," << rss / 1048576.0 << "," << ops << "," << errors;
    for (auto& l : lat) csv << "," << Percentile(l, 0.5) << "," << Percentile(l, 0.99);
    csv << "\n";
    csv.flush();
    if (s % 10 == 0) {
      std::cout << "soak: " << s << " s, RSS " << rss / 1048576 << " MiB, " << ops << " ops/s, "
                << errors_total << " errors" << std::endl;
    }
  }
  stop = true;
  for (auto& t : threads) t.join();
  const absl::Status stopped = daemon.Stop();
  std::cout << "soak: " << total_ops.load() << " operations, " << errors_total << " errors, RSS max "
            << rss_max / 1048576 << " MiB (bound " << rss_bound / 1048576 << " MiB; "
            << (rss_max - rss_start) / 1048576 << " MiB above the start for a "
            << memory_capacity / 1048576 << " MiB memory tier), daemon stop: " << stopped
            << std::endl;
  for (const auto& [k, n] : error_kinds) std::cout << "soak: error x" << n << " " << k << "\n";
  const bool ok = errors_total == 0 && rss_max <= rss_bound && stopped.ok();
  if (ok) std::filesystem::remove_all(dir);
  std::cout << (ok ? "soak: passed" : "soak: FAILED") << std::endl;
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace kvrecall

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvrecall::Run();
}
