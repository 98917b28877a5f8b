#include "service/store/tiered_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <filesystem>
#include <optional>
#include <thread>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/memory/memory.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/checksum.h"
#include "common/logging.h"
#include "common/span_hash.h"
#include "common/status_macros.h"
#include "service/store/codec.h"
#include "service/store/compression.h"
#include "service/store/disk_tier.h"
#include "service/store/memory_tier.h"
#include "service/store/rocksdb_tier.h"
#include "service/store/tier.h"

namespace kvrecall::store {

namespace {

constexpr int kDirShards = 64;
constexpr int kStripes = 256;
constexpr size_t kMaxTenantBytes = 256;
constexpr size_t kMaxSpaceBytes = 64;
constexpr int kNumMissReasons = 9;

// What the store knows about every span it holds, in whichever tier.
struct DirEntry {
  std::string model_id;
  Hash128 parent;
  int32_t num_tokens = 0;
  int64_t payload_bytes = 0;
  uint64_t checksum = 0;
  bool durable = false;  // written through (synced) to a persistent tier
};

DirEntry ToDirEntry(const SpanMeta& m) {
  return DirEntry{m.model_id,      m.parent,           m.num_tokens,
                  m.payload_bytes, m.payload_checksum, m.durable};
}

// One (tenant, entry) list per hash, so that a miss can tell whether the hash
// exists under another tenant. Thread-safe.
struct DirShard {
  mutable absl::Mutex mu;
  absl::flat_hash_map<Hash128, absl::InlinedVector<std::pair<std::string, DirEntry>, 1>> map
      ABSL_GUARDED_BY(mu);
};

// The TieredStore: a directory of every stored span (which model, parent,
// checksum, durability) over the three tiers, 256 key stripes that serialize
// changes to one key (put, delete, demotion, promotion), and the miss
// accounting. Readers take no stripe. Thread-safe.
class TieredStoreImpl final : public TieredStore {
 public:
  explicit TieredStoreImpl(const TieredStoreOptions& options);
  ~TieredStoreImpl() override;

  // Opens the store: ValidateOptions, LockDataDir, OpenTiers, the models
  // from the catalog, RebuildDirectory. Called once, by TieredStore::Open.
  absl::Status Init();

  absl::Status RegisterModel(const ModelGeometry& geometry) override;
  absl::StatusOr<ModelGeometry> GetModel(absl::string_view model_id) const override;
  std::vector<ModelGeometry> ListModels() const override;

  absl::StatusOr<PutOutcome> Put(StoredSpan span, const PutOptions& options) override;
  GetResult Get(const SpanKey& key, absl::string_view model_id) override;
  LookupResult Lookup(absl::string_view tenant, absl::string_view model_id,
                      absl::Span<const Hash128> chain) override;
  absl::Status Delete(const SpanKey& key) override;
  absl::Status Drop(const SpanKey& key) override;
  std::vector<SpanListing> ListSpans() const override;
  absl::Status Pin(const SpanKey& key, absl::Duration ttl) override;
  absl::Status Unpin(const SpanKey& key) override;
  StoreStats Stats() const override;

  absl::Status CatalogPut(absl::string_view space, absl::string_view key,
                          absl::string_view value) override;
  absl::StatusOr<std::string> CatalogGet(absl::string_view space,
                                         absl::string_view key) const override;
  absl::Status CatalogDelete(absl::string_view space, absl::string_view key) override;
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> CatalogScan(
      absl::string_view space, absl::string_view prefix) const override;

  absl::Status Sync() override;

  void StartCollector() { collector_ = std::thread([this] { CollectorLoop(); }); }

 private:
  using VictimList = std::pair<TierId, std::vector<SpanKey>>;

  // The steps of Init. INVALID_ARGUMENT naming the option that is out of range.
  static absl::Status ValidateOptions(const TieredStoreOptions& o);
  // Creates data_dir and takes its LOCK file (FAILED_PRECONDITION when another
  // store holds it).
  absl::Status LockDataDir();
  // RocksDB always; disk and memory when they have a capacity.
  absl::Status OpenTiers();
  // The directory of every span from RocksDB and the disk segments; spans that
  // disk recovery found corrupt become checksum-failure tombstones.
  absl::Status RebuildDirectory();

  absl::Time Now() const { return options_.clock ? options_.clock() : absl::Now(); }
  absl::Mutex& StripeFor(const SpanKey& key) const {
    return stripes_[(key.hash.low ^ (key.hash.high >> 7)) % kStripes];
  }
  DirShard& DirFor(const Hash128& h) const { return dir_[h.high % kDirShards]; }

  std::optional<DirEntry> DirLookup(const SpanKey& key) const;
  bool DirOtherTenant(const SpanKey& key) const;
  void DirInsert(const SpanKey& key, DirEntry entry);
  void DirErase(const SpanKey& key);
  void DirSetDurable(const SpanKey& key);

  // The reason for a key absent from the directory.
  MissReason AbsentReason(const SpanKey& key) const;
  // The reason `key` is not readable for `model_id` ("" matches any).
  MissReason MissReasonFor(const SpanKey& key, absl::string_view model_id) const;
  void CountMiss(MissReason reason) const;

  Tier* TierById(TierId id) const;
  // Span-holding tiers, fastest first (disabled ones and a catalog-only
  // RocksDB left out).
  std::vector<Tier*> SpanTiers() const;
  bool AnyTierContains(const SpanKey& key) const;

  // Delete and Drop: removes the span from every tier, recording why when
  // `tombstone` is not kNone.
  absl::Status Remove(const SpanKey& key, MissReason tombstone);

