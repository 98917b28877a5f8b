#pragma once

// TieredStore: the span store of kvrecalld. Spans (K and V of one block of
// tokens, all layers) live in up to three tiers, fastest first:
//
//   MemoryTier  — sharded, byte-bounded, LRU; pinned spans are never evicted
//   DiskTier    — append-only segment files, offset index rebuilt on start,
//                 checksummed records, compaction of dead records
//   RocksDbTier — the durable catalog (models, span metadata, and the seams
//                 for contexts, index manifests, artifacts and policies) and
//                 cold spans, compressed
//
// Writes go to memory; eviction from a tier demotes the span to the next tier
// with room; a hit in a lower tier promotes the span to memory. A `durable`
// span is written through to a persistent tier (synced) before Put() returns,
// so an acknowledged durable span survives kill -9. A span becomes visible to
// readers only when its whole payload is stored and checksummed.
//
// Every read that finds nothing says why (MissReason), and Stats() counts
// misses by reason.
//
// Thread-safe.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/metrics.h"
#include "service/store/span.h"

namespace kvrecall::store {

struct TieredStoreOptions {
  // Root of everything on disk: <data_dir>/segments (DiskTier) and
  // <data_dir>/rocksdb (RocksDbTier). Created when missing. Required.
  std::string data_dir;

  // Bytes of span payload held in memory. Default 4 GiB. 0 disables the tier.
  int64_t memory_capacity_bytes = int64_t{4} << 30;
  // Independent LRU shards of the memory tier (lock striping). 1..256, default 16.
  int32_t memory_shards = 16;

  // Bytes of live span records in segment files. Default 64 GiB. 0 disables the tier.
  int64_t disk_capacity_bytes = int64_t{64} << 30;
  // A segment file is closed and a new one started at this size. Default 256 MiB.
  int64_t disk_segment_bytes = int64_t{256} << 20;
  // A closed segment whose live fraction drops below this is compacted. 0..1, default 0.5.
  double disk_compaction_live_fraction = 0.5;

  // Bytes of cold span payload (compressed size) in RocksDB. Default 256 GiB.
  // 0 keeps only the catalog there (durable spans then go to the disk tier).
  int64_t rocksdb_capacity_bytes = int64_t{256} << 30;
  // RocksDB compression of cold spans: "zstd", "lz4" or "none". Default "lz4".
  std::string rocksdb_compression = "lz4";

  // Where metrics are registered (may be null: no metrics). Not owned; must outlive the store.
  MetricsRegistry* metrics = nullptr;

  // Time source for pin TTLs and span creation times. Empty (default): absl::Now.
  // Tests inject a clock they control instead of sleeping.
  std::function<absl::Time()> clock;
  // Per-tenant quotas, bytes; 0 (default): none. A put past a quota is
  // RESOURCE_EXHAUSTED naming it (docs/errors.md):
  //   tenant_memory_bytes   payload a tenant holds in memory; over it, the
  //                         tenant's own least recently used spans make room
  //                         (demoted), never another tenant's
  //   tenant_pinned_bytes   payload a tenant holds pinned
  //   tenant_stored_bytes   payload a tenant holds in all tiers together
  //                         (memory, disk and RocksDB; a span in two tiers
  //                         counts once); checked when a new span is put,
  //                         so concurrent puts of one tenant may pass it by
  //                         their own sizes
  int64_t tenant_memory_bytes = 0;
  int64_t tenant_pinned_bytes = 0;
  int64_t tenant_stored_bytes = 0;
  // Miss tombstones (why a span is gone) older than this are collected, by a
  // background pass every tombstone_collect_interval. Default 7 days.
  absl::Duration tombstone_max_age = absl::Hours(24 * 7);
  absl::Duration tombstone_collect_interval = absl::Minutes(10);

