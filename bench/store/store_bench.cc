// store_bench: put and get throughput and latency of spans through kvrecalld
// on loopback, against redis-server measured in the same run with the same
// workload (docs: README.md "Store benchmark").
//
// For every span size (--sizes) and number of concurrent clients
// (--clients), each client stores its share of --bytes_per_cell as one span
// per call (kvrecall: a PutSpans stream of one span; Redis: SET), then reads
// every span back (GetSpans of one span; GET). Each client has its own
// connection. Prints MiB/s, p50/p99 latency per call and the ratio
// kvrecall/Redis per row, plus the machine.
//
//   store_bench                              # 64 KiB, 1 MiB, 8 MiB x 1, 4, 16 clients
//   store_bench --sizes=1MiB --clients=4 --bytes_per_cell=1GiB

#include <hiredis/hiredis.h>
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/span_keys.h"
#include "common/npy.h"
#include "common/span_hash.h"
#include "common/status_macros.h"
#include "tests/testing/child_process.h"

ABSL_FLAG(std::vector<std::string>, sizes, std::vector<std::string>({"64KiB", "1MiB", "8MiB"}),
          "span payload sizes (64KiB, 1MiB or 8MiB)");
ABSL_FLAG(std::vector<std::string>, clients, std::vector<std::string>({"1", "4", "16"}),
          "numbers of concurrent clients");
ABSL_FLAG(std::string, bytes_per_cell, "512MiB",
          "payload bytes each system writes (then reads) per size x clients cell");
ABSL_FLAG(int32_t, min_spans_per_client, 4,
          "each client puts and gets at least this many spans (at least one call)");
ABSL_FLAG(int32_t, batch, 1,
          "spans per call: kvrecall streams them in one PutSpans/GetSpans call, Redis pipelines "
          "that many SET/GET commands");
ABSL_FLAG(std::string, kvrecalld, "", "kvrecalld binary (default: beside store_bench)");
ABSL_FLAG(std::string, redis_server, "/usr/bin/redis-server", "redis-server binary");
ABSL_FLAG(std::vector<std::string>, kvrecalld_flags, std::vector<std::string>(),
          "extra kvrecalld flags, comma-separated (e.g. --get_chunk_bytes=4194304)");
ABSL_FLAG(int64_t, chunk_bytes, 0, "client payload bytes per PutSpans message (0: default)");
ABSL_FLAG(int64_t, http2_window_bytes, 0,
          "client HTTP/2 flow-control window (0: gRPC's automatic sizing)");
ABSL_FLAG(int64_t, http2_max_frame_bytes, 0,
          "client's largest accepted HTTP/2 frame (0: gRPC's 16 KiB)");
ABSL_FLAG(bool, durable, false, "kvrecall puts are durable (Redis keeps no persistence)");
ABSL_FLAG(std::string, json_out, "", "also write the results as JSON lines to this file");

namespace kvrecall::bench {
namespace {

using ::kvrecall::testing::ChildProcess;
using ::kvrecall::testing::PickFreeLoopbackPort;
using ::kvrecall::testing::WaitForPortFile;

absl::StatusOr<int64_t> ParseBytes(std::string text) {
  text = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text));
  int shift = 0;
  for (const auto& [suffix, bits] :
       std::vector<std::pair<std::string, int>>{{"kib", 10}, {"mib", 20}, {"gib", 30}}) {
    if (text.size() > suffix.size() && text.substr(text.size() - suffix.size()) == suffix) {
      text.resize(text.size() - suffix.size());
      shift = bits;
    }
  }
  int64_t v = 0;
  if (!absl::SimpleAtoi(text, &v) || v <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("bad byte count '", text, "'"));
  }
  return v << shift;
}

std::string SizeName(int64_t bytes) {
  if (bytes % (1 << 20) == 0) return absl::StrCat(bytes >> 20, " MiB");
  return absl::StrCat(bytes >> 10, " KiB");
}