  absl::Status ValidateSpan(const ModelGeometry& model, const StoredSpan& span,
                            const PutOptions& options) const;
  // Writes a span through to a persistent tier, synced. REQUIRES: the key's stripe.
  absl::StatusOr<TierId> WriteDurable(const StoredSpanPtr& span, std::vector<VictimList>* victims);
  // Copies victims down the tiers (or drops them) and finishes their eviction.
  void HandleVictims(std::vector<VictimList> lists);
  // Puts a span read from a lower tier into memory. RESOURCE_EXHAUSTED when
  // memory cannot take it.
  absl::Status Promote(const StoredSpanPtr& span);
  // Reads from the tiers below memory (for Pin), promoting.
  absl::StatusOr<StoredSpanPtr> ReadBelowMemory(const SpanKey& key);
  void WriteMemoryOnlyTombstones();
  // Every tombstone_collect_interval, drops tombstones older than
  // tombstone_max_age, until the store closes.
  void CollectorLoop() ABSL_LOCKS_EXCLUDED(collector_mu_);

  absl::Mutex collector_mu_;
  bool stop_collector_ ABSL_GUARDED_BY(collector_mu_) = false;
  std::thread collector_;

  const TieredStoreOptions options_;
  int lock_fd_ = -1;

  std::unique_ptr<MemoryTier> memory_;    // null when disabled
  std::unique_ptr<DiskTier> disk_;        // null when disabled
  std::unique_ptr<RocksDbTier> rocksdb_;  // always (the catalog)
  bool rocksdb_holds_spans_ = false;

  mutable absl::Mutex models_mu_;
  absl::flat_hash_map<std::string, ModelGeometry> models_ ABSL_GUARDED_BY(models_mu_);

  std::unique_ptr<DirShard[]> dir_;
  std::unique_ptr<absl::Mutex[]> stripes_;
  // Payload bytes each tenant holds in the directory (every tier together),
  // for tenant_stored_bytes; kept by DirInsert and DirErase. Lock order:
  // after a DirShard's mu.
  absl::Mutex tenant_bytes_mu_;
  absl::flat_hash_map<std::string, int64_t> tenant_bytes_ ABSL_GUARDED_BY(tenant_bytes_mu_);
  void AddTenantBytes(const std::string& tenant, int64_t delta) ABSL_LOCKS_EXCLUDED(tenant_bytes_mu_);
  int64_t TenantBytes(const std::string& tenant) ABSL_LOCKS_EXCLUDED(tenant_bytes_mu_);
  // Bumped whenever a span leaves a tier; a reader that found a span in no
  // tier while this moved retries.
  std::atomic<uint64_t> moves_{0};

  // Metrics (owned copies when options.metrics is null).
  std::array<Counter, kNumMissReasons> own_misses_;
  std::array<Counter*, kNumMissReasons> misses_{};
  LatencyHistogram own_put_latency_, own_get_latency_;
  LatencyHistogram* put_latency_;
  LatencyHistogram* get_latency_;
  Gauge own_models_, own_pinned_;
  Gauge* models_gauge_;
  Gauge* pinned_gauge_;
};

TieredStoreImpl::TieredStoreImpl(const TieredStoreOptions& options)
    : options_(options), dir_(new DirShard[kDirShards]), stripes_(new absl::Mutex[kStripes]) {
  MetricsRegistry* r = options.metrics;
  for (int i = 0; i < kNumMissReasons; ++i) {
    misses_[i] =
        r == nullptr
            ? &own_misses_[i]
            : r->GetCounter(
                  "kvrecall_store_misses_total",
                  absl::StrCat("reason=\"", MissReasonName(static_cast<MissReason>(i)), "\""));
  }
  put_latency_ = r == nullptr ? &own_put_latency_ : r->GetHistogram("kvrecall_store_put_latency");
  get_latency_ = r == nullptr ? &own_get_latency_ : r->GetHistogram("kvrecall_store_get_latency");
  models_gauge_ = r == nullptr ? &own_models_ : r->GetGauge("kvrecall_store_models");
  pinned_gauge_ = r == nullptr ? &own_pinned_ : r->GetGauge("kvrecall_store_pinned_spans");
}

TieredStoreImpl::~TieredStoreImpl() {
  {
    absl::MutexLock lock(&collector_mu_);
    stop_collector_ = true;
  }
  if (collector_.joinable()) collector_.join();
  if (rocksdb_ != nullptr && memory_ != nullptr) WriteMemoryOnlyTombstones();
  memory_.reset();
  disk_.reset();
  rocksdb_.reset();
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the flock
}

void TieredStoreImpl::WriteMemoryOnlyTombstones() {
  // Spans only in memory are lost on shutdown; record why, so that a miss on
  // them after the restart says "evicted" rather than "never stored".
  std::vector<SpanKey> lost;
  memory_->ForEachSpan([&](const SpanKey& key, const SpanMeta&) { lost.push_back(key); });
  std::vector<SpanKey> memory_only;
  for (const SpanKey& key : lost) {
    if ((disk_ == nullptr || !disk_->Contains(key)) && !rocksdb_->Contains(key)) {
      memory_only.push_back(key);
    }
  }
  absl::Status st = rocksdb_->PutTombstones(memory_only, MissReason::kEvicted, /*sync=*/true);
  if (!st.ok()) KVR_LOG(WARNING) << "recording memory-only spans at shutdown: " << st;
}

absl::Status TieredStoreImpl::Init() {
  KVR_RETURN_IF_ERROR(ValidateOptions(options_));
  KVR_RETURN_IF_ERROR(LockDataDir());
  KVR_RETURN_IF_ERROR(OpenTiers());
  KVR_ASSIGN_OR_RETURN(std::vector<ModelGeometry> models, rocksdb_->LoadModels());
  {
    absl::MutexLock lock(&models_mu_);
    for (ModelGeometry& m : models) models_[m.model_id] = std::move(m);
    models_gauge_->Set(static_cast<int64_t>(models_.size()));
  }
  KVR_RETURN_IF_ERROR(RebuildDirectory());
  if (memory_ == nullptr && disk_ == nullptr && !rocksdb_holds_spans_) {
    KVR_LOG(WARNING) << "store " << options_.data_dir
                     << " has no tier for spans (all capacities 0)";
  }
  return absl::OkStatus();
}

absl::Status TieredStoreImpl::ValidateOptions(const TieredStoreOptions& o) {
  if (o.data_dir.empty()) return absl::InvalidArgumentError("data_dir is required");
  if (o.memory_capacity_bytes < 0 || o.disk_capacity_bytes < 0 || o.rocksdb_capacity_bytes < 0) {
    return absl::InvalidArgumentError("capacities must be >= 0");
  }
  if (o.memory_shards < 1 || o.memory_shards > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory_shards must be in 1..256, got ", o.memory_shards));
  }
  if (o.disk_segment_bytes < (64 << 10)) {
    return absl::InvalidArgumentError(
        absl::StrCat("disk_segment_bytes must be >= 65536, got ", o.disk_segment_bytes));
  }
  if (!(o.disk_compaction_live_fraction >= 0.0 && o.disk_compaction_live_fraction <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "disk_compaction_live_fraction must be in 0..1, got ", o.disk_compaction_live_fraction));
  }
  return ParseCompression(o.rocksdb_compression).status();
}

absl::Status TieredStoreImpl::LockDataDir() {
  const TieredStoreOptions& o = options_;
  std::error_code ec;
  std::filesystem::create_directories(o.data_dir, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create data_dir ", o.data_dir, ": ", ec.message()));
  }
  const std::string lock_path = (std::filesystem::path(o.data_dir) / "LOCK").string();
  lock_fd_ = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock_fd_ < 0) {
    return absl::InternalError(absl::StrCat("open ", lock_path, ": ", std::strerror(errno)));
  }
  if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(o.data_dir, " is in use by another store (", lock_path, " is locked)"));
  }
  return absl::OkStatus();
}

