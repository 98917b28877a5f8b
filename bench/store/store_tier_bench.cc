// In-process put/get throughput of each store tier and of the whole
// TieredStore, for 64 KiB and 1 MiB spans, each printed as a ratio against a
// peer measured in the same run on the same bytes:
//
//   memory tier      vs a copying cache (flat_hash_map<hash, std::string>
//                       under one mutex: copy in on put, copy out on get)
//   disk tier        vs raw pwrite / pread of the same payloads into one file
//                       (no header, checksum or index)
//   rocksdb tier     vs the same raw file I/O
//   TieredStore put  (validation + XXH3 + directory + memory tier) and a
//                       durable put (synced RocksDB write) vs raw pwrite (+ fdatasync)
//
// Usage: store_tier_bench [--dir=/tmp/x] [--total_mib=128] [--sizes=65536,1048576]
//                         [--repeats=3]
// Reads run right after the writes, so the disk and RocksDB reads come from
// the page cache; the point is the cost of the store's own work per byte.

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/checksum.h"
#include "common/logging.h"
#include "common/progress.h"
#include "common/span_hash.h"
#include "service/store/disk_tier.h"
#include "service/store/memory_tier.h"
#include "service/store/rocksdb_tier.h"
#include "service/store/tiered_store.h"

ABSL_FLAG(std::string, dir, "", "scratch directory (default: a fresh one under $TMPDIR or /tmp)");
ABSL_FLAG(int64_t, total_mib, 128, "payload MiB written per tier and span size");
ABSL_FLAG(std::string, sizes, "65536,1048576", "span payload sizes in bytes, comma-separated");
ABSL_FLAG(int32_t, repeats, 3, "runs of every measurement; the table shows the best of each");

namespace kvrecall::store {
namespace {

struct Rate {
  double put_mbps = 0, get_mbps = 0;
  double put_ops = 0, get_ops = 0;
};

std::string MachineLine() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, model = "unknown";
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      model = line.substr(line.find(':') + 2);
      break;
    }
  }
  return absl::StrCat(model, ", ", std::thread::hardware_concurrency(), " hardware threads");
}

// A geometry whose full span is `bytes` (bf16, 2 KV heads x 64 dims).
ModelGeometry GeometryFor(int64_t bytes) {
  ModelGeometry m;
  m.model_id = absl::StrCat("bench-", bytes);
  m.num_q_heads = 8;
  m.num_kv_heads = 2;
  m.head_dim = 64;
  m.dtype = DType::kBf16;
  const int64_t per_layer_token = 2 * 2 * 64 * 2;  // K,V x heads x dim x bytes
  m.num_layers = 2;
  m.block_tokens = static_cast<int32_t>(bytes / (per_layer_token * m.num_layers));
  while (m.block_tokens > 256) {
    m.num_layers *= 2;
    m.block_tokens /= 2;
  }
  KVR_CHECK(m.SpanPayloadBytes(m.block_tokens) == bytes) << "size must be a power of two >= 1 KiB";
  return m;
}

// Valid chained spans with incompressible (random) payloads.
std::vector<StoredSpan> MakeSpans(const ModelGeometry& m, int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<StoredSpan> spans(static_cast<size_t>(n));
  Hash128 parent = SpanRootHash(m.model_id);
  for (StoredSpan& s : spans) {
    s.meta.model_id = m.model_id;
    s.meta.parent = parent;
    s.meta.num_tokens = m.block_tokens;
    s.meta.token_ids.resize(static_cast<size_t>(m.block_tokens));
    for (uint32_t& t : s.meta.token_ids) t = static_cast<uint32_t>(rng() % 128000);
    s.key.hash = SpanHash(parent, s.meta.token_ids);
    parent = s.key.hash;
    s.payload.resize(static_cast<size_t>(m.SpanPayloadBytes(m.block_tokens)));
    for (size_t i = 0; i + 8 <= s.payload.size(); i += 8) {
      const uint64_t r = rng();
      std::memcpy(s.payload.data() + i, &r, 8);
    }
    s.meta.payload_bytes = static_cast<int64_t>(s.payload.size());
    s.meta.payload_checksum = Checksum64(s.payload);
  }
  return spans;
}

