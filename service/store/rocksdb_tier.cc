#include "service/store/rocksdb_tier.h"

#include <rocksdb/db.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/table.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>
#include <rocksdb/write_batch.h>

#include <cstdarg>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <utility>

#include "absl/hash/hash.h"
#include "absl/memory/memory.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/checksum.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "service/store/codec.h"
#include "service/store/rocksdb_status.h"

namespace kvrecall::store {

namespace {

constexpr char kCatalogCf[] = "catalog";
constexpr char kColdCf[] = "cold_spans";

rocksdb::Slice ToSlice(absl::string_view s) { return rocksdb::Slice(s.data(), s.size()); }

// RocksDB's info log, warnings and worse, through kvrecalld's log rather than
// a LOG file in the data directory: on a full disk RocksDB 7.8 (Debian
// bookworm) aborted the daemon on an assertion at the second line it could
// not append to that file (DiskFaultTest.AFullDiskIs...).
class RocksDbLogger : public rocksdb::Logger {
 public:
  RocksDbLogger() : rocksdb::Logger(rocksdb::InfoLogLevel::WARN_LEVEL) {}
  using rocksdb::Logger::Logv;
  void Logv(const char* format, va_list ap) override {
    char line[1024];
    std::vsnprintf(line, sizeof(line), format, ap);
    KVR_LOG(WARNING) << "rocksdb: " << line;
  }
};

// u16 big-endian tenant length | tenant | 16 canonical hash bytes.
std::string SpanKeyBytes(const SpanKey& key) {
  std::string out;
  out.reserve(2 + key.tenant.size() + 16);
  out.push_back(static_cast<char>((key.tenant.size() >> 8) & 0xff));
  out.push_back(static_cast<char>(key.tenant.size() & 0xff));
  out.append(key.tenant);
  out.append(key.hash.ToBytes());
  return out;
}

bool ParseSpanKeyBytes(absl::string_view in, SpanKey* key) {
  if (in.size() < 2) return false;
  const size_t len = (static_cast<unsigned char>(in[0]) << 8) | static_cast<unsigned char>(in[1]);
  if (in.size() != 2 + len + 16) return false;
  key->tenant = std::string(in.substr(2, len));
  auto h = Hash128::FromBytes(in.substr(2 + len));
  if (!h.ok()) return false;
  key->hash = *h;
  return true;
}

std::string TombstoneKey(const SpanKey& key) { return absl::StrCat("T", SpanKeyBytes(key)); }

// The time index of tombstones: 't' | u64 big-endian microseconds | span key
// bytes -> empty. Collection walks it from the oldest.
constexpr char kTombstoneIndexMarker[] = "Vtombstone_time_index";
uint64_t ReadBigEndian64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}
std::string TombstoneTimePrefix(absl::Time when) {
  std::string out = "t";
  const uint64_t us = static_cast<uint64_t>(std::max<int64_t>(0, TimeToMicros(when)));
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<char>((us >> (8 * i)) & 0xff));
  return out;
}
std::string TombstoneTimeKey(absl::Time when, absl::string_view span_key_bytes) {
  std::string out = TombstoneTimePrefix(when);
  out.append(span_key_bytes.data(), span_key_bytes.size());
  return out;
}
std::string ModelKey(absl::string_view id) { return absl::StrCat("M", id); }
std::string GenericKey(absl::string_view space, absl::string_view key) {
  std::string out = absl::StrCat("G", space);
  out.push_back('\0');
  out.append(key.data(), key.size());
  return out;
}

std::string EncodeTombstone(MissReason reason, absl::Time when) {
  std::string out;
  PutU8(&out, static_cast<uint8_t>(reason));
  PutU64(&out, static_cast<uint64_t>(TimeToMicros(when)));
  return out;
}

rocksdb::WriteOptions Synced(bool sync) {
  rocksdb::WriteOptions wo;
  wo.sync = sync;
  return wo;
}

// Releases a snapshot on scope exit. Not thread-safe.
class ScopedSnapshot {
 public:
  explicit ScopedSnapshot(rocksdb::DB* db) : db_(db), snapshot_(db->GetSnapshot()) {}
  ~ScopedSnapshot() { db_->ReleaseSnapshot(snapshot_); }
  const rocksdb::Snapshot* get() const { return snapshot_; }

 private:
  rocksdb::DB* db_;
  const rocksdb::Snapshot* snapshot_;
};

}  // namespace