absl::Status TieredStoreImpl::OpenTiers() {
  const TieredStoreOptions& o = options_;
  RocksDbTierOptions rocks;
  rocks.dir = (std::filesystem::path(o.data_dir) / "rocksdb").string();
  rocks.capacity_bytes = o.rocksdb_capacity_bytes;
  rocks.compression = o.rocksdb_compression;
  rocks.metrics = o.metrics;
  KVR_ASSIGN_OR_RETURN(rocksdb_, RocksDbTier::Create(rocks));
  // Spans written while the tier had a capacity stay readable after it is set
  // to 0 (its Put refuses new ones).
  rocksdb_holds_spans_ = o.rocksdb_capacity_bytes > 0 || rocksdb_->Stats().spans > 0;

  if (o.disk_capacity_bytes > 0) {
    DiskTierOptions disk;
    disk.dir = (std::filesystem::path(o.data_dir) / "segments").string();
    disk.capacity_bytes = o.disk_capacity_bytes;
    disk.segment_bytes = o.disk_segment_bytes;
    disk.compaction_live_fraction = o.disk_compaction_live_fraction;
    disk.background_compaction = o.disk_background_compaction;
    disk.metrics = o.metrics;
    KVR_ASSIGN_OR_RETURN(disk_, DiskTier::Create(disk));
  }
  if (o.memory_capacity_bytes > 0) {
    MemoryTierOptions memory;
    memory.capacity_bytes = o.memory_capacity_bytes;
    memory.shards = o.memory_shards;
    memory.clock = o.clock;
    memory.tenant_capacity_bytes = o.tenant_memory_bytes;
    memory.tenant_pinned_bytes = o.tenant_pinned_bytes;
    memory.metrics = o.metrics;
    KVR_ASSIGN_OR_RETURN(memory_, MemoryTier::Create(memory));
  }
  return absl::OkStatus();
}

absl::Status TieredStoreImpl::RebuildDirectory() {
  // RocksDB first, then the disk tier. A key held by both with different
  // payloads (possible only after a crash between a delete and a re-put)
  // keeps the RocksDB copy.
  rocksdb_->ForEachSpan(
      [&](const SpanKey& key, const SpanMeta& meta) { DirInsert(key, ToDirEntry(meta)); });
  if (disk_ == nullptr) return absl::OkStatus();
  std::vector<SpanKey> conflicting;
  disk_->ForEachSpan([&](const SpanKey& key, const SpanMeta& meta) {
    std::optional<DirEntry> e = DirLookup(key);
    if (!e.has_value()) {
      DirInsert(key, ToDirEntry(meta));
    } else if (e->checksum != meta.payload_checksum) {
      conflicting.push_back(key);
    } else if (meta.durable && !e->durable) {
      DirSetDurable(key);
    }
  });
  for (const SpanKey& key : conflicting) {
    KVR_LOG(WARNING) << "span " << key.hash.ToHex()
                     << " differs between disk and rocksdb; keeping the rocksdb copy";
    disk_->Delete(key).IgnoreError();  // the directory no longer refers to it either way
  }
  // Spans whose record recovery found corrupt (and no valid copy elsewhere):
  // their misses must say checksum failure, not never stored.
  std::vector<SpanKey> corrupt;
  for (const SpanKey& key : disk_->RecoveredCorruptKeys()) {
    if (!DirLookup(key).has_value()) corrupt.push_back(key);
  }
  if (corrupt.empty()) return absl::OkStatus();
  return rocksdb_->PutTombstones(corrupt, MissReason::kChecksumFailure, /*sync=*/true);
}

// ---------------------------------------------------------------------------
// Directory

std::optional<DirEntry> TieredStoreImpl::DirLookup(const SpanKey& key) const {
  DirShard& shard = DirFor(key.hash);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.map.find(key.hash);
  if (it == shard.map.end()) return std::nullopt;
  for (const auto& [tenant, entry] : it->second) {
    if (tenant == key.tenant) return entry;
  }
  return std::nullopt;
}

bool TieredStoreImpl::DirOtherTenant(const SpanKey& key) const {
  DirShard& shard = DirFor(key.hash);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.map.find(key.hash);
  if (it == shard.map.end()) return false;
  if (!options_.shares_namespace) return false;
  for (const auto& [tenant, entry] : it->second) {
    if (tenant != key.tenant && options_.shares_namespace(key.tenant, tenant)) return true;
  }
  return false;
}