  // Whether tenant `a` may learn that tenant `b` holds a span (a miss of `a`
  // then says kOtherNamespace instead of kNeverStored). Empty (default): no
  // tenant learns anything of another (the prompt-cache side channel is
  // closed); the daemon passes the trust groups of its tenants file.
  std::function<bool(absl::string_view a, absl::string_view b)> shares_namespace;
  // Compact disk segments on a background thread (default true). When false,
  // the space of dead records is never reclaimed (for tests and tools).
  bool disk_background_compaction = true;
};

// Per-tier counters (Admin.Stats).
struct TierStats {
  TierId tier = TierId::kMemory;
  int64_t capacity_bytes = 0;
  int64_t bytes = 0;        // payload bytes held now
  int64_t spans = 0;        // spans held now
  int64_t hits = 0;         // reads answered by this tier
  int64_t misses = 0;       // reads this tier could not answer
  int64_t evictions = 0;    // spans evicted for capacity (demoted or dropped)
  int64_t promotions = 0;   // spans copied up into this tier on a hit below
  int64_t demotions = 0;    // spans received from the tier above on its eviction
  int64_t checksum_failures = 0;  // records found corrupt (dropped, never served)
};

struct StoreStats {
  std::vector<TierStats> tiers;                   // fastest first
  std::map<MissReason, int64_t> misses_by_reason;  // over Get and Lookup
  int64_t models = 0;
  int64_t pinned_spans = 0;
};

// Result of Put().
struct PutOutcome {
  bool already_present = false;  // an identical span was stored: nothing changed (idempotent)
  TierId durable_tier = TierId::kMemory;  // where a durable span was made persistent
};

// Result of Get(). Exactly one of `span` (hit) and `miss` != kNone holds.
struct GetResult {
  StoredSpanPtr span;
  TierId tier = TierId::kMemory;  // which tier answered a hit
  MissReason miss = MissReason::kNone;
  // Not OK when a tier that holds the span failed to read it (EIO): the span
  // is kept, and this UNAVAILABLE status, which names the error, is the
  // caller's to return (a later read may succeed).
  absl::Status error;
};

// Result of Lookup(): the longest stored prefix of a chain.
struct LookupResult {
  int32_t prefix_spans = 0;       // chain[0, prefix_spans) are all stored and readable
  int64_t prefix_tokens = 0;      // sum of their token counts
  // For each hash of chain[prefix_spans, end): why it is not part of the prefix.
  std::vector<MissReason> missing;
};

// Options of one Put().
struct PutOptions {
  // Salt of the chain (docs/hashing.md), to check that a first span's parent
  // is SpanRootHash(model_id, salt).
  std::string salt;
  // The caller has checked the parent elsewhere (a cluster node storing a
  // replica, whose parent lives on other nodes): skip the parent check.
  bool parent_checked = false;
};

// One span the store holds (ListSpans).
struct SpanListing {
  SpanKey key;
  std::string model_id;
  int64_t payload_bytes = 0;
  uint64_t payload_checksum = 0;
  bool durable = false;
};

class TieredStore {
 public:
  // Opens (creating when missing) the store under options.data_dir, replays
  // the disk tier's segments and the RocksDB catalog. Every durable span
  // acknowledged before a crash is readable afterwards.
  // INVALID_ARGUMENT for bad options; INTERNAL / DATA_LOSS for unusable files.
  static absl::StatusOr<std::unique_ptr<TieredStore>> Open(const TieredStoreOptions& options);

  virtual ~TieredStore() = default;

  // --- models (catalog) ---

  // Registers a model. Idempotent for an identical geometry; ALREADY_EXISTS
  // when the id is registered with a different geometry; INVALID_ARGUMENT for
  // a bad geometry (non-positive sizes, empty id). Persistent (synced).
  virtual absl::Status RegisterModel(const ModelGeometry& geometry) = 0;
  // NOT_FOUND when not registered.
  virtual absl::StatusOr<ModelGeometry> GetModel(absl::string_view model_id) const = 0;
  virtual std::vector<ModelGeometry> ListModels() const = 0;