// A Llama-like geometry whose spans are exactly `bytes`:
// 64 KiB = kvr-tiny-llama (8 layers, 2 KV heads x 128, f16) x 8 tokens;
// 1 MiB / 8 MiB = Llama-3-8B (32 layers, 8 KV heads x 128, bf16) x 8 / 64 tokens.
absl::StatusOr<v1::ModelGeometry> GeometryFor(int64_t bytes) {
  v1::ModelGeometry g;
  g.set_keys_post_rope(true);
  if (bytes == (64 << 10)) {
    g.set_model_id("bench-tiny-llama");
    g.set_num_layers(8);
    g.set_num_q_heads(4);
    g.set_num_kv_heads(2);
    g.set_head_dim(128);
    g.set_dtype(v1::DTYPE_F16);
    g.set_block_tokens(8);
  } else if (bytes == (1 << 20) || bytes == (8 << 20)) {
    g.set_model_id(absl::StrCat("bench-llama3-8b-", bytes >> 20, "m"));
    g.set_num_layers(32);
    g.set_num_q_heads(32);
    g.set_num_kv_heads(8);
    g.set_head_dim(128);
    g.set_dtype(v1::DTYPE_BF16);
    g.set_block_tokens(static_cast<int32_t>(bytes / 131072));
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--sizes: ", bytes, " bytes; use 64KiB, 1MiB or 8MiB"));
  }
  if (client::SpanPayloadBytes(g, g.block_tokens()) != bytes) {
    return absl::InternalError("geometry does not give the span size");
  }
  return g;
}

// One client connection of a system under test. Not thread-safe (one per thread).
class Connection {
 public:
  virtual ~Connection() = default;
  // Stores `keys`, each with `payload`, in one call (a pipeline for Redis).
  virtual absl::Status Put(absl::Span<const Hash128> keys, absl::string_view payload) = 0;
  // Reads `keys` back in one call and checks their sizes.
  virtual absl::Status Get(absl::Span<const Hash128> keys, int64_t expected_bytes) = 0;
};

class KvrecallConnection final : public Connection {
 public:
  static absl::StatusOr<std::unique_ptr<Connection>> Create(const std::string& target,
                                                            const v1::ModelGeometry& model) {
    client::ClientOptions o;
    o.target = target;
    o.deadline_ms = 300000;
    o.dedicated_connection = true;
    if (absl::GetFlag(FLAGS_chunk_bytes) > 0) o.chunk_bytes = absl::GetFlag(FLAGS_chunk_bytes);
    o.http2_window_bytes = absl::GetFlag(FLAGS_http2_window_bytes);
    o.http2_max_frame_bytes = absl::GetFlag(FLAGS_http2_max_frame_bytes);
    auto c = client::KvStoreClient::Create(o);
    if (!c.ok()) return c.status();
    return std::unique_ptr<Connection>(new KvrecallConnection(*std::move(c), model));
  }
  absl::Status Put(absl::Span<const Hash128> keys, absl::string_view payload) override {
    std::vector<client::SpanToPut> spans;
    for (const Hash128& key : keys) {
      spans.push_back(client::SpanToPut{key, root_, model_.block_tokens(), {}, payload,
                                        absl::GetFlag(FLAGS_durable)});
    }
    return client_->PutSpans(model_.model_id(), spans).status();
  }
  absl::Status Get(absl::Span<const Hash128> keys, int64_t expected_bytes) override {
    auto got = client_->GetSpans(model_.model_id(), keys);
    if (!got.ok()) return got.status();
    if (got->size() != keys.size()) return absl::InternalError("kvrecall: spans missing");
    for (const auto& span : *got) {
      if (!span.found || static_cast<int64_t>(span.payload.size()) != expected_bytes) {
        return absl::InternalError("kvrecall: a stored span did not come back");
      }
    }
    return absl::OkStatus();
  }

 private:
  KvrecallConnection(std::unique_ptr<client::KvStoreClient> c, const v1::ModelGeometry& model)
      : client_(std::move(c)), model_(model), root_(SpanRootHash(model.model_id())) {}
  std::unique_ptr<client::KvStoreClient> client_;
  const v1::ModelGeometry model_;
  const Hash128 root_;
};

