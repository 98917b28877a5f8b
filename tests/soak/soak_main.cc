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
#include "common/status_macros.h"
#include "tests/integration/daemon_process.h"
#include "tests/integration/random_spans.h"
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
using ::kvrecall::testing::RandomChain;
using ::kvrecall::testing::RandomPayload;
using ::kvrecall::testing::SmallModel;
using ::kvrecall::testing::SpanHashes;

constexpr char kModel[] = "soak-model";
constexpr int kTokens = 64;
constexpr int kLayers = 4, kQHeads = 8, kKvHeads = 4, kDim = 16;
constexpr int64_t kSpanBytes = int64_t{kLayers} * 2 * kKvHeads * kTokens * kDim * 2;  // 64 KiB
constexpr int kChainSpans = 4;

enum Op { kPut, kGet, kLookup, kAttend, kDelete, kNumOps };
constexpr const char* kOpNames[kNumOps] = {"put", "get", "lookup", "attend", "delete"};

v1::ModelGeometry Model() {
  return SmallModel(kModel, v1::DTYPE_BF16, kLayers, kQHeads, kKvHeads, kTokens);
}

// Chain `c` of client `client`: finite bf16 values, token ids, chained hashes.
std::vector<client::OwnedSpan> MakeChain(int client, int c) {
  std::mt19937_64 rng(static_cast<uint64_t>(client) * 100003 + c);
  return RandomChain(kModel, kChainSpans, kTokens, kSpanBytes, rng, RandomPayload::kFiniteBf16);
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

// One soak run: the daemon, the clients' load, the per-second samples.
class Soak {
 public:
  explicit Soak(std::string dir)
      : dir_(std::move(dir)),
        daemon_(dir_ + "/data", {absl::StrCat("--memory_capacity_bytes=",
                                              absl::GetFlag(FLAGS_memory_capacity))}) {}

  // Starts kvrecalld, registers the model and sets the RSS bound.
  absl::Status Start() {
    KVR_RETURN_IF_ERROR(daemon_.Start());
    options_.target = daemon_.address();
    options_.deadline_ms = 30000;
    options_.max_attempts = 1;
    KVR_ASSIGN_OR_RETURN(auto kv, client::KvStoreClient::Create(options_));
    if (!kv->RegisterModel(Model()).ok()) return absl::InternalError("cannot register the model");
    absl::StatusOr<v1::GetConfigResponse> config = kv->GetConfig();
    if (config.ok()) {
      for (const auto& e : config->options()) {
        if (e.name() == "memory_capacity_bytes") memory_capacity_ = std::atoll(e.value().c_str());
      }
    }
    rss_start_ = RssBytes(daemon_.pid());
    rss_bound_ = static_cast<int64_t>(
        absl::GetFlag(FLAGS_rss_bound_factor) *
        (memory_capacity_ + (int64_t{absl::GetFlag(FLAGS_rss_extra_mib)} << 20) + rss_start_));
    std::cout << "soak: " << absl::GetFlag(FLAGS_clients) << " clients x "
              << absl::GetFlag(FLAGS_seconds) << " s; memory tier " << memory_capacity_
              << " bytes, RSS at start " << rss_start_ << ", bound " << rss_bound_ << std::endl;
    return absl::OkStatus();
  }

  // Runs the clients for --seconds, sampling every second into --csv;
  // returns the exit code.
  int Run() {
    std::vector<std::thread> threads;
    for (int c = 0; c < absl::GetFlag(FLAGS_clients); ++c) {
      threads.emplace_back([this, c] { ClientLoop(c); });
    }
    SampleEachSecond();
    stop_ = true;
    for (auto& t : threads) t.join();
    return Report();
  }

 private:
  void NoteError(Op op, const absl::Status& st) {
    absl::MutexLock lock(&err_mu_);
    if (error_kinds_[absl::StrCat(kOpNames[op], ": ", st.ToString())]++ == 0) {
      std::cerr << "soak: " << kOpNames[op] << ": " << st << "\n";
    }
  }

  // Client `c`: put, get, lookup and attend over its chains in turn, and a
  // delete now and then, until stop_.
  void ClientLoop(int c) {
    const int chains = absl::GetFlag(FLAGS_chains_per_client);
    auto kv = client::KvStoreClient::Create(options_);
    auto rc = client::RetrievalClient::Create(options_);
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
      rec_.Add(op, absl::Now() - t0, st.ok());
      total_ops_.fetch_add(1, std::memory_order_relaxed);
      if (!st.ok()) NoteError(op, st);  // counted and reported: the run fails
    };
    for (int64_t i = 0; !stop_.load(); ++i) {
      const auto& chain = mine[i % chains];
      const std::vector<Hash128> hashes = SpanHashes(chain);
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
        auto opened = (*rc)->OpenContext(kModel, SpanHashes(mine[0]));
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
  }

  // Every second: the daemon's RSS and each operation's p50/p99 to the CSV,
  // and a line every 10 s.
  void SampleEachSecond() {
    std::ofstream csv(absl::GetFlag(FLAGS_csv));
    csv << "t_s,rss_mib,ops,errors";
    for (const char* n : kOpNames) csv << "," << n << "_p50_ms," << n << "_p99_ms";
    csv << "\n";
    const absl::Time start = absl::Now();
    for (int s = 1; s <= absl::GetFlag(FLAGS_seconds); ++s) {
      absl::SleepFor(start + absl::Seconds(s) - absl::Now());
      std::vector<double> lat[kNumOps];
      int64_t errors = 0;
      rec_.Take(lat, &errors);
      errors_total_ += errors;
      const int64_t rss = RssBytes(daemon_.pid());
      rss_max_ = std::max(rss_max_, rss);
      size_t ops = 0;
      for (auto& l : lat) ops += l.size();
      csv << s << "," << rss / 1048576.0 << "," << ops << "," << errors;
      for (auto& l : lat) csv << "," << Percentile(l, 0.5) << "," << Percentile(l, 0.99);
      csv << "\n";
      csv.flush();
      if (s % 10 == 0) {
        std::cout << "soak: " << s << " s, RSS " << rss / 1048576 << " MiB, " << ops << " ops/s, "
                  << errors_total_ << " errors" << std::endl;
      }
    }
  }

  // Stops the daemon and says whether the run passed; the exit code.
  int Report() {
    const absl::Status stopped = daemon_.Stop();
    std::cout << "soak: " << total_ops_.load() << " operations, " << errors_total_
              << " errors, RSS max " << rss_max_ / 1048576 << " MiB (bound "
              << rss_bound_ / 1048576 << " MiB; " << (rss_max_ - rss_start_) / 1048576
              << " MiB above the start for a " << memory_capacity_ / 1048576
              << " MiB memory tier), daemon stop: " << stopped << std::endl;
    {
      absl::MutexLock lock(&err_mu_);
      for (const auto& [k, n] : error_kinds_) std::cout << "soak: error x" << n << " " << k << "\n";
    }
    const bool ok = errors_total_ == 0 && rss_max_ <= rss_bound_ && stopped.ok();
    if (ok) std::filesystem::remove_all(dir_);
    std::cout << (ok ? "soak: passed" : "soak: FAILED") << std::endl;
    return ok ? 0 : 1;
  }

  const std::string dir_;
  DaemonProcess daemon_;
  client::ClientOptions options_;
  int64_t memory_capacity_ = 0;
  int64_t rss_start_ = 0, rss_bound_ = 0, rss_max_ = 0, errors_total_ = 0;
  Recorder rec_;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> total_ops_{0};
  absl::Mutex err_mu_;
  std::map<std::string, int64_t> error_kinds_ ABSL_GUARDED_BY(err_mu_);
};

int Run() {
  Soak soak(kvrecall::testing::MakeTempDir("kvrecall-soak"));
  if (absl::Status st = soak.Start(); !st.ok()) {
    std::cerr << "soak: " << st << "\n";
    return 1;
  }
  return soak.Run();
}

}  // namespace
}  // namespace kvrecall

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvrecall::Run();
}
