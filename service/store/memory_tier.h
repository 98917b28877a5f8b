#pragma once

// MemoryTier: spans held in process memory as shared StoredSpanPtr, so a
// reader keeps the bytes alive without a copy even after the span is evicted.
//
// Sharded by span hash (lock striping); each shard owns capacity/shards bytes
// of payload and evicts by **segmented LRU** (SLRU): a new span enters the
// probationary segment; a hit there moves it to the protected segment (at most
// protected_fraction of the shard); the protected segment's least recently
// used span falls back to probation; victims come from the probationary LRU
// end first. A scan of one-time reads (a long prompt read once, a bulk load)
// then only cycles the probationary segment and cannot flush the spans that
// are read repeatedly, which plain LRU would.
//
// Pins: a pinned span is never chosen as a victim. Pins nest (each Pin()
// needs one Unpin()) and each may carry a deadline; an expired pin is released
// lazily, the next time the shard is written or asked about pins. Unpin()
// releases the pin with the latest deadline first (an unbounded one before any
// bounded one), so a client that pinned forever and a client that pinned with a
// TTL both get what they asked for. Pinned bytes of a shard never exceed its
// capacity.
//
// No I/O is done under a shard lock; the shard lock is held only for map and
// list updates. Thread-safe.

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "service/store/tier.h"

namespace kvrecall::store {

struct MemoryTierOptions {
  // Bytes of span payload held. > 0; default 4 GiB.
  int64_t capacity_bytes = int64_t{4} << 30;
  // Independent shards, each with capacity_bytes / shards. 1..256, default 16.
  int32_t shards = 16;
  // Share of a shard's capacity for the protected SLRU segment. 0..1, default 0.8.
  double protected_fraction = 0.8;
  // Per-tenant quotas, bytes; 0 (default): none. tenant_capacity_bytes:
  // payload one tenant holds here, enforced per shard (capacity / shards
  // each): a tenant at its share makes room by evicting its own least
  // recently used spans, never another tenant's. tenant_pinned_bytes:
  // payload one tenant holds pinned (RESOURCE_EXHAUSTED past it).
  int64_t tenant_capacity_bytes = 0;
  int64_t tenant_pinned_bytes = 0;
  // Time source for pin deadlines. Empty: absl::Now.
  std::function<absl::Time()> clock;
  // Where kvrecall_store_tier_*{tier="memory"} are registered; may be null.
  MetricsRegistry* metrics = nullptr;
};

class MemoryTier : public Tier {
 public:
  // INVALID_ARGUMENT for out-of-range options.
  static absl::StatusOr<std::unique_ptr<MemoryTier>> Create(const MemoryTierOptions& options);
  ~MemoryTier() override;

  TierId id() const override { return TierId::kMemory; }
  int64_t capacity_bytes() const override { return options_.capacity_bytes; }
  // RESOURCE_EXHAUSTED also when the span is larger than one shard's capacity.
  absl::Status Put(StoredSpanPtr span, const TierPutOptions& options,
                   std::vector<SpanKey>* victims) override;
  absl::StatusOr<StoredSpanPtr> Get(const SpanKey& key) override;
  absl::StatusOr<StoredSpanPtr> GetVictim(const SpanKey& key) override;
  bool FinishEviction(const SpanKey& key) override;
  bool Contains(const SpanKey& key) const override;
  absl::Status Delete(const SpanKey& key) override;
  void ForEachSpan(const std::function<void(const SpanKey&, const SpanMeta&)>& fn) const override;
  TierStats Stats() const override;
  absl::Status Sync() override { return absl::OkStatus(); }

  // Adds a pin, expiring at `deadline` (InfiniteFuture: never). A leaving span
  // is rescued (it stays). NOT_FOUND when the span is not in memory;
  // RESOURCE_EXHAUSTED when its shard's pinned bytes would exceed the shard's
  // capacity.
  absl::Status Pin(const SpanKey& key, absl::Time deadline);
  // Releases one pin. NOT_FOUND when not in memory; FAILED_PRECONDITION when
  // it holds no (unexpired) pin.
  absl::Status Unpin(const SpanKey& key);
  // Spans holding at least one unexpired pin (releases expired pins first).
  int64_t PinnedSpans();
  // Unexpired pins held on `key` (0 when absent).
  int32_t PinCount(const SpanKey& key);

  int64_t shard_capacity_bytes() const { return shard_capacity_; }
  // Payload `tenant` holds pinned now (expired pins may still count until
  // their shard is next touched).
  int64_t TenantPinnedBytes(const std::string& tenant) const;

 private:
  struct Entry;
  struct Shard;
  // Pinned bytes per tenant over every shard. Thread-safe.
  struct PinLedger {
    mutable absl::Mutex mu;  // taken under a shard lock, never the reverse
    absl::flat_hash_map<std::string, int64_t> bytes ABSL_GUARDED_BY(mu);
    void Add(const std::string& tenant, int64_t n) ABSL_LOCKS_EXCLUDED(mu);
    int64_t Get(const std::string& tenant) const ABSL_LOCKS_EXCLUDED(mu);
  };

  explicit MemoryTier(const MemoryTierOptions& options);
  Shard& ShardFor(const SpanKey& key) const;
  absl::Time Now() const;

  const MemoryTierOptions options_;
  const int64_t shard_capacity_;
  const int64_t protected_capacity_;
  const int64_t tenant_shard_capacity_;  // 0: no per-tenant quota
  PinLedger pins_;
  std::unique_ptr<Shard[]> shards_;
  mutable TierMetrics metrics_;
};

}  // namespace kvrecall::store