double Seconds(absl::Time start) { return absl::ToDoubleSeconds(absl::Now() - start); }

// Times put(i) for every span, then get(i) in a shuffled order. Progress on
// stderr: a bar on a terminal, a line per phase otherwise.
Rate Measure(const std::string& name, int n, int64_t bytes, const std::function<void(int)>& put,
             const std::function<void(int)>& get) {
  StageProgress progress(&std::cerr, absl::StrCat("  ", name), StderrProgressMode());
  auto report = [&](const char* phase, int done) {
    Progress p;
    p.stage = phase;
    p.done = done;
    p.total = n;
    p.fraction = (std::string(phase) == "put" ? 0.0 : 0.5) + 0.5 * done / n;
    progress.Update(p);
  };
  Rate r;
  absl::Time start = absl::Now();
  for (int i = 0; i < n; ++i) {
    put(i);
    report("put", i + 1);
  }
  double s = Seconds(start);
  r.put_ops = n / s;
  r.put_mbps = static_cast<double>(n) * bytes / s / 1e6;
  std::vector<int> order(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(7));
  start = absl::Now();
  for (int i = 0; i < n; ++i) {
    get(order[i]);
    report("get", i + 1);
  }
  s = Seconds(start);
  r.get_ops = n / s;
  r.get_mbps = static_cast<double>(n) * bytes / s / 1e6;
  progress.Finish();
  return r;
}

// The copying cache the memory tier is compared with. Thread-safe.
class CopyingCache {
 public:
  void Put(const Hash128& h, const std::string& payload) {
    absl::MutexLock lock(&mu_);
    map_[h] = payload;
  }
  std::string Get(const Hash128& h) {
    absl::MutexLock lock(&mu_);
    return map_.at(h);
  }

 private:
  absl::Mutex mu_;
  absl::flat_hash_map<Hash128, std::string> map_ ABSL_GUARDED_BY(mu_);
};

// Raw file I/O: payloads back to back in one file.
Rate RawFile(const std::string& path, const std::vector<StoredSpan>& spans, bool sync,
             const std::string& name) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  KVR_CHECK(fd >= 0) << "open " << path;
  const int64_t bytes = static_cast<int64_t>(spans[0].payload.size());
  std::string buf(static_cast<size_t>(bytes), '\0');
  Rate r = Measure(
      name, static_cast<int>(spans.size()), bytes,
      [&](int i) {
        KVR_CHECK(::pwrite(fd, spans[i].payload.data(), bytes, i * bytes) == bytes);
        if (sync) KVR_CHECK(::fdatasync(fd) == 0);
      },
      [&](int i) { KVR_CHECK(::pread(fd, buf.data(), bytes, i * bytes) == bytes); });
  ::close(fd);
  std::filesystem::remove(path);
  return r;
}

struct RowData {
  std::string span, tier, peer_name;
  Rate ours, peer;
};

Rate Best(const Rate& a, const Rate& b) {
  return Rate{std::max(a.put_mbps, b.put_mbps), std::max(a.get_mbps, b.get_mbps),
              std::max(a.put_ops, b.put_ops), std::max(a.get_ops, b.get_ops)};
}

// Rows in order of first appearance, each the best over the repeats.
std::vector<RowData>* rows = new std::vector<RowData>;

void Row(const std::string& span, const std::string& tier, const Rate& ours,
         const std::string& peer_name, const Rate& peer) {
  for (RowData& r : *rows) {
    if (r.span == span && r.tier == tier) {
      r.ours = Best(r.ours, ours);
      r.peer = Best(r.peer, peer);
      return;
    }
  }
  rows->push_back(RowData{span, tier, peer_name, ours, peer});
}

void PrintRows() {
  for (const RowData& r : *rows) {
    std::printf("| %s | %s | %.0f | %.0f | %.0f | %.0f | %s | %.0f / %.0f | %.2fx | %.2fx |\n",
                r.span.c_str(), r.tier.c_str(), r.ours.put_mbps, r.ours.get_mbps, r.ours.put_ops,
                r.ours.get_ops, r.peer_name.c_str(), r.peer.put_mbps, r.peer.get_mbps,
                r.ours.put_mbps / r.peer.put_mbps, r.ours.get_mbps / r.peer.get_mbps);
  }
  std::fflush(stdout);
}