void TieredStoreImpl::AddTenantBytes(const std::string& tenant, int64_t delta) {
  if (delta == 0) return;
  absl::MutexLock lock(&tenant_bytes_mu_);
  auto it = tenant_bytes_.try_emplace(tenant, 0).first;
  it->second += delta;
  if (it->second <= 0) tenant_bytes_.erase(it);
}

int64_t TieredStoreImpl::TenantBytes(const std::string& tenant) {
  absl::MutexLock lock(&tenant_bytes_mu_);
  auto it = tenant_bytes_.find(tenant);
  return it == tenant_bytes_.end() ? 0 : it->second;
}

void TieredStoreImpl::DirInsert(const SpanKey& key, DirEntry entry) {
  DirShard& shard = DirFor(key.hash);
  absl::MutexLock lock(&shard.mu);
  auto& list = shard.map[key.hash];
  for (auto& [tenant, e] : list) {
    if (tenant == key.tenant) {
      AddTenantBytes(key.tenant, entry.payload_bytes - e.payload_bytes);
      e = std::move(entry);
      return;
    }
  }
  AddTenantBytes(key.tenant, entry.payload_bytes);
  list.emplace_back(key.tenant, std::move(entry));
}

void TieredStoreImpl::DirErase(const SpanKey& key) {
  DirShard& shard = DirFor(key.hash);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.map.find(key.hash);
  if (it == shard.map.end()) return;
  auto& list = it->second;
  for (auto e = list.begin(); e != list.end(); ++e) {
    if (e->first == key.tenant) {
      AddTenantBytes(key.tenant, -e->second.payload_bytes);
      list.erase(e);
      break;
    }
  }
  if (list.empty()) shard.map.erase(it);
}

void TieredStoreImpl::DirSetDurable(const SpanKey& key) {
  DirShard& shard = DirFor(key.hash);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.map.find(key.hash);
  if (it == shard.map.end()) return;
  for (auto& [tenant, e] : it->second) {
    if (tenant == key.tenant) e.durable = true;
  }
}

MissReason TieredStoreImpl::AbsentReason(const SpanKey& key) const {
  const MissReason tomb = rocksdb_->GetTombstone(key);
  if (tomb != MissReason::kNone) return tomb;
  if (DirOtherTenant(key)) return MissReason::kOtherNamespace;
  return MissReason::kNeverStored;
}

MissReason TieredStoreImpl::MissReasonFor(const SpanKey& key, absl::string_view model_id) const {
  std::optional<DirEntry> e = DirLookup(key);
  if (!e.has_value()) return AbsentReason(key);
  if (!model_id.empty() && e->model_id != model_id) return MissReason::kModelMismatch;
  return MissReason::kNone;
}

void TieredStoreImpl::CountMiss(MissReason reason) const {
  misses_[static_cast<int>(reason) % kNumMissReasons]->Increment();
}

// ---------------------------------------------------------------------------
// Tiers

Tier* TieredStoreImpl::TierById(TierId id) const {
  switch (id) {
    case TierId::kMemory:
      return memory_.get();
    case TierId::kDisk:
      return disk_.get();
    case TierId::kRocksDb:
      return rocksdb_.get();
  }
  return nullptr;
}

std::vector<Tier*> TieredStoreImpl::SpanTiers() const {
  std::vector<Tier*> tiers;
  if (memory_ != nullptr) tiers.push_back(memory_.get());
  if (disk_ != nullptr) tiers.push_back(disk_.get());
  if (rocksdb_holds_spans_) tiers.push_back(rocksdb_.get());
  return tiers;
}