class RedisConnection final : public Connection {
 public:
  static absl::StatusOr<std::unique_ptr<Connection>> Create(int port) {
    redisContext* c = redisConnect("127.0.0.1", port);
    if (c == nullptr || c->err != 0) {
      const std::string why = c != nullptr ? c->errstr : "out of memory";
      if (c != nullptr) redisFree(c);
      return absl::UnavailableError(absl::StrCat("redis: ", why));
    }
    return std::unique_ptr<Connection>(new RedisConnection(c));
  }
  ~RedisConnection() override { redisFree(context_); }
  absl::Status Put(absl::Span<const Hash128> keys, absl::string_view payload) override {
    std::vector<std::string> names;
    for (const Hash128& key : keys) names.push_back(key.ToHex());
    for (const std::string& k : names) {
      const char* argv[] = {"SET", k.data(), payload.data()};
      const size_t lens[] = {3, k.size(), payload.size()};
      if (redisAppendCommandArgv(context_, 3, argv, lens) != REDIS_OK) {
        return absl::UnavailableError(absl::StrCat("redis: ", context_->errstr));
      }
    }
    return Replies(keys.size(), -1);
  }
  absl::Status Get(absl::Span<const Hash128> keys, int64_t expected_bytes) override {
    std::vector<std::string> names;
    for (const Hash128& key : keys) names.push_back(key.ToHex());
    for (const std::string& k : names) {
      const char* argv[] = {"GET", k.data()};
      const size_t lens[] = {3, k.size()};
      if (redisAppendCommandArgv(context_, 2, argv, lens) != REDIS_OK) {
        return absl::UnavailableError(absl::StrCat("redis: ", context_->errstr));
      }
    }
    return Replies(keys.size(), expected_bytes);
  }
  // Runs a command whose reply does not matter (FLUSHALL, CONFIG SET ...).
  static absl::Status Command(int port, const std::vector<std::string>& args) {
    auto conn = Create(port);
    if (!conn.ok()) return conn.status();
    auto* self = static_cast<RedisConnection*>(conn->get());
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    for (const auto& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    return self->Reply(redisCommandArgv(self->context_, static_cast<int>(args.size()),
                                        argv.data(), lens.data()),
                       -1);
  }
  static absl::StatusOr<std::string> Info(int port, const std::string& field) {
    auto conn = Create(port);
    if (!conn.ok()) return conn.status();
    auto* self = static_cast<RedisConnection*>(conn->get());
    auto* reply = static_cast<redisReply*>(redisCommand(self->context_, "INFO server"));
    if (reply == nullptr || reply->type != REDIS_REPLY_STRING) {
      if (reply != nullptr) freeReplyObject(reply);
      return absl::UnavailableError("redis: INFO failed");
    }
    std::string value;
    for (absl::string_view line : absl::StrSplit(absl::string_view(reply->str, reply->len), '\n')) {
      if (absl::StartsWith(line, field + ":")) {
        value = std::string(absl::StripAsciiWhitespace(line.substr(field.size() + 1)));
      }
    }
    freeReplyObject(reply);
    return value;
  }

 private:
  explicit RedisConnection(redisContext* c) : context_(c) {}
  // Reads the replies of `n` pipelined commands.
  absl::Status Replies(size_t n, int64_t expected_bytes) {
    absl::Status first;
    for (size_t i = 0; i < n; ++i) {
      void* reply = nullptr;
      if (redisGetReply(context_, &reply) != REDIS_OK) {
        return absl::UnavailableError(absl::StrCat("redis: ", context_->errstr));
      }
      absl::Status s = Reply(reply, expected_bytes);
      if (first.ok()) first = s;
    }
    return first;
  }
  absl::Status Reply(void* raw, int64_t expected_bytes) {
    auto* reply = static_cast<redisReply*>(raw);
    if (reply == nullptr) return absl::UnavailableError(absl::StrCat("redis: ", context_->errstr));
    absl::Status s;
    if (reply->type == REDIS_REPLY_ERROR) {
      s = absl::InternalError(absl::StrCat("redis: ", std::string(reply->str, reply->len)));
    } else if (expected_bytes >= 0 && (reply->type != REDIS_REPLY_STRING ||
                                       static_cast<int64_t>(reply->len) != expected_bytes)) {
      s = absl::InternalError("redis: a stored value did not come back");
    }
    freeReplyObject(reply);
    return s;
  }
  redisContext* const context_;
};

struct PhaseResult {
  double mib_per_s = 0;
  double p50_ms = 0;
  double p99_ms = 0;
  int64_t ops = 0;
  double server_cpu_s = 0;  // CPU seconds of the server process during the phase
  double client_cpu_s = 0;  // CPU seconds of this process (the clients) during the phase
};

// User + system CPU seconds of a process so far (/proc/<pid>/stat).
double CpuSeconds(pid_t pid) {
  std::ifstream in(pid > 0 ? absl::StrCat("/proc/", pid, "/stat") : "/proc/self/stat");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t paren = text.rfind(')');
  if (paren == std::string::npos) return 0;
  std::vector<std::string> f = absl::StrSplit(text.substr(paren + 2), ' ');
  // After the command: state(0) ... utime(11) stime(12), in clock ticks.
  double utime = 0, stime = 0;
  if (f.size() < 13 || !absl::SimpleAtod(f[11], &utime) || !absl::SimpleAtod(f[12], &stime)) {
    return 0;
  }
  return (utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

double Percentile(std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5));
  std::nth_element(v.begin(), v.begin() + static_cast<long>(i), v.end());
  return v[i];
}

// Runs `clients` threads, each calling op(connection, client, i) for
// i < ops_per_client; returns throughput over the wall time of the phase.
absl::StatusOr<PhaseResult> RunPhase(
    std::vector<std::unique_ptr<Connection>>& conns, int64_t ops_per_client, int64_t op_bytes,
    pid_t server_pid, const std::function<absl::Status(Connection&, int, int64_t)>& op) {
  const int clients = static_cast<int>(conns.size());
  std::vector<std::vector<double>> latencies(clients);
  std::vector<absl::Status> statuses(clients);
  absl::Notification go;
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      latencies[c].reserve(ops_per_client);
      go.WaitForNotification();
      for (int64_t i = 0; i < ops_per_client; ++i) {
        const absl::Time t0 = absl::Now();
        absl::Status s = op(*conns[c], c, i);
        latencies[c].push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
        if (!s.ok()) {
          statuses[c] = s;
          return;
        }
      }
    });
  }
  const double server_cpu0 = CpuSeconds(server_pid);
  const double client_cpu0 = CpuSeconds(0);
  const absl::Time start = absl::Now();
  go.Notify();
  for (auto& t : threads) t.join();
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  const double server_cpu = CpuSeconds(server_pid) - server_cpu0;
  const double client_cpu = CpuSeconds(0) - client_cpu0;
  for (const auto& s : statuses) {
    if (!s.ok()) return s;
  }
  std::vector<double> all;
  for (auto& l : latencies) all.insert(all.end(), l.begin(), l.end());
  PhaseResult r;
  r.ops = static_cast<int64_t>(all.size());
  r.mib_per_s = r.ops * static_cast<double>(op_bytes) / (1 << 20) / seconds;  // op = one call
  r.p50_ms = Percentile(all, 0.50);
  r.p99_ms = Percentile(all, 0.99);
  r.server_cpu_s = server_cpu;
  r.client_cpu_s = client_cpu;
  return r;
}