RocksDbTier::RocksDbTier(const RocksDbTierOptions& options, Compression compression)
    : options_(options),
      compression_(compression),
      metrics_(TierId::kRocksDb, options.capacity_bytes, options.metrics),
      tomb_filter_(new std::atomic<uint64_t>[kFilterWords]) {
  for (int i = 0; i < kFilterWords; ++i) tomb_filter_[i].store(0, std::memory_order_relaxed);
}

void RocksDbTier::MarkTombstoned(const SpanKey& key) {
  const uint64_t h = absl::HashOf(key.tenant, key.hash.high, key.hash.low);
  const uint64_t step = (h >> 32) | 1;
  for (uint64_t i = 0; i < 3; ++i) {
    const uint64_t bit = (h + i * step) & (uint64_t{kFilterWords} * 64 - 1);
    tomb_filter_[bit / 64].fetch_or(uint64_t{1} << (bit % 64), std::memory_order_relaxed);
  }
}

bool RocksDbTier::MaybeTombstoned(const SpanKey& key) const {
  const uint64_t h = absl::HashOf(key.tenant, key.hash.high, key.hash.low);
  const uint64_t step = (h >> 32) | 1;
  for (uint64_t i = 0; i < 3; ++i) {
    const uint64_t bit = (h + i * step) & (uint64_t{kFilterWords} * 64 - 1);
    if ((tomb_filter_[bit / 64].load(std::memory_order_relaxed) & (uint64_t{1} << (bit % 64))) ==
        0) {
      return false;
    }
  }
  return true;
}

RocksDbTier::~RocksDbTier() {
  if (db_ == nullptr) return;
  for (rocksdb::ColumnFamilyHandle* h : {cold_cf_, catalog_cf_, default_cf_}) {
    if (h != nullptr) db_->DestroyColumnFamilyHandle(h).PermitUncheckedError();
  }
  rocksdb::Status closed = db_->Close();
  if (!closed.ok()) KVR_LOG(ERROR) << "closing " << options_.dir << ": " << closed.ToString();
  delete db_;
}

absl::StatusOr<std::unique_ptr<RocksDbTier>> RocksDbTier::Create(
    const RocksDbTierOptions& options) {
  if (options.dir.empty()) return absl::InvalidArgumentError("rocksdb tier dir is empty");
  if (options.capacity_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rocksdb capacity_bytes must be >= 0, got ", options.capacity_bytes));
  }
  KVR_ASSIGN_OR_RETURN(Compression compression, ParseCompression(options.compression));
  auto tier = absl::WrapUnique(new RocksDbTier(options, compression));
  KVR_RETURN_IF_ERROR(tier->Open());
  return tier;
}

namespace {

rocksdb::DBOptions DatabaseOptions() {
  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  db_options.max_background_jobs = 2;
  db_options.info_log = std::make_shared<RocksDbLogger>();
  return db_options;
}

// The column families: default (unused), the catalog and the cold payloads.
std::vector<rocksdb::ColumnFamilyDescriptor> ColumnFamilies() {
  rocksdb::ColumnFamilyOptions catalog_options;
  catalog_options.compression = rocksdb::kLZ4Compression;
  // Misses look up tombstones that mostly do not exist: a Bloom filter
  // answers those without reading blocks.
  rocksdb::BlockBasedTableOptions catalog_table;
  catalog_table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  catalog_options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(catalog_table));

  rocksdb::ColumnFamilyOptions cold_options;
  // Payloads are compressed (and checksummed) by this tier; RocksDB keeps
  // them in blob files so that LSM compactions do not rewrite them.
  cold_options.compression = rocksdb::kNoCompression;
  cold_options.enable_blob_files = true;
  cold_options.min_blob_size = 4096;
  cold_options.blob_file_size = 256 << 20;
  cold_options.blob_compression_type = rocksdb::kNoCompression;
  cold_options.enable_blob_garbage_collection = true;
  cold_options.write_buffer_size = 64 << 20;

  return {
      {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
      {kCatalogCf, catalog_options},
      {kColdCf, cold_options},
  };
}

}  // namespace

