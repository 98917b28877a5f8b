#pragma once

// RocksDbTier: one RocksDB (7.8) under a directory, with two column families
// (docs/formats/rocksdb_catalog.md):
//
//   catalog     models ('M'), span metadata and where each cold payload is
//               ('S'), miss tombstones ('T': evicted / deleted / checksum
//               failure; 't': their time index, for collection), and the generic spaces of the other subsystems
//               ('G': contexts, index manifests, artifacts, policies)
//   cold_spans  span payloads, compressed by this tier (LZ4 or Zstandard) and
//               checksummed (XXH3-64 of the stored bytes, then of the payload);
//               large values go to RocksDB blob files
//
// A span's metadata and payload are written in one WriteBatch, so a span is
// either entirely present or absent; `sync` puts and every catalog write that
// an acknowledgement depends on use WriteOptions::sync = true. Capacity counts
// compressed bytes and is kept by evicting the oldest-written spans (FIFO:
// spans read from this tier are promoted to memory, so recency matters less
// here than in the tiers above).
//
// <rocksdb/...> is included only by rocksdb_tier.cc and rocksdb_status.{h,cc}.
//
// The in-memory span index is guarded by a mutex held only for map updates;
// RocksDB calls run outside it. Thread-safe.

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/metrics.h"
#include "service/store/compression.h"
#include "service/store/tier.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
class Iterator;
}  // namespace rocksdb

namespace kvrecall::store {

struct RocksDbTierOptions {
  // The RocksDB directory; created when missing. Required.
  std::string dir;
  // Bytes of cold span payload (stored, i.e. compressed, size). >= 0; default
  // 256 GiB. 0 keeps only the catalog: span Put() is RESOURCE_EXHAUSTED.
  int64_t capacity_bytes = int64_t{256} << 30;
  // "zstd", "lz4" or "none". Default "lz4".
  std::string compression = "lz4";
  // Where kvrecall_store_tier_*{tier="rocksdb"} are registered; may be null.
  MetricsRegistry* metrics = nullptr;
};

class RocksDbTier : public Tier {
 public:
  // Opens (creating when missing) the database and rebuilds the span index
  // from the catalog. INVALID_ARGUMENT for bad options; the RocksDB status
  // converted (INTERNAL, DATA_LOSS, UNAVAILABLE when locked by another process).
  static absl::StatusOr<std::unique_ptr<RocksDbTier>> Create(const RocksDbTierOptions& options);
  ~RocksDbTier() override;

  // --- Tier ---
  TierId id() const override { return TierId::kRocksDb; }
  int64_t capacity_bytes() const override { return options_.capacity_bytes; }
  absl::Status Put(StoredSpanPtr span, const TierPutOptions& options,
                   std::vector<SpanKey>* victims) override;
  absl::StatusOr<StoredSpanPtr> Get(const SpanKey& key) override;
  absl::StatusOr<StoredSpanPtr> GetVictim(const SpanKey& key) override;
  bool FinishEviction(const SpanKey& key) override;
  bool Contains(const SpanKey& key) const override;
  // Synced.
  absl::Status Delete(const SpanKey& key) override;
  void ForEachSpan(const std::function<void(const SpanKey&, const SpanMeta&)>& fn) const override;
  TierStats Stats() const override;
  // Syncs the write-ahead log.
  absl::Status Sync() override;

  // --- models (synced) ---
  absl::Status PutModel(const ModelGeometry& model);
  // Every registered model; DATA_LOSS when a stored record does not decode.
  absl::StatusOr<std::vector<ModelGeometry>> LoadModels() const;

  // --- miss tombstones: why a span that is gone is gone ---
  // `reason` is kEvicted, kDeleted or kChecksumFailure; `when` (default:
  // now) dates them for collection.
  absl::Status PutTombstones(const std::vector<SpanKey>& keys, MissReason reason, bool sync,
                             absl::Time when = absl::InfinitePast());
  // Removes the tombstones written before `cutoff` (their misses then say
  // never_stored). Walks a time index from the oldest, so the work is
  // proportional to what is collected. Returns how many went.
  absl::StatusOr<int64_t> CollectTombstones(absl::Time cutoff);
  // The recorded reason, or kNone when there is no tombstone.
  MissReason GetTombstone(const SpanKey& key) const;
  // Removes the tombstone (not synced): the span is stored again. Costs no
  // write when the key never had one (an in-memory Bloom filter over the
  // tombstoned keys, rebuilt on open, answers first).
  absl::Status ClearTombstone(const SpanKey& key);

  // --- generic catalog spaces (synced writes). `space` must not contain '\0'. ---
  absl::Status CatalogPut(absl::string_view space, absl::string_view key, absl::string_view value);
  absl::StatusOr<std::string> CatalogGet(absl::string_view space, absl::string_view key) const;
  absl::Status CatalogDelete(absl::string_view space, absl::string_view key);
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> CatalogScan(
      absl::string_view space, absl::string_view prefix) const;

  // Spans whose catalog record could not be decoded on open (skipped).
  int64_t corrupt_catalog_records() const;

  // Test hook: flips one byte of the stored payload of `key`, keeping its
  // metadata, as a disk error would. NOT_FOUND when absent.
  absl::Status TEST_CorruptStoredPayload(const SpanKey& key);

 private:
  struct Entry {
    uint64_t seq = 0;
    int64_t stored_bytes = 0;
    SpanMeta meta;  // without token ids
    bool leaving = false;
  };

  explicit RocksDbTier(const RocksDbTierOptions& options, Compression compression);
  absl::Status Open();
  // Open's parts: the span index from the catalog's 'S' records (through
  // `it`, a catalog iterator), and the time index of tombstones written by
  // earlier versions (once per store).
  absl::Status LoadSpanCatalogLocked(rocksdb::Iterator* it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status IndexTombstonesOnce(rocksdb::Iterator* it);
  absl::StatusOr<StoredSpanPtr> Read(const SpanKey& key, bool victim);
  void EraseLocked(const SpanKey& key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PublishMetricsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Deletes the span's metadata and payload (one batch).
  absl::Status DeleteRecords(const SpanKey& key, bool sync);
  // Bloom filter over keys that ever had a tombstone: false means certainly none.
  void MarkTombstoned(const SpanKey& key);
  bool MaybeTombstoned(const SpanKey& key) const;
  // False means certainly none, counting tombstones stored before this start.
  bool MaybeTombstonedAnyTime(const SpanKey& key) const;

  const RocksDbTierOptions options_;
  const Compression compression_;
  mutable TierMetrics metrics_;

  rocksdb::DB* db_ = nullptr;                          // owned
  rocksdb::ColumnFamilyHandle* default_cf_ = nullptr;  // owned
  rocksdb::ColumnFamilyHandle* catalog_cf_ = nullptr;  // owned
  rocksdb::ColumnFamilyHandle* cold_cf_ = nullptr;     // owned

  // 2^23 bits, 3 probes: about 3% false positives at a million tombstones.
  static constexpr int kFilterWords = 1 << 17;
  std::unique_ptr<std::atomic<uint64_t>[]> tomb_filter_;
  // The filter holds every stored tombstone (none was stored at start-up).
  std::atomic<bool> filter_complete_{true};

  mutable absl::Mutex mu_;
  absl::flat_hash_map<SpanKey, Entry> index_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, SpanKey> by_seq_ ABSL_GUARDED_BY(mu_);  // eviction order, oldest first
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t leaving_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t reserved_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // puts in flight
  int64_t corrupt_catalog_records_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvrecall::store