// /proc files report size 0, so they are read as streams.
absl::StatusOr<std::string> ReadProcFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string Machine() {
  std::string model = "unknown CPU";
  auto cpuinfo = ReadProcFile("/proc/cpuinfo");
  if (cpuinfo.ok()) {
    for (absl::string_view line : absl::StrSplit(*cpuinfo, '\n')) {
      if (absl::StartsWith(line, "model name")) {
        model = std::string(absl::StripAsciiWhitespace(line.substr(line.find(':') + 1)));
        break;
      }
    }
  }
  int64_t mem_kib = 0;
  auto meminfo = ReadProcFile("/proc/meminfo");
  if (meminfo.ok()) {
    for (absl::string_view line : absl::StrSplit(*meminfo, '\n')) {
      if (absl::StartsWith(line, "MemTotal:")) {
        std::vector<std::string> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
        if (f.size() >= 2) (void)absl::SimpleAtoi(f[1], &mem_kib);
      }
    }
  }
  return absl::StrFormat("%s, %d cores (nproc), %.0f GiB RAM", model,
                         std::thread::hardware_concurrency(), mem_kib / 1048576.0);
}

std::string SelfDir() {
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? "." : self.parent_path().string();
}

// The run's settings from the flags.
struct BenchConfig {
  std::vector<int64_t> sizes;  // span bytes
  std::vector<int> clients;
  int64_t cell_bytes = 0;      // bytes written per cell and system
  int batch = 1;               // spans per call
};