absl::Status RocksDbTier::Open() {
  std::error_code ec;
  std::filesystem::create_directories(options_.dir, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create rocksdb directory ", options_.dir, ": ", ec.message()));
  }
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;  // RocksDB 7.8 only offers DB**
  KVR_RETURN_IF_ERROR(FromRocksDbStatus(
      rocksdb::DB::Open(DatabaseOptions(), options_.dir, ColumnFamilies(), &handles, &raw),
      absl::StrCat("opening ", options_.dir)));
  db_ = raw;
  default_cf_ = handles[0];
  catalog_cf_ = handles[1];
  cold_cf_ = handles[2];

  absl::MutexLock lock(&mu_);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), catalog_cf_));
  KVR_RETURN_IF_ERROR(LoadSpanCatalogLocked(it.get()));
  // Tombstones are not scanned (start-up time must not grow with them): one
  // seek tells whether any is stored. When none is, the in-memory filter
  // covers every tombstone (it marks each one written from now on); else
  // lookups ask RocksDB (whose catalog has a Bloom filter) until they are
  // all collected.
  it->Seek("T");
  filter_complete_.store(!(it->Valid() && it->key().starts_with("T")));
  KVR_RETURN_IF_ERROR(FromRocksDbStatus(it->status(), "looking for tombstones"));
  KVR_RETURN_IF_ERROR(IndexTombstonesOnce(it.get()));
  if (corrupt_catalog_records_ > 0) {
    KVR_LOG(ERROR) << options_.dir << ": skipped " << corrupt_catalog_records_
                   << " span catalog records that do not decode";
  }
  PublishMetricsLocked();
  return absl::OkStatus();
}

absl::Status RocksDbTier::LoadSpanCatalogLocked(rocksdb::Iterator* it) {
  for (it->Seek("S"); it->Valid() && it->key().starts_with("S"); it->Next()) {
    SpanKey key;
    ColdRecord rec;
    const rocksdb::Slice k = it->key();
    const rocksdb::Slice v = it->value();
    if (!ParseSpanKeyBytes(absl::string_view(k.data() + 1, k.size() - 1), &key) ||
        !DecodeColdRecord(absl::string_view(v.data(), v.size()), false, &rec)) {
      ++corrupt_catalog_records_;
      continue;
    }
    next_seq_ = std::max(next_seq_, rec.seq + 1);
    by_seq_[rec.seq] = key;
    bytes_ += rec.stored_bytes;
    index_[key] = Entry{rec.seq, rec.stored_bytes, std::move(rec.meta), false};
  }
  return FromRocksDbStatus(it->status(), "scanning the span catalog");
}

absl::Status RocksDbTier::IndexTombstonesOnce(rocksdb::Iterator* it) {
  std::string marker;
  rocksdb::Status ms =
      db_->Get(rocksdb::ReadOptions(), catalog_cf_, kTombstoneIndexMarker, &marker);
  if (!ms.IsNotFound()) return FromRocksDbStatus(ms, "reading the tombstone index marker");
  rocksdb::WriteBatch batch;
  int64_t indexed = 0;
  for (it->Seek("T"); it->Valid() && it->key().starts_with("T"); it->Next()) {
    const rocksdb::Slice k = it->key();
    const rocksdb::Slice v = it->value();
    absl::Time when = absl::Now();
    if (v.size() >= 9) when = MicrosToTime(static_cast<int64_t>(LoadU64(v.data() + 1)));
    KVR_RETURN_IF_ERROR(FromRocksDbStatus(
        batch.Put(catalog_cf_, TombstoneTimeKey(when, absl::string_view(k.data() + 1, k.size() - 1)),
                  rocksdb::Slice()),
        "indexing tombstones"));
    ++indexed;
  }
  KVR_RETURN_IF_ERROR(FromRocksDbStatus(it->status(), "indexing tombstones"));
  KVR_RETURN_IF_ERROR(FromRocksDbStatus(batch.Put(catalog_cf_, kTombstoneIndexMarker, "1"),
                                        "indexing tombstones"));
  KVR_RETURN_IF_ERROR(FromRocksDbStatus(db_->Write(Synced(true), &batch), "indexing tombstones"));
  if (indexed > 0) KVR_LOG(INFO) << options_.dir << ": indexed " << indexed << " tombstones by time";
  return absl::OkStatus();
}

void RocksDbTier::PublishMetricsLocked() {
  metrics_.bytes->Set(bytes_);
  metrics_.spans->Set(static_cast<int64_t>(index_.size()));
}