  // --- spans ---

  // Stores a complete span. `span.meta.payload_checksum` must be the XXH3-64
  // of the payload (the client computes it; a mismatch is DATA_LOSS, the span
  // is not stored). Validation, each changing nothing on failure:
  //   NOT_FOUND            unknown model id
  //   INVALID_ARGUMENT     payload size != geometry for num_tokens; num_tokens
  //                        not in 1..block_tokens; token_ids given but their
  //                        count != num_tokens or the hash != SpanHash(parent, token_ids)
  //   FAILED_PRECONDITION  parent neither a readable span of the same tenant
  //                        nor SpanRootHash(model_id, options.salt)
  //   ALREADY_EXISTS       the key holds a different payload (checksum differs)
  //   RESOURCE_EXHAUSTED   no tier can hold it (e.g. everything pinned)
  // A duplicate of a stored span is OK with already_present = true.
  virtual absl::StatusOr<PutOutcome> Put(StoredSpan span, const PutOptions& options) = 0;

  // Reads a span, promoting it to memory on a lower-tier hit. When
  // `model_id` is non-empty and the span belongs to another model, the result
  // is a miss with kModelMismatch. A record failing its checksum is dropped,
  // counted and reported as kChecksumFailure (never served).
  virtual GetResult Get(const SpanKey& key, absl::string_view model_id) = 0;

  // The longest prefix of `chain` (hashes in order) whose spans are all
  // stored for `tenant` and `model_id`; does not promote or read payloads.
  virtual LookupResult Lookup(absl::string_view tenant, absl::string_view model_id,
                              absl::Span<const Hash128> chain) = 0;

  // Deletes a span from every tier. NOT_FOUND (with the miss reason in the
  // message) when absent. Pinned spans are deleted too (the pin goes with them).
  virtual absl::Status Delete(const SpanKey& key) = 0;

  // Removes a span from every tier without recording a deletion (a cluster
  // node hands it to the nodes that now own it): a later miss here is not
  // reported as deleted. NOT_FOUND when absent.
  virtual absl::Status Drop(const SpanKey& key) = 0;

  // Every span held, in no particular order: a snapshot of the directory
  // (for cluster reconciliation; reads no payloads).
  virtual std::vector<SpanListing> ListSpans() const = 0;

  // Pins a span in memory (promoting it first): it is never evicted until
  // unpinned or, when ttl is finite, until the ttl passes. Pins nest: each
  // Pin needs one Unpin. NOT_FOUND when absent; RESOURCE_EXHAUSTED when
  // pinned bytes would exceed the memory capacity.
  virtual absl::Status Pin(const SpanKey& key, absl::Duration ttl) = 0;
  // NOT_FOUND when absent; FAILED_PRECONDITION when not pinned.
  virtual absl::Status Unpin(const SpanKey& key) = 0;

  virtual StoreStats Stats() const = 0;

  // --- catalog seam (contexts, index manifests and payloads, artifacts, policies) ---

  // A durable key-value namespace in RocksDB for the other subsystems.
  // `space` is a short name ("context", "index", "artifact", "policy");
  // keys are opaque bytes. Writes are synced.
  virtual absl::Status CatalogPut(absl::string_view space, absl::string_view key,
                                  absl::string_view value) = 0;
  // NOT_FOUND when absent.
  virtual absl::StatusOr<std::string> CatalogGet(absl::string_view space,
                                                 absl::string_view key) const = 0;
  virtual absl::Status CatalogDelete(absl::string_view space, absl::string_view key) = 0;
  // All (key, value) pairs of `space` whose key starts with `prefix`, in key order.
  virtual absl::StatusOr<std::vector<std::pair<std::string, std::string>>> CatalogScan(
      absl::string_view space, absl::string_view prefix) const = 0;

  // Syncs every tier's files (called on graceful shutdown).
  virtual absl::Status Sync() = 0;
};

}  // namespace kvrecall::store