// INVALID_ARGUMENT naming the bad flag (exit code 2).
absl::StatusOr<BenchConfig> ConfigFromFlags() {
  BenchConfig cfg;
  for (const auto& s : absl::GetFlag(FLAGS_sizes)) {
    auto b = ParseBytes(s);
    if (!b.ok()) return absl::InvalidArgumentError(absl::StrCat("--sizes: ", b.status().message()));
    cfg.sizes.push_back(*b);
  }
  for (const auto& s : absl::GetFlag(FLAGS_clients)) {
    int c = 0;
    if (!absl::SimpleAtoi(s, &c) || c < 1 || c > 256) {
      return absl::InvalidArgumentError(absl::StrCat("--clients: '", s, "' is not in 1..256"));
    }
    cfg.clients.push_back(c);
  }
  auto cell_bytes = ParseBytes(absl::GetFlag(FLAGS_bytes_per_cell));
  if (!cell_bytes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--bytes_per_cell: ", cell_bytes.status().message()));
  }
  cfg.cell_bytes = *cell_bytes;
  cfg.batch = absl::GetFlag(FLAGS_batch);
  if (cfg.batch < 1 || cfg.batch > 4096) {
    return absl::InvalidArgumentError("--batch must be in 1..4096");
  }
  for (int64_t size : cfg.sizes) KVR_RETURN_IF_ERROR(GeometryFor(size).status());
  return cfg;
}

// Calls per client in the cell of `size` x `clients`, each of cfg.batch spans.
int64_t CallsPerClient(const BenchConfig& cfg, int64_t size, int clients) {
  const int64_t min_calls = (absl::GetFlag(FLAGS_min_spans_per_client) + cfg.batch - 1) / cfg.batch;
  return std::max<int64_t>(cfg.cell_bytes / (size * clients * cfg.batch),
                           std::max<int64_t>(1, min_calls));
}

// Starts kvrecalld on a port it picks, data in dir/data, with a memory tier
// of `memory_bytes`; returns the port.
absl::StatusOr<int> StartKvrecalld(const std::string& dir, int64_t memory_bytes,
                                   ChildProcess* proc) {
  std::string kvrecalld = absl::GetFlag(FLAGS_kvrecalld);
  if (kvrecalld.empty()) kvrecalld = SelfDir() + "/kvrecalld";
  std::vector<std::string> argv = {
      kvrecalld, "--listen=127.0.0.1:0", "--port_file=" + dir + "/kvrecalld.port",
      // Spans here carry no token ids (random keys, as Redis gets).
      "--require_token_ids=false",
      "--data_dir=" + dir + "/data",
      absl::StrCat("--memory_capacity_bytes=", memory_bytes)};
  for (const auto& f : absl::GetFlag(FLAGS_kvrecalld_flags)) argv.push_back(f);
  KVR_RETURN_IF_ERROR(proc->Spawn(argv, dir + "/kvrecalld.log"));
  absl::StatusOr<int> port = WaitForPortFile(*proc, dir + "/kvrecalld.port", absl::Seconds(60));
  if (!port.ok()) {
    return absl::UnavailableError(absl::StrCat("kvrecalld did not start (", port.status().message(),
                                               "); see ", dir, "/kvrecalld.log"));
  }
  return *port;
}