void RocksDbTier::EraseLocked(const SpanKey& key) {
  auto it = index_.find(key);
  if (it == index_.end()) return;
  bytes_ -= it->second.stored_bytes;
  if (it->second.leaving) leaving_bytes_ -= it->second.stored_bytes;
  by_seq_.erase(it->second.seq);
  index_.erase(it);
}

absl::Status RocksDbTier::Put(StoredSpanPtr span, const TierPutOptions& options,
                              std::vector<SpanKey>* victims) {
  victims->clear();
  if (options_.capacity_bytes == 0) {
    return absl::ResourceExhaustedError("the rocksdb tier holds only the catalog (capacity 0)");
  }
  std::string compressed;
  ColdRecord rec;
  rec.compression = Compress(compression_, span->payload, &compressed);
  const absl::string_view stored =
      rec.compression == Compression::kNone ? absl::string_view(span->payload) : compressed;
  rec.stored_bytes = static_cast<int64_t>(stored.size());
  if (rec.stored_bytes > options_.capacity_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("span of ", rec.stored_bytes, " stored bytes exceeds the rocksdb capacity of ",
                     options_.capacity_bytes));
  }
  rec.stored_checksum =
      rec.compression == Compression::kNone ? span->meta.payload_checksum : Checksum64(stored);
  rec.meta = span->meta;
  {
    absl::MutexLock lock(&mu_);
    rec.seq = next_seq_++;
    auto existing = index_.find(span->key);
    const int64_t replaced =
        existing != index_.end() && !existing->second.leaving ? existing->second.stored_bytes : 0;
    int64_t need = bytes_ - leaving_bytes_ + reserved_bytes_ - replaced + rec.stored_bytes -
                   options_.capacity_bytes;
    reserved_bytes_ += rec.stored_bytes;
    for (auto it = by_seq_.begin(); it != by_seq_.end() && need > 0; ++it) {
      if (it->second == span->key) continue;
      Entry& e = index_.at(it->second);
      if (e.leaving) continue;
      e.leaving = true;
      leaving_bytes_ += e.stored_bytes;
      need -= e.stored_bytes;
      victims->push_back(it->second);
    }
  }
  const std::string key_bytes = SpanKeyBytes(span->key);
  rocksdb::WriteBatch batch;
  rocksdb::Status st = batch.Put(catalog_cf_, absl::StrCat("S", key_bytes), EncodeColdRecord(rec));
  if (st.ok()) st = batch.Put(cold_cf_, key_bytes, ToSlice(stored));
  if (st.ok() && MaybeTombstonedAnyTime(span->key)) {
    st = batch.Delete(catalog_cf_, absl::StrCat("T", key_bytes));
  }
  if (st.ok()) st = db_->Write(Synced(options.sync), &batch);
  if (!st.ok()) {
    absl::MutexLock lock(&mu_);
    reserved_bytes_ -= rec.stored_bytes;
    for (const SpanKey& v : *victims) {
      auto it = index_.find(v);
      if (it != index_.end() && it->second.leaving) {
        it->second.leaving = false;
        leaving_bytes_ -= it->second.stored_bytes;
      }
    }
    victims->clear();
    return FromRocksDbStatus(st, absl::StrCat("storing span ", span->key.hash.ToHex()));
  }
  absl::MutexLock lock(&mu_);
  reserved_bytes_ -= rec.stored_bytes;
  EraseLocked(span->key);
  rec.meta.token_ids.clear();
  rec.meta.token_ids.shrink_to_fit();
  index_[span->key] = Entry{rec.seq, rec.stored_bytes, std::move(rec.meta), false};
  by_seq_[rec.seq] = span->key;
  bytes_ += rec.stored_bytes;
  metrics_.CountOrigin(options.origin);
  PublishMetricsLocked();
  return absl::OkStatus();
}