// The spans of one size, and what every tier's bench needs of them.
struct SpanSet {
  ModelGeometry model;
  int64_t bytes = 0;
  int n = 0;
  std::string label;  // "64 KiB", "1 MiB"
  std::vector<StoredSpan> spans;
  std::vector<StoredSpanPtr> ptrs;
  int64_t capacity = 0;  // of every tier: room for all spans twice
};

// Memory tier vs a copying cache.
void BenchMemory(const SpanSet& set) {
  CopyingCache cache;
  std::string sink;
  Rate peer = Measure(
      "copying cache", set.n, set.bytes,
      [&](int i) { cache.Put(set.spans[i].key.hash, set.spans[i].payload); },
      [&](int i) { sink = cache.Get(set.spans[i].key.hash); });
  MemoryTierOptions o;
  o.capacity_bytes = set.capacity;
  auto tier = MemoryTier::Create(o).value();
  std::vector<SpanKey> victims;
  StoredSpanPtr got;
  Rate ours = Measure(
      "memory tier", set.n, set.bytes,
      [&](int i) { KVR_CHECK(tier->Put(set.ptrs[i], TierPutOptions{}, &victims).ok()); },
      [&](int i) { got = tier->Get(set.ptrs[i]->key).value(); });
  Row(set.label, "memory", ours, "copying cache", peer);
}

// Disk tier vs raw file I/O (`raw`).
void BenchDisk(const SpanSet& set, const std::string& dir, const Rate& raw) {
  DiskTierOptions o;
  o.dir = dir + "/segments-" + std::to_string(set.bytes);
  o.capacity_bytes = set.capacity;
  auto tier = DiskTier::Create(o).value();
  std::vector<SpanKey> victims;
  Rate ours = Measure(
      "disk tier", set.n, set.bytes,
      [&](int i) { KVR_CHECK(tier->Put(set.ptrs[i], TierPutOptions{}, &victims).ok()); },
      [&](int i) { KVR_CHECK(tier->Get(set.ptrs[i]->key).ok()); });
  Row(set.label, "disk", ours, "raw pwrite/pread", raw);
  tier.reset();
  std::filesystem::remove_all(o.dir);
}

// RocksDB tier (uncompressed and lz4) vs raw file I/O (`raw`).
void BenchRocksDb(const SpanSet& set, const std::string& dir, const Rate& raw) {
  for (const char* compression : {"none", "lz4"}) {
    RocksDbTierOptions o;
    o.dir = absl::StrCat(dir, "/rocksdb-", set.bytes, "-", compression);
    o.capacity_bytes = set.capacity;
    o.compression = compression;
    auto tier = RocksDbTier::Create(o).value();
    std::vector<SpanKey> victims;
    Rate ours = Measure(
        absl::StrCat("rocksdb tier ", compression), set.n, set.bytes,
        [&](int i) { KVR_CHECK(tier->Put(set.ptrs[i], TierPutOptions{}, &victims).ok()); },
        [&](int i) { KVR_CHECK(tier->Get(set.ptrs[i]->key).ok()); });
    Row(set.label, absl::StrCat("rocksdb (", compression, ")"), ours, "raw pwrite/pread", raw);
    tier.reset();
    std::filesystem::remove_all(o.dir);
  }
}