// Starts redis-server on loopback, no persistence, no memory limit; returns
// its port.
absl::StatusOr<int> StartRedis(const std::string& dir, ChildProcess* proc) {
  for (int attempt = 0; attempt < 5; ++attempt) {
    auto port = PickFreeLoopbackPort();
    if (!port.ok()) break;
    if (!proc->Spawn({absl::GetFlag(FLAGS_redis_server), "--port", absl::StrCat(*port), "--bind",
                      "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "no",
                      "--dir", dir, "--daemonize", "no"},
                     dir + "/redis.log")
             .ok()) {
      break;
    }
    for (int i = 0; i < 500; ++i) {
      if (!proc->Alive()) break;
      if (RedisConnection::Command(*port, {"PING"}).ok()) return *port;
      absl::SleepFor(absl::Milliseconds(10));
    }
    proc->Stop().IgnoreError();  // it did not answer: the next attempt or the error below
  }
  return absl::UnavailableError(absl::StrCat("redis-server (", absl::GetFlag(FLAGS_redis_server),
                                             ") did not start; see ", dir, "/redis.log"));
}

void PrintPreamble(const BenchConfig& cfg, const std::string& redis_version) {
  std::printf("kvrecall store benchmark: %d span(s) per call over 127.0.0.1 (Redis: a pipeline of "
              "%d SET/GET), each client on its own connection;\nkvrecalld (memory tier, %s "
              "puts) vs redis-server %s (--save \"\" --appendonly no), same run, same "
              "workload.\n",
              cfg.batch, cfg.batch, absl::GetFlag(FLAGS_durable) ? "durable" : "non-durable",
              redis_version.c_str());
  std::printf("machine: %s\n", Machine().c_str());
  auto load = ReadProcFile("/proc/loadavg");
  std::printf("load average at start (other work on the machine): %s",
              load.ok() ? load->c_str() : "?\n");
  std::printf("bytes per cell and system: %s written, then read\n\n",
              SizeName(cfg.cell_bytes).c_str());
  std::printf("%-7s %7s %-4s %9s %9s %8s %17s %17s %15s %15s\n", "size", "clients", "op",
              "kvrecall", "redis", "ratio", "kvrecall p50/p99", "redis p50/p99",
              "kvrecall cpu", "redis cpu");
  std::printf("%-7s %7s %-4s %9s %9s %8s %17s %17s %15s %15s\n", "", "", "", "MiB/s", "MiB/s",
              "kv/redis", "ms", "ms", "srv/cli s/GiB", "srv/cli s/GiB");
  std::fflush(stdout);
}

// The two peers of the run.
struct Servers {
  std::string kv_target;
  pid_t kv_pid = -1;
  int redis_port = 0;
  pid_t redis_pid = -1;
};

// One cell of one system (0: kvrecall, 1: Redis): `clients` connections,
// a warm-up, then the put phase and the get phase. keys[k]: client k's.
absl::StatusOr<std::array<PhaseResult, 2>> RunSystem(
    int system, const Servers& servers, const v1::ModelGeometry& model, int64_t size, int batch,
    int64_t ops, const std::vector<std::vector<Hash128>>& keys, const std::string& payload) {
  const int clients = static_cast<int>(keys.size());
  std::vector<std::unique_ptr<Connection>> conns;
  for (int k = 0; k < clients; ++k) {
    if (system == 0) {
      KVR_ASSIGN_OR_RETURN(auto conn, KvrecallConnection::Create(servers.kv_target, model));
      conns.push_back(std::move(conn));
    } else {
      KVR_ASSIGN_OR_RETURN(auto conn, RedisConnection::Create(servers.redis_port));
      conns.push_back(std::move(conn));
    }
  }
  // Warm-up: one put and get per connection (connections, allocators).
  const Hash128 root = SpanRootHash(model.model_id());
  for (int k = 0; k < clients; ++k) {
    std::vector<uint32_t> t(model.block_tokens(), static_cast<uint32_t>(k));
    const Hash128 warm = SpanHash(root, t);
    if (!conns[k]->Put({warm}, payload).ok() || !conns[k]->Get({warm}, size).ok()) {
      return absl::InternalError("warm-up failed");
    }
  }
  const pid_t server_pid = system == 0 ? servers.kv_pid : servers.redis_pid;
  auto slice = [&](int k, int64_t i) {
    return absl::MakeConstSpan(keys[k]).subspan(static_cast<size_t>(i * batch), batch);
  };
  const char* name = system == 0 ? "kvrecall" : "redis";
  auto put = RunPhase(conns, ops, size * batch, server_pid, [&](Connection& conn, int k, int64_t i) {
    return conn.Put(slice(k, i), payload);
  });
  if (!put.ok()) return absl::Status(put.status().code(), absl::StrCat(name, " failed: ", put.status().message()));
  auto get = RunPhase(conns, ops, size * batch, server_pid, [&](Connection& conn, int k, int64_t i) {
    return conn.Get(slice(k, i), size);
  });
  if (!get.ok()) return absl::Status(get.status().code(), absl::StrCat(name, " failed: ", get.status().message()));
  return std::array<PhaseResult, 2>{*put, *get};
}