absl::StatusOr<StoredSpanPtr> RocksDbTier::Read(const SpanKey& key, bool victim) {
  {
    absl::MutexLock lock(&mu_);
    auto it = index_.find(key);
    if (it == index_.end() || (victim && !it->second.leaving)) {
      return absl::NotFoundError(victim ? "not leaving the rocksdb tier" : "not in rocksdb");
    }
  }
  const std::string key_bytes = SpanKeyBytes(key);
  ScopedSnapshot snapshot(db_);
  rocksdb::ReadOptions ro;
  ro.snapshot = snapshot.get();
  ro.verify_checksums = true;
  // The payload is verified below with its own XXH3-64; RocksDB's CRC32C over
  // the whole blob (software CRC in the Debian build) would only repeat that.
  rocksdb::ReadOptions payload_ro = ro;
  payload_ro.verify_checksums = false;
  std::string meta_value;
  rocksdb::Status st = db_->Get(ro, catalog_cf_, absl::StrCat("S", key_bytes), &meta_value);
  rocksdb::PinnableSlice stored;
  if (st.ok()) st = db_->Get(payload_ro, cold_cf_, key_bytes, &stored);
  if (st.IsNotFound()) return absl::NotFoundError("not in rocksdb (deleted concurrently)");
  absl::Status status = FromRocksDbStatus(st, absl::StrCat("reading span ", key.hash.ToHex()));
  ColdRecord rec;
  auto span = std::make_shared<StoredSpan>();
  if (status.ok() && !DecodeColdRecord(meta_value, /*with_token_ids=*/true, &rec)) {
    status = absl::DataLossError(
        absl::StrCat("span ", key.hash.ToHex(), ": its catalog record does not decode"));
  }
  if (status.ok()) {
    const absl::string_view bytes(stored.data(), stored.size());
    if (static_cast<int64_t>(bytes.size()) != rec.stored_bytes ||
        Checksum64(bytes) != rec.stored_checksum) {
      status = absl::DataLossError(
          absl::StrCat("span ", key.hash.ToHex(), ": stored payload failed its checksum"));
    } else if (rec.compression == Compression::kNone) {
      span->payload.assign(bytes.data(), bytes.size());
    } else {
      status = Decompress(rec.compression, bytes, rec.meta.payload_bytes, &span->payload);
      if (status.ok() && Checksum64(span->payload) != rec.meta.payload_checksum) {
        status = absl::DataLossError(
            absl::StrCat("span ", key.hash.ToHex(), ": decompressed payload failed its checksum"));
      }
    }
  }
  if (!status.ok()) {
    if (status.code() == absl::StatusCode::kDataLoss) {
      KVR_LOG(ERROR) << status;
      metrics_.checksum_failures->Increment();
      {
        absl::MutexLock lock(&mu_);
        EraseLocked(key);
        PublishMetricsLocked();
      }
      DeleteRecords(key, /*sync=*/false).IgnoreError();  // best effort: it is unreadable anyway
    }
    return status;
  }
  span->key = key;
  span->meta = std::move(rec.meta);
  return StoredSpanPtr(std::move(span));
}

absl::StatusOr<StoredSpanPtr> RocksDbTier::Get(const SpanKey& key) {
  auto span = Read(key, /*victim=*/false);
  (span.ok() ? metrics_.hits : metrics_.misses)->Increment();
  return span;
}

absl::StatusOr<StoredSpanPtr> RocksDbTier::GetVictim(const SpanKey& key) {
  return Read(key, /*victim=*/true);
}

absl::Status RocksDbTier::DeleteRecords(const SpanKey& key, bool sync) {
  const std::string key_bytes = SpanKeyBytes(key);
  rocksdb::WriteBatch batch;
  rocksdb::Status st = batch.Delete(catalog_cf_, absl::StrCat("S", key_bytes));
  if (st.ok()) st = batch.Delete(cold_cf_, key_bytes);
  if (st.ok()) st = db_->Write(Synced(sync), &batch);
  return FromRocksDbStatus(st, absl::StrCat("deleting span ", key.hash.ToHex()));
}

bool RocksDbTier::FinishEviction(const SpanKey& key) {
  {
    absl::MutexLock lock(&mu_);
    auto it = index_.find(key);
    if (it == index_.end() || !it->second.leaving) return false;
    EraseLocked(key);
    metrics_.evictions->Increment();
    PublishMetricsLocked();
  }
  absl::Status st = DeleteRecords(key, /*sync=*/false);
  if (!st.ok()) {
    // The span left the index; its records stay until the next delete or a
    // restart brings them back as a valid copy.
    KVR_LOG(ERROR) << st;
  }
  return true;
}

bool RocksDbTier::Contains(const SpanKey& key) const {
  absl::MutexLock lock(&mu_);
  return index_.contains(key);
}

absl::Status RocksDbTier::Delete(const SpanKey& key) {
  {
    absl::MutexLock lock(&mu_);
    if (!index_.contains(key)) return absl::NotFoundError("not in rocksdb");
  }
  KVR_RETURN_IF_ERROR(DeleteRecords(key, /*sync=*/true));
  absl::MutexLock lock(&mu_);
  EraseLocked(key);
  PublishMetricsLocked();
  return absl::OkStatus();
}