bool TieredStoreImpl::AnyTierContains(const SpanKey& key) const {
  for (Tier* t : SpanTiers()) {
    if (t->Contains(key)) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------
// Models

absl::Status TieredStoreImpl::RegisterModel(const ModelGeometry& geometry) {
  KVR_RETURN_IF_ERROR(ValidateModel(geometry));
  absl::MutexLock lock(&models_mu_);
  auto it = models_.find(geometry.model_id);
  if (it != models_.end()) {
    if (SameGeometry(it->second, geometry)) return absl::OkStatus();
    return absl::AlreadyExistsError(
        absl::StrCat("model '", geometry.model_id, "' is registered with a different geometry"));
  }
  KVR_RETURN_IF_ERROR(rocksdb_->PutModel(geometry));
  models_[geometry.model_id] = geometry;
  models_gauge_->Set(static_cast<int64_t>(models_.size()));
  return absl::OkStatus();
}

absl::StatusOr<ModelGeometry> TieredStoreImpl::GetModel(absl::string_view model_id) const {
  absl::ReaderMutexLock lock(&models_mu_);
  auto it = models_.find(model_id);
  if (it == models_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown model id '", model_id, "'"));
  }
  return it->second;
}

std::vector<ModelGeometry> TieredStoreImpl::ListModels() const {
  absl::ReaderMutexLock lock(&models_mu_);
  std::vector<ModelGeometry> out;
  out.reserve(models_.size());
  for (const auto& [id, m] : models_) out.push_back(m);
  std::sort(out.begin(), out.end(),
            [](const ModelGeometry& a, const ModelGeometry& b) { return a.model_id < b.model_id; });
  return out;
}

// ---------------------------------------------------------------------------
// Put

absl::Status TieredStoreImpl::ValidateSpan(const ModelGeometry& model, const StoredSpan& span,
                                           const PutOptions& options) const {
  const SpanMeta& m = span.meta;
  if (span.key.tenant.size() > kMaxTenantBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("tenant is ", span.key.tenant.size(), " bytes; at most ", kMaxTenantBytes));
  }
  if (m.num_tokens < 1 || m.num_tokens > model.block_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens ", m.num_tokens, " is not in 1..",
                                                   model.block_tokens, " (block_tokens of model '",
                                                   model.model_id, "')"));
  }
  const int64_t expected = model.SpanPayloadBytes(m.num_tokens);
  if (static_cast<int64_t>(span.payload.size()) != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("payload is ", span.payload.size(), " bytes; model '", model.model_id,
                     "' needs ", expected, " for ", m.num_tokens, " tokens (", model.num_layers,
                     " layers x K,V x ", model.num_kv_heads, " kv heads x ", m.num_tokens,
                     " tokens x ", model.head_dim, " x ", DTypeName(model.dtype), ")"));
  }
  if (m.payload_bytes != 0 && m.payload_bytes != expected) {
    return absl::InvalidArgumentError(absl::StrCat("meta.payload_bytes ", m.payload_bytes,
                                                   " != payload size ", span.payload.size()));
  }
  if (!m.token_ids.empty()) {
    if (static_cast<int64_t>(m.token_ids.size()) != m.num_tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat(m.token_ids.size(), " token ids given for num_tokens ", m.num_tokens));
    }
    const Hash128 h = SpanHash(m.parent, m.token_ids);
    if (h != span.key.hash) {
      return absl::InvalidArgumentError(
          absl::StrCat("span hash ", span.key.hash.ToHex(),
                       " != SpanHash(parent, token_ids) = ", h.ToHex(), " (docs/hashing.md)"));
    }
  }
  const uint64_t checksum = Checksum64(span.payload);
  if (checksum != m.payload_checksum) {
    return absl::DataLossError(absl::StrCat("payload checksum mismatch: XXH3-64 of the ",
                                            span.payload.size(), " payload bytes is ", checksum,
                                            ", meta says ", m.payload_checksum));
  }
  if (!options.parent_checked && m.parent != SpanRootHash(model.model_id, options.salt)) {
    std::optional<DirEntry> parent = DirLookup(SpanKey{span.key.tenant, m.parent});
    if (!parent.has_value()) {
      return absl::FailedPreconditionError(
          absl::StrCat("parent ", m.parent.ToHex(),
                       " is neither a stored span of this tenant nor the root "
                       "hash of model '",
                       model.model_id, "' with the given salt"));
    }
    if (parent->model_id != model.model_id) {
      return absl::FailedPreconditionError(absl::StrCat("parent ", m.parent.ToHex(),
                                                        " belongs to model '", parent->model_id,
                                                        "', not '", model.model_id, "'"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<TierId> TieredStoreImpl::WriteDurable(const StoredSpanPtr& span,
                                                     std::vector<VictimList>* victims) {
  TierPutOptions put;
  put.sync = true;
  absl::Status last = absl::ResourceExhaustedError(
      "durable span: no persistent tier is enabled (rocksdb and disk capacities are 0)");
  for (Tier* t : {static_cast<Tier*>(rocksdb_holds_spans_ ? rocksdb_.get() : nullptr),
                  static_cast<Tier*>(disk_.get())}) {
    if (t == nullptr) continue;
    std::vector<SpanKey> v;
    absl::Status st = t->Put(span, put, &v);
    if (st.ok()) {
      victims->emplace_back(t->id(), std::move(v));
      return t->id();
    }
    last = st;
    if (st.code() != absl::StatusCode::kResourceExhausted) break;
  }
  return last;
}

absl::StatusOr<PutOutcome> TieredStoreImpl::Put(StoredSpan span, const PutOptions& options) {
  const absl::Time start = absl::Now();
  KVR_ASSIGN_OR_RETURN(ModelGeometry model, GetModel(span.meta.model_id));
  KVR_RETURN_IF_ERROR(ValidateSpan(model, span, options));
  span.meta.payload_bytes = static_cast<int64_t>(span.payload.size());
  if (span.meta.created == absl::InfinitePast()) span.meta.created = Now();
  const SpanKey key = span.key;
  const bool durable = span.meta.durable;

  PutOutcome outcome;
  std::vector<VictimList> victims;
  {
    absl::MutexLock stripe(&StripeFor(key));
    std::optional<DirEntry> existing = DirLookup(key);
    if (existing.has_value()) {
      if (existing->checksum != span.meta.payload_checksum ||
          existing->payload_bytes != span.meta.payload_bytes ||
          existing->model_id != span.meta.model_id) {
        return absl::AlreadyExistsError(absl::StrCat(
            "span ", key.hash.ToHex(), " is stored with a different payload (checksum ",
            existing->checksum, ", model '", existing->model_id, "')"));
      }
      outcome.already_present = true;
      if (!durable || existing->durable) {
        put_latency_->Record(absl::ToDoubleMicroseconds(absl::Now() - start));
        return outcome;
      }
      // The same span, now asked to be durable: write it through.
      auto ptr = std::make_shared<const StoredSpan>(std::move(span));
      KVR_ASSIGN_OR_RETURN(outcome.durable_tier, WriteDurable(ptr, &victims));
      DirSetDurable(key);
      if (memory_ != nullptr && memory_->Contains(key)) {
        std::vector<SpanKey> v;
        if (memory_->Put(ptr, TierPutOptions{}, &v).ok()) victims.emplace_back(TierId::kMemory, v);
      }
    } else {
      if (options_.tenant_stored_bytes > 0) {
        const int64_t held = TenantBytes(key.tenant);
        if (held + span.meta.payload_bytes > options_.tenant_stored_bytes) {
          return absl::ResourceExhaustedError(absl::StrCat(
              "the tenant stores ", held, " payload bytes; span ", key.hash.ToHex(), " (",
              span.meta.payload_bytes, " bytes) would pass its quota (--tenant_stored_bytes=",
              options_.tenant_stored_bytes, "); delete spans (DeleteSpans) to make room"));
        }
      }
      auto ptr = std::make_shared<const StoredSpan>(std::move(span));
      bool stored = false;
      bool rocksdb_written = false;
      if (durable) {
        KVR_ASSIGN_OR_RETURN(outcome.durable_tier, WriteDurable(ptr, &victims));
        stored = true;
        rocksdb_written = outcome.durable_tier == TierId::kRocksDb;
      }
      absl::Status last = absl::ResourceExhaustedError("no tier is enabled for spans");
      for (Tier* t : SpanTiers()) {
        // A durable span already sits in a persistent tier; memory is the
        // only other copy worth making now.
        if (stored && t->id() != TierId::kMemory) break;
        std::vector<SpanKey> v;
        absl::Status st = t->Put(ptr, TierPutOptions{}, &v);
        if (st.ok()) {
          victims.emplace_back(t->id(), std::move(v));
          stored = true;
          rocksdb_written = rocksdb_written || t->id() == TierId::kRocksDb;
          break;
        }
        last = st;
        if (st.code() != absl::StatusCode::kResourceExhausted) return st;
      }
      if (!stored) {
        return absl::ResourceExhaustedError(
            absl::StrCat("no tier can hold span ", key.hash.ToHex(), ": ", last.message()));
      }
      DirInsert(key, ToDirEntry(ptr->meta));
      if (!rocksdb_written) {
        // A tombstone of an earlier life of this key is obsolete now.
        absl::Status cleared = rocksdb_->ClearTombstone(key);
        if (!cleared.ok()) KVR_LOG(WARNING) << cleared;
      }
    }
  }
  HandleVictims(std::move(victims));
  put_latency_->Record(absl::ToDoubleMicroseconds(absl::Now() - start));
  return outcome;
}

void TieredStoreImpl::HandleVictims(std::vector<VictimList> lists) {
  std::deque<std::pair<TierId, SpanKey>> queue;
  for (auto& [tier, keys] : lists) {
    for (SpanKey& k : keys) queue.emplace_back(tier, std::move(k));
  }
  while (!queue.empty()) {
    auto [from_id, key] = std::move(queue.front());
    queue.pop_front();
    Tier* from = TierById(from_id);
    std::vector<VictimList> more;
    {
      absl::MutexLock stripe(&StripeFor(key));
      absl::StatusOr<StoredSpanPtr> span = from->GetVictim(key);
      if (!span.ok()) {
        if (span.status().code() == absl::StatusCode::kDataLoss && !AnyTierContains(key)) {
          // Its only copy failed verification while leaving.
          DirErase(key);
          rocksdb_->PutTombstones({key}, MissReason::kChecksumFailure, false)
              .IgnoreError();  // advisory
          moves_.fetch_add(1);
        }
        continue;  // rescued, replaced or deleted meanwhile
      }
      // The tiers below `from`, fastest first.
      std::vector<Tier*> below;
      bool seen = false;
      for (Tier* t : SpanTiers()) {
        if (seen) below.push_back(t);
        if (t == from) seen = true;
      }
      bool placed = false;
      for (Tier* t : below) {
        if (t->Contains(key)) {
          placed = true;  // inclusive: a lower copy already exists
          break;
        }
      }
      for (size_t i = 0; !placed && i < below.size(); ++i) {
        TierPutOptions put;
        put.origin = TierPutOptions::Origin::kDemotion;
        std::vector<SpanKey> v;
        absl::Status st = below[i]->Put(*span, put, &v);
        if (st.ok()) {
          placed = true;
          more.emplace_back(below[i]->id(), std::move(v));
        } else if (st.code() != absl::StatusCode::kResourceExhausted) {
          KVR_LOG(ERROR) << "demoting span " << key.hash.ToHex() << " to "
                         << TierName(below[i]->id()) << ": " << st;
        }
      }
      if (from->FinishEviction(key)) moves_.fetch_add(1);
      if (!placed && !AnyTierContains(key)) {
        DirErase(key);
        absl::Status st = rocksdb_->PutTombstones({key}, MissReason::kEvicted, false);
        if (!st.ok()) KVR_LOG(WARNING) << st;
      }
    }
    for (auto& [tier, keys] : more) {
      for (SpanKey& k : keys) queue.emplace_back(tier, std::move(k));
    }
  }
}

// ---------------------------------------------------------------------------
// Get / Lookup

absl::Status TieredStoreImpl::Promote(const StoredSpanPtr& span) {
  if (memory_ == nullptr) return absl::ResourceExhaustedError("the memory tier is disabled");
  std::vector<VictimList> victims;
  {
    absl::MutexLock stripe(&StripeFor(span->key));
    std::optional<DirEntry> e = DirLookup(span->key);
    if (!e.has_value() || e->checksum != span->meta.payload_checksum) {
      return absl::NotFoundError("deleted or replaced while being promoted");
    }
    if (memory_->Contains(span->key)) return absl::OkStatus();
    TierPutOptions put;
    put.origin = TierPutOptions::Origin::kPromotion;
    std::vector<SpanKey> v;
    KVR_RETURN_IF_ERROR(memory_->Put(span, put, &v));
    victims.emplace_back(TierId::kMemory, std::move(v));
  }
  HandleVictims(std::move(victims));
  return absl::OkStatus();
}

GetResult TieredStoreImpl::Get(const SpanKey& key, absl::string_view model_id) {
  const absl::Time start = absl::Now();
  GetResult result;
  auto finish = [&](GetResult r) {
    if (r.miss != MissReason::kNone) CountMiss(r.miss);
    get_latency_->Record(absl::ToDoubleMicroseconds(absl::Now() - start));
    return r;
  };
  // Lock-free attempts first; a span that keeps moving between tiers while we
  // look is read once more under its stripe lock, where nothing moves it.
  constexpr int kAttempts = 4;
  absl::Status read_error;  // of the last attempt: a tier holding the span could not read it
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    const bool locked = attempt == kAttempts - 1;
    std::optional<absl::MutexLock> stripe;
    if (locked) stripe.emplace(&StripeFor(key));
    const uint64_t moves = moves_.load();
    std::optional<DirEntry> entry = DirLookup(key);
    if (!entry.has_value()) {
      result.miss = AbsentReason(key);
      return finish(result);
    }
    if (!model_id.empty() && entry->model_id != model_id) {
      result.miss = MissReason::kModelMismatch;
      return finish(result);
    }
    bool checksum_failed = false;
    read_error = absl::OkStatus();
    for (Tier* t : SpanTiers()) {
      absl::StatusOr<StoredSpanPtr> span = t->Get(key);
      if (span.ok()) {
        if (t->id() != TierId::kMemory && !locked) {
          Promote(*span).IgnoreError();  // a read needs no promotion to succeed
        }
        result.span = *std::move(span);
        result.tier = t->id();
        return finish(result);
      }
      if (span.status().code() == absl::StatusCode::kDataLoss) checksum_failed = true;
      if (!absl::IsNotFound(span.status()) && !absl::IsDataLoss(span.status()) && read_error.ok()) {
        read_error = span.status();
      }
    }
    if (checksum_failed) {
      if (!locked) stripe.emplace(&StripeFor(key));
      if (!AnyTierContains(key)) {
        std::optional<DirEntry> still = DirLookup(key);
        if (still.has_value() && still->checksum == entry->checksum) {
          DirErase(key);
          rocksdb_->PutTombstones({key}, MissReason::kChecksumFailure, false)
              .IgnoreError();  // advisory
        }
        result.miss = MissReason::kChecksumFailure;
        return finish(result);
      }
      continue;  // another copy exists
    }
    if (!locked && moves_.load() == moves && DirLookup(key).has_value()) {
      // Nothing moved and it is still listed: only the locked read can tell.
      attempt = kAttempts - 2;
    }
  }
  if (!read_error.ok()) {
    // A tier holds it but could not read it (EIO): kept, and said so.
    result.error = absl::UnavailableError(absl::StrCat(
        "span ", key.hash.ToHex(), " is stored but could not be read (kept; a later read may ",
        "succeed): ", read_error.message()));
    return finish(result);
  }
  // Listed but in no tier even under the stripe lock: a broken invariant.
  // Report it as unreadable rather than serve anything.
  KVR_LOG(ERROR) << "span " << key.hash.ToHex() << " is listed but found in no tier";
  result.miss = MissReason::kEvicted;
  return finish(result);
}

LookupResult TieredStoreImpl::Lookup(absl::string_view tenant, absl::string_view model_id,
                                     absl::Span<const Hash128> chain) {
  LookupResult result;
  SpanKey key;
  key.tenant = std::string(tenant);
  size_t i = 0;
  for (; i < chain.size(); ++i) {
    key.hash = chain[i];
    std::optional<DirEntry> e = DirLookup(key);
    if (!e.has_value() || (!model_id.empty() && e->model_id != model_id)) break;
    ++result.prefix_spans;
    result.prefix_tokens += e->num_tokens;
  }
  for (size_t j = i; j < chain.size(); ++j) {
    key.hash = chain[j];
    MissReason reason = MissReasonFor(key, model_id);
    if (j > i && reason == MissReason::kNone) reason = MissReason::kParentMissing;
    result.missing.push_back(reason);
  }
  if (!result.missing.empty()) CountMiss(result.missing.front());
  return result;
}

// ---------------------------------------------------------------------------
// Delete, pins

absl::Status TieredStoreImpl::Delete(const SpanKey& key) {
  return Remove(key, MissReason::kDeleted);
}

absl::Status TieredStoreImpl::Drop(const SpanKey& key) { return Remove(key, MissReason::kNone); }

std::vector<SpanListing> TieredStoreImpl::ListSpans() const {
  std::vector<SpanListing> out;
  for (int i = 0; i < kDirShards; ++i) {
    DirShard& shard = dir_[i];
    absl::MutexLock lock(&shard.mu);
    for (const auto& [hash, list] : shard.map) {
      for (const auto& [tenant, e] : list) {
        out.push_back(SpanListing{SpanKey{tenant, hash}, e.model_id, e.payload_bytes, e.checksum,
                                  e.durable});
      }
    }
  }
  return out;
}

absl::Status TieredStoreImpl::Remove(const SpanKey& key, MissReason tombstone) {
  absl::MutexLock stripe(&StripeFor(key));
  if (!DirLookup(key).has_value()) {
    return absl::NotFoundError(absl::StrCat("span ", key.hash.ToHex(), " not found (",
                                            MissReasonName(AbsentReason(key)), ")"));
  }
  if (rocksdb_holds_spans_) {
    absl::Status st = rocksdb_->Delete(key);
    if (!st.ok() && st.code() != absl::StatusCode::kNotFound) return st;
  }
  if (disk_ != nullptr) {
    absl::Status st = disk_->Delete(key);
    if (!st.ok() && st.code() != absl::StatusCode::kNotFound) return st;
  }
  if (tombstone != MissReason::kNone) {
    KVR_RETURN_IF_ERROR(rocksdb_->PutTombstones({key}, tombstone, /*sync=*/true));
  }
  DirErase(key);
  if (memory_ != nullptr) {
    absl::Status st = memory_->Delete(key);
    if (!st.ok() && st.code() != absl::StatusCode::kNotFound) return st;
  }
  return absl::OkStatus();
}

absl::StatusOr<StoredSpanPtr> TieredStoreImpl::ReadBelowMemory(const SpanKey& key) {
  absl::Status last = absl::NotFoundError("in no tier below memory");
  for (Tier* t : SpanTiers()) {
    if (t->id() == TierId::kMemory) continue;
    absl::StatusOr<StoredSpanPtr> span = t->Get(key);
    if (span.ok()) return span;
    if (span.status().code() != absl::StatusCode::kNotFound) last = span.status();
  }
  return last;
}

absl::Status TieredStoreImpl::Pin(const SpanKey& key, absl::Duration ttl) {
  if (ttl <= absl::ZeroDuration()) return absl::InvalidArgumentError("pin ttl must be > 0");
  if (memory_ == nullptr) {
    return absl::ResourceExhaustedError(
        "the memory tier is disabled (capacity 0): nothing can be pinned");
  }
  const absl::Time deadline =
      ttl == absl::InfiniteDuration() ? absl::InfiniteFuture() : Now() + ttl;
  absl::Status last;
  for (int attempt = 0; attempt < 4; ++attempt) {
    if (!DirLookup(key).has_value()) {
      return absl::NotFoundError(absl::StrCat("span ", key.hash.ToHex(), " not found (",
                                              MissReasonName(AbsentReason(key)), ")"));
    }
    last = memory_->Pin(key, deadline);
    if (last.code() != absl::StatusCode::kNotFound) break;
    absl::StatusOr<StoredSpanPtr> span = ReadBelowMemory(key);
    if (!span.ok()) {
      if (span.status().code() == absl::StatusCode::kNotFound) continue;  // moved meanwhile
      return span.status();
    }
    absl::Status promoted = Promote(*span);
    if (promoted.code() == absl::StatusCode::kResourceExhausted) return promoted;
  }
  if (last.ok()) pinned_gauge_->Set(memory_->PinnedSpans());
  if (last.code() == absl::StatusCode::kNotFound) {
    return absl::UnavailableError(
        absl::StrCat("span ", key.hash.ToHex(), " kept leaving memory; retry the pin"));
  }
  return last;
}

absl::Status TieredStoreImpl::Unpin(const SpanKey& key) {
  if (!DirLookup(key).has_value()) {
    return absl::NotFoundError(absl::StrCat("span ", key.hash.ToHex(), " not found (",
                                            MissReasonName(AbsentReason(key)), ")"));
  }
  if (memory_ == nullptr) return absl::FailedPreconditionError("span is not pinned");
  absl::Status st = memory_->Unpin(key);
  if (st.code() == absl::StatusCode::kNotFound) {
    return absl::FailedPreconditionError("span is not pinned (not in memory)");
  }
  if (st.ok()) pinned_gauge_->Set(memory_->PinnedSpans());
  return st;
}

StoreStats TieredStoreImpl::Stats() const {
  StoreStats stats;
  for (TierId id : {TierId::kMemory, TierId::kDisk, TierId::kRocksDb}) {
    Tier* t = TierById(id);
    if (t != nullptr) {
      stats.tiers.push_back(t->Stats());
    } else {
      TierStats off;
      off.tier = id;
      stats.tiers.push_back(off);
    }
  }
  for (int i = 1; i < kNumMissReasons; ++i) {
    const int64_t n = misses_[i]->value();
    if (n > 0) stats.misses_by_reason[static_cast<MissReason>(i)] = n;
  }
  {
    absl::MutexLock lock(&models_mu_);
    stats.models = static_cast<int64_t>(models_.size());
  }
  if (memory_ != nullptr) {
    stats.pinned_spans = memory_->PinnedSpans();
    pinned_gauge_->Set(stats.pinned_spans);
  }
  return stats;
}

// ---------------------------------------------------------------------------
// Catalog seam

absl::Status ValidateSpace(absl::string_view space) {
  if (space.empty() || space.size() > kMaxSpaceBytes ||
      space.find('\0') != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("catalog space must be 1..", kMaxSpaceBytes,
                                                   " bytes without NUL, got ", space.size(),
                                                   " bytes"));
  }
  return absl::OkStatus();
}

absl::Status TieredStoreImpl::CatalogPut(absl::string_view space, absl::string_view key,
                                         absl::string_view value) {
  KVR_RETURN_IF_ERROR(ValidateSpace(space));
  return rocksdb_->CatalogPut(space, key, value);
}

absl::StatusOr<std::string> TieredStoreImpl::CatalogGet(absl::string_view space,
                                                        absl::string_view key) const {
  KVR_RETURN_IF_ERROR(ValidateSpace(space));
  return rocksdb_->CatalogGet(space, key);
}

absl::Status TieredStoreImpl::CatalogDelete(absl::string_view space, absl::string_view key) {
  KVR_RETURN_IF_ERROR(ValidateSpace(space));
  return rocksdb_->CatalogDelete(space, key);
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> TieredStoreImpl::CatalogScan(
    absl::string_view space, absl::string_view prefix) const {
  KVR_RETURN_IF_ERROR(ValidateSpace(space));
  return rocksdb_->CatalogScan(space, prefix);
}

absl::Status TieredStoreImpl::Sync() {
  if (disk_ != nullptr) KVR_RETURN_IF_ERROR(disk_->Sync());
  return rocksdb_->Sync();
}

}  // namespace

void TieredStoreImpl::CollectorLoop() {
  while (true) {
    {
      absl::MutexLock lock(&collector_mu_);
      collector_mu_.AwaitWithTimeout(absl::Condition(&stop_collector_),
                                     options_.tombstone_collect_interval);
      if (stop_collector_) return;
    }
    absl::StatusOr<int64_t> n = rocksdb_->CollectTombstones(absl::Now() - options_.tombstone_max_age);
    if (!n.ok()) {
      KVR_LOG(WARNING) << "collecting tombstones: " << n.status();
    } else if (*n > 0) {
      KVR_LOG(INFO) << "collected " << *n << " tombstones older than "
                    << options_.tombstone_max_age;
    }
  }
}

absl::StatusOr<std::unique_ptr<TieredStore>> TieredStore::Open(const TieredStoreOptions& options) {
  auto store = std::make_unique<TieredStoreImpl>(options);
  KVR_RETURN_IF_ERROR(store->Init());
  if (options.tombstone_max_age > absl::ZeroDuration() &&
      options.tombstone_collect_interval > absl::ZeroDuration()) {
    store->StartCollector();
  }
  return std::unique_ptr<TieredStore>(std::move(store));
}

}  // namespace kvrecall::store