// Prints (and writes as JSON lines) the put and get rows of a cell.
void PrintCell(int64_t size, int clients, int batch,
               const std::array<PhaseResult, 2> (&results)[2], std::ofstream* json) {
  for (int op = 0; op < 2; ++op) {
    const PhaseResult& kv = results[0][op];
    const PhaseResult& rd = results[1][op];
    const double gib = static_cast<double>(kv.ops) * size * batch / (1 << 30);
    std::printf("%-7s %7d %-4s %9.0f %9.0f %8.2f %8.2f/%-8.2f %8.2f/%-8.2f %7.2f/%-7.2f "
                "%7.2f/%-7.2f\n",
                SizeName(size).c_str(), clients, op == 0 ? "put" : "get", kv.mib_per_s,
                rd.mib_per_s, kv.mib_per_s / rd.mib_per_s, kv.p50_ms, kv.p99_ms, rd.p50_ms,
                rd.p99_ms, kv.server_cpu_s / gib, kv.client_cpu_s / gib, rd.server_cpu_s / gib,
                rd.client_cpu_s / gib);
    if (json->is_open()) {
      *json << absl::StrFormat(
          "{\"size_bytes\": %d, \"clients\": %d, \"op\": \"%s\", \"ops\": %d, "
          "\"kvrecall_mib_s\": %.1f, \"redis_mib_s\": %.1f, \"ratio\": %.3f, "
          "\"kvrecall_p50_ms\": %.3f, \"kvrecall_p99_ms\": %.3f, \"redis_p50_ms\": %.3f, "
          "\"redis_p99_ms\": %.3f, \"batch\": %d, \"kvrecall_server_cpu_s\": %.3f, "
          "\"kvrecall_client_cpu_s\": %.3f, \"redis_server_cpu_s\": %.3f, "
          "\"redis_client_cpu_s\": %.3f}\n",
          size, clients, op == 0 ? "put" : "get", kv.ops, kv.mib_per_s, rd.mib_per_s,
          kv.mib_per_s / rd.mib_per_s, kv.p50_ms, kv.p99_ms, rd.p50_ms, rd.p99_ms, batch,
          kv.server_cpu_s, kv.client_cpu_s, rd.server_cpu_s, rd.client_cpu_s);
    }
  }
  std::fflush(stdout);
}

// One row pair: spans of `size` from `clients` clients into both systems,
// then deleted from both.
absl::Status RunCell(const BenchConfig& cfg, const Servers& servers,
                     const v1::ModelGeometry& model, int64_t size, int clients,
                     const std::string& payload, std::mt19937_64* rng, std::ofstream* json) {
  const int64_t ops = CallsPerClient(cfg, size, clients);
  // Keys: distinct first spans (parent = the model's root).
  std::vector<std::vector<Hash128>> keys(clients);
  const Hash128 root = SpanRootHash(model.model_id());
  for (int k = 0; k < clients; ++k) {
    for (int64_t i = 0; i < ops * cfg.batch; ++i) {
      std::vector<uint32_t> t(model.block_tokens());
      for (auto& x : t) x = static_cast<uint32_t>((*rng)());
      keys[k].push_back(SpanHash(root, t));
    }
  }
  std::array<PhaseResult, 2> results[2];  // [system][put, get]
  for (int system = 0; system < 2; ++system) {
    KVR_ASSIGN_OR_RETURN(results[system],
                         RunSystem(system, servers, model, size, cfg.batch, ops, keys, payload));
  }
  // Free the cell's data in both systems.
  client::ClientOptions o;
  o.target = servers.kv_target;
  auto admin = client::KvStoreClient::Create(o);
  if (admin.ok()) {
    for (int k = 0; k < clients; ++k) (*admin)->DeleteSpans(keys[k]).IgnoreError();  // cleanup only
  }
  RedisConnection::Command(servers.redis_port, {"FLUSHALL"}).IgnoreError();  // cleanup only
  PrintCell(size, clients, cfg.batch, results, json);
  return absl::OkStatus();
}