void RocksDbTier::ForEachSpan(
    const std::function<void(const SpanKey&, const SpanMeta&)>& fn) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [key, entry] : index_) fn(key, entry.meta);
}

TierStats RocksDbTier::Stats() const { return metrics_.Snapshot(); }

absl::Status RocksDbTier::Sync() { return FromRocksDbStatus(db_->SyncWAL(), "syncing the WAL"); }

absl::Status RocksDbTier::PutModel(const ModelGeometry& model) {
  return FromRocksDbStatus(
      db_->Put(Synced(true), catalog_cf_, ModelKey(model.model_id), EncodeModel(model)),
      absl::StrCat("storing model ", model.model_id));
}

absl::StatusOr<std::vector<ModelGeometry>> RocksDbTier::LoadModels() const {
  std::vector<ModelGeometry> models;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), catalog_cf_));
  for (it->Seek("M"); it->Valid() && it->key().starts_with("M"); it->Next()) {
    KVR_ASSIGN_OR_RETURN(ModelGeometry m,
                         DecodeModel(absl::string_view(it->value().data(), it->value().size())));
    models.push_back(std::move(m));
  }
  KVR_RETURN_IF_ERROR(FromRocksDbStatus(it->status(), "scanning models"));
  return models;
}

absl::Status RocksDbTier::PutTombstones(const std::vector<SpanKey>& keys, MissReason reason,
                                        bool sync, absl::Time when) {
  if (keys.empty()) return absl::OkStatus();
  if (when == absl::InfinitePast()) when = absl::Now();
  const std::string value = EncodeTombstone(reason, when);
  rocksdb::WriteBatch batch;
  for (const SpanKey& key : keys) {
    MarkTombstoned(key);
    rocksdb::Status st = batch.Put(catalog_cf_, TombstoneKey(key), value);
    if (st.ok()) st = batch.Put(catalog_cf_, TombstoneTimeKey(when, SpanKeyBytes(key)), rocksdb::Slice());
    if (!st.ok()) return FromRocksDbStatus(st, "batching tombstones");
  }
  return FromRocksDbStatus(db_->Write(Synced(sync), &batch), "writing tombstones");
}

absl::StatusOr<int64_t> RocksDbTier::CollectTombstones(absl::Time cutoff) {
  const std::string end = TombstoneTimePrefix(cutoff);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), catalog_cf_));
  rocksdb::WriteBatch batch;
  int64_t collected = 0;
  for (it->Seek("t"); it->Valid() && it->key().starts_with("t") && it->key().compare(end) < 0;
       it->Next()) {
    const rocksdb::Slice k = it->key();
    if (k.size() < 9) {
      KVR_RETURN_IF_ERROR(FromRocksDbStatus(batch.Delete(catalog_cf_, k), "collecting"));
      continue;
    }
    const absl::Time when = MicrosToTime(static_cast<int64_t>(ReadBigEndian64(k.data() + 1)));
    const std::string tomb = absl::StrCat("T", absl::string_view(k.data() + 9, k.size() - 9));
    std::string value;
    rocksdb::Status st = db_->Get(rocksdb::ReadOptions(), catalog_cf_, tomb, &value);
    // The tombstone itself goes only when this index entry is its latest
    // (a newer tombstone of the key has its own, later entry).
    if (st.ok() && value.size() >= 9 &&
        MicrosToTime(static_cast<int64_t>(LoadU64(value.data() + 1))) <= when) {
      KVR_RETURN_IF_ERROR(FromRocksDbStatus(batch.Delete(catalog_cf_, tomb), "collecting"));
      ++collected;
    } else if (!st.ok() && !st.IsNotFound()) {
      return FromRocksDbStatus(st, "collecting tombstones");
    }
    KVR_RETURN_IF_ERROR(FromRocksDbStatus(batch.Delete(catalog_cf_, k), "collecting"));
    if (batch.Count() >= 4096) {
      KVR_RETURN_IF_ERROR(FromRocksDbStatus(db_->Write(Synced(false), &batch), "collecting"));
      batch.Clear();
    }
  }
  KVR_RETURN_IF_ERROR(FromRocksDbStatus(it->status(), "collecting tombstones"));
  KVR_RETURN_IF_ERROR(FromRocksDbStatus(db_->Write(Synced(false), &batch), "collecting"));
  return collected;
}