// The whole store: Put (validation, XXH3, directory, memory) and a Get hit,
// then durable puts (at most 64) against raw pwrite + fdatasync.
void BenchStore(const SpanSet& set, const std::string& dir, const Rate& raw) {
  for (bool durable : {false, true}) {
    TieredStoreOptions o;
    o.data_dir = absl::StrCat(dir, "/store-", set.bytes, durable ? "-durable" : "");
    o.memory_capacity_bytes = set.capacity;
    o.disk_capacity_bytes = set.capacity;
    o.rocksdb_capacity_bytes = set.capacity;
    o.rocksdb_compression = "none";
    auto store = TieredStore::Open(o).value();
    KVR_CHECK(store->RegisterModel(set.model).ok());
    // Put moves the span in; give it copies made before the clock starts.
    const int m = durable ? std::min(set.n, 64) : set.n;
    std::vector<StoredSpan> copies(set.spans.begin(), set.spans.begin() + m);
    for (StoredSpan& c : copies) c.meta.durable = durable;
    const Rate peer =
        durable ? RawFile(dir + "/raw-sync.bin",
                          std::vector<StoredSpan>(set.spans.begin(), set.spans.begin() + m), true,
                          "raw pwrite+fdatasync")
                : raw;
    Rate ours = Measure(
        durable ? "store durable" : "store", m, set.bytes,
        [&](int i) { KVR_CHECK(store->Put(std::move(copies[i]), PutOptions{}).ok()); },
        [&](int i) {
          KVR_CHECK(store->Get(set.spans[i].key, set.model.model_id).span != nullptr);
        });
    Row(set.label, durable ? "TieredStore durable put, memory get" : "TieredStore put, memory get",
        ours, durable ? "raw pwrite+fdatasync / pread" : "raw pwrite/pread", peer);
    store.reset();
    std::filesystem::remove_all(o.data_dir);
  }
}

// --dir, or a fresh temporary directory.
std::string ScratchDir() {
  std::string dir = absl::GetFlag(FLAGS_dir);
  if (!dir.empty()) return dir;
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = std::string(tmp != nullptr ? tmp : "/tmp") + "/store-tier-bench-XXXXXX";
  KVR_CHECK(::mkdtemp(templ.data()) != nullptr);
  return templ;
}

int Run(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string dir = ScratchDir();
  std::vector<int64_t> sizes;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_sizes), ',')) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(s, &v) || v < 1) {
      std::fprintf(stderr, "store_tier_bench: --sizes: '%s' is not a size in bytes\n",
                   std::string(s).c_str());
      return 2;
    }
    sizes.push_back(v);
  }
  const int64_t total = absl::GetFlag(FLAGS_total_mib) << 20;
  const int repeats = std::max(1, absl::GetFlag(FLAGS_repeats));
  double load[3] = {0, 0, 0};
  ::getloadavg(load, 3);

  std::printf(
      "store_tier_bench: %s; load average %.2f at start; scratch %s; %lld MiB per tier "
      "and size; single thread; best of %d runs; reads follow writes (page cache warm)\n\n",
      MachineLine().c_str(), load[0], dir.c_str(), static_cast<long long>(total >> 20), repeats);

  for (int run = 0; run < repeats; ++run) {
    for (int64_t bytes : sizes) {
      std::fprintf(stderr, "run %d of %d\n", run + 1, repeats);
      SpanSet set;
      set.model = GeometryFor(bytes);
      set.bytes = bytes;
      set.n = static_cast<int>(std::max<int64_t>(8, total / bytes));
      set.label = bytes >= (1 << 20) ? absl::StrCat(bytes >> 20, " MiB")
                                     : absl::StrCat(bytes >> 10, " KiB");
      set.capacity = 2 * total + (int64_t{64} << 20);
      std::fprintf(stderr, "%s spans: generating %d\n", set.label.c_str(), set.n);
      set.spans = MakeSpans(set.model, set.n, static_cast<uint64_t>(bytes));
      for (const StoredSpan& s : set.spans) set.ptrs.push_back(std::make_shared<const StoredSpan>(s));

      BenchMemory(set);
      const Rate raw = RawFile(dir + "/raw.bin", set.spans, false, "raw file");
      BenchDisk(set, dir, raw);
      BenchRocksDb(set, dir, raw);
      BenchStore(set, dir, raw);
    }
  }
  std::printf(
      "| span | tier | put MB/s | get MB/s | put ops/s | get ops/s | peer | "
      "peer put / get MB/s | put ratio | get ratio |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  PrintRows();
  std::filesystem::remove_all(dir);
  return 0;
}

}  // namespace
}  // namespace kvrecall::store

int main(int argc, char** argv) { return kvrecall::store::Run(argc, argv); }