// Starts both servers in a temporary directory and runs every cell.
absl::Status Run(const BenchConfig& cfg) {
  char tmpl[] = "/tmp/kvrecall-store-bench-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  int64_t largest_cell = 0;
  for (int64_t size : cfg.sizes) {
    for (int c : cfg.clients) {
      largest_cell = std::max(largest_cell, CallsPerClient(cfg, size, c) * cfg.batch * c * size);
    }
  }
  // kvrecalld: memory tier large enough for a cell (spans are deleted after each).
  ChildProcess kv_proc, redis_proc;
  Servers servers;
  KVR_ASSIGN_OR_RETURN(const int kv_port,
                       StartKvrecalld(dir, largest_cell + (int64_t{256} << 20), &kv_proc));
  servers.kv_target = absl::StrCat("127.0.0.1:", kv_port);
  servers.kv_pid = kv_proc.pid();
  KVR_ASSIGN_OR_RETURN(servers.redis_port, StartRedis(dir, &redis_proc));
  servers.redis_pid = redis_proc.pid();
  PrintPreamble(cfg, RedisConnection::Info(servers.redis_port, "redis_version").value_or("?"));

  std::ofstream json;
  if (!absl::GetFlag(FLAGS_json_out).empty()) json.open(absl::GetFlag(FLAGS_json_out));
  const int cells = static_cast<int>(cfg.sizes.size() * cfg.clients.size());
  int cell = 0;
  std::mt19937_64 rng(42);
  for (int64_t size : cfg.sizes) {
    KVR_ASSIGN_OR_RETURN(const v1::ModelGeometry model, GeometryFor(size));
    {
      client::ClientOptions o;
      o.target = servers.kv_target;
      auto c = client::KvStoreClient::Create(o);
      if (!c.ok() || !(*c)->RegisterModel(model).ok()) {
        return absl::InternalError("cannot register the model with kvrecalld");
      }
    }
    std::string payload(static_cast<size_t>(size), '\0');
    for (size_t i = 0; i + 8 <= payload.size(); i += 8) {
      const uint64_t v = rng();
      std::memcpy(payload.data() + i, &v, 8);
    }
    for (int c : cfg.clients) {
      ++cell;
      std::fprintf(stderr,
                   "[%d/%d] %s x %d clients: %lld put and get calls of %d spans per client and "
                   "system\n",
                   cell, cells, SizeName(size).c_str(), c,
                   static_cast<long long>(CallsPerClient(cfg, size, c)), cfg.batch);
      KVR_RETURN_IF_ERROR(RunCell(cfg, servers, model, size, c, payload, &rng, &json));
    }
  }
  std::printf("\nratio > 1: kvrecall moved more bytes per second than Redis on that row.\n");
  // The peers' exits are not part of the results.
  kv_proc.Stop().IgnoreError();
  redis_proc.Stop().IgnoreError();
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return absl::OkStatus();
}

int Main() {
  absl::StatusOr<BenchConfig> cfg = ConfigFromFlags();
  const absl::Status status = cfg.ok() ? Run(*cfg) : cfg.status();
  if (status.ok()) return 0;
  std::fprintf(stderr, "store_bench: %s\n", std::string(status.message()).c_str());
  return cfg.ok() ? 1 : 2;
}

}  // namespace
}  // namespace kvrecall::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "store_bench: kvrecalld vs redis-server, put/get of 64 KiB, 1 MiB and 8 MiB spans at 1, 4 "
      "and 16 clients over loopback");
  absl::ParseCommandLine(argc, argv);
  // The clients (kvrecall's and hiredis) keep large buffers in the heap, as
  // kvrecalld does (see service/daemon/main.cc); docs/api.md advises engines
  // the same.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
  return kvrecall::bench::Main();
}