bool RocksDbTier::MaybeTombstonedAnyTime(const SpanKey& key) const {
  return !filter_complete_.load() || MaybeTombstoned(key);
}

MissReason RocksDbTier::GetTombstone(const SpanKey& key) const {
  if (!MaybeTombstonedAnyTime(key)) return MissReason::kNone;
  std::string value;
  rocksdb::Status st = db_->Get(rocksdb::ReadOptions(), catalog_cf_, TombstoneKey(key), &value);
  if (!st.ok() || value.empty()) return MissReason::kNone;
  const auto reason = static_cast<MissReason>(static_cast<uint8_t>(value[0]));
  switch (reason) {
    case MissReason::kEvicted:
    case MissReason::kDeleted:
    case MissReason::kChecksumFailure:
      return reason;
    default:
      return MissReason::kNone;
  }
}

absl::Status RocksDbTier::ClearTombstone(const SpanKey& key) {
  if (!MaybeTombstonedAnyTime(key)) return absl::OkStatus();
  if (!filter_complete_.load()) {
    // Only tombstones written before this start may be unknown to the
    // filter: look before writing a delete on every put.
    std::string value;
    rocksdb::Status st = db_->Get(rocksdb::ReadOptions(), catalog_cf_, TombstoneKey(key), &value);
    if (st.IsNotFound()) return absl::OkStatus();
  }
  return FromRocksDbStatus(db_->Delete(Synced(false), catalog_cf_, TombstoneKey(key)),
                           "clearing a tombstone");
}

absl::Status RocksDbTier::CatalogPut(absl::string_view space, absl::string_view key,
                                     absl::string_view value) {
  return FromRocksDbStatus(
      db_->Put(Synced(true), catalog_cf_, GenericKey(space, key), ToSlice(value)),
      absl::StrCat("catalog put in '", space, "'"));
}

absl::StatusOr<std::string> RocksDbTier::CatalogGet(absl::string_view space,
                                                    absl::string_view key) const {
  std::string value;
  rocksdb::Status st =
      db_->Get(rocksdb::ReadOptions(), catalog_cf_, GenericKey(space, key), &value);
  if (st.IsNotFound()) {
    return absl::NotFoundError(
        absl::StrCat("no key of ", key.size(), " bytes in catalog space '", space, "'"));
  }
  KVR_RETURN_IF_ERROR(FromRocksDbStatus(st, absl::StrCat("catalog get in '", space, "'")));
  return value;
}

absl::Status RocksDbTier::CatalogDelete(absl::string_view space, absl::string_view key) {
  return FromRocksDbStatus(db_->Delete(Synced(true), catalog_cf_, GenericKey(space, key)),
                           absl::StrCat("catalog delete in '", space, "'"));
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> RocksDbTier::CatalogScan(
    absl::string_view space, absl::string_view prefix) const {
  const std::string space_prefix = GenericKey(space, "");
  const std::string start = GenericKey(space, prefix);
  std::vector<std::pair<std::string, std::string>> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), catalog_cf_));
  for (it->Seek(start); it->Valid() && it->key().starts_with(start); it->Next()) {
    const rocksdb::Slice k = it->key();
    out.emplace_back(std::string(k.data() + space_prefix.size(), k.size() - space_prefix.size()),
                     it->value().ToString());
  }
  KVR_RETURN_IF_ERROR(
      FromRocksDbStatus(it->status(), absl::StrCat("catalog scan of '", space, "'")));
  return out;
}

int64_t RocksDbTier::corrupt_catalog_records() const {
  absl::MutexLock lock(&mu_);
  return corrupt_catalog_records_;
}

absl::Status RocksDbTier::TEST_CorruptStoredPayload(const SpanKey& key) {
  const std::string key_bytes = SpanKeyBytes(key);
  std::string value;
  KVR_RETURN_IF_ERROR(FromRocksDbStatus(
      db_->Get(rocksdb::ReadOptions(), cold_cf_, key_bytes, &value), "reading for corruption"));
  if (value.empty()) return absl::FailedPreconditionError("empty payload");
  value[value.size() / 2] = static_cast<char>(value[value.size() / 2] ^ 0x5a);
  return FromRocksDbStatus(db_->Put(Synced(true), cold_cf_, key_bytes, value),
                           "writing the corrupted payload");
}

}  // namespace kvrecall::store
