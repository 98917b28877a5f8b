#pragma once

// The interface every storage tier of the TieredStore implements (MemoryTier,
// DiskTier, RocksDbTier), and the per-tier counters they share.
//
// A tier stores complete spans (StoredSpan: key, metadata and the whole
// payload) and nothing else: it never sees a half-built span, and a span it
// holds becomes readable only once all of its bytes are stored and, on the
// persistent tiers, checksummed.
//
// Capacity and demotion. Put() may have to make room. The tier then picks
// *victims* (its eviction policy decides which), marks them as leaving and
// returns their keys; a leaving span stays readable from the tier until the
// caller calls FinishEviction(). The caller (the TieredStore) reads each
// victim with GetVictim(), copies it to the next tier down when no lower tier
// holds it yet, and only then finishes the eviction, so a reader never finds a
// span in no tier while it moves. No tier calls back into its caller, and no
// tier holds its own locks while the caller copies a victim.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/metrics.h"
#include "service/store/span.h"
#include "service/store/tiered_store.h"

namespace kvrecall::store {

// Options of one Tier::Put().
struct TierPutOptions {
  // Make the span persistent (fdatasync / synced WAL) before returning.
  // Ignored by the memory tier.
  bool sync = false;
  // Why the span arrives, for the promotion / demotion counters.
  enum class Origin : uint8_t { kWrite, kPromotion, kDemotion };
  Origin origin = Origin::kWrite;
};

// The counters of one tier: hits, misses, evictions, promotions, demotions,
// checksum failures, and gauges of bytes, spans and capacity. Registered in a
// MetricsRegistry as kvrecall_store_tier_*{tier="..."} when one is given,
// else owned privately. Lock-free. Thread-safe.
class TierMetrics {
 public:
  // `registry` may be null; when not null it must outlive this object.
  TierMetrics(TierId tier, int64_t capacity_bytes, MetricsRegistry* registry);
  TierMetrics(const TierMetrics&) = delete;
  TierMetrics& operator=(const TierMetrics&) = delete;

  Counter* hits;
  Counter* misses;
  Counter* evictions;
  Counter* promotions;
  Counter* demotions;
  Counter* checksum_failures;
  Gauge* bytes;
  Gauge* spans;
  Gauge* capacity_bytes;

  // Counts one arrival of `origin` (promotion or demotion; writes count nothing).
  void CountOrigin(TierPutOptions::Origin origin);
  TierStats Snapshot() const;

 private:
  TierId tier_;
  std::unique_ptr<Counter[]> own_counters_;  // [6] when no registry is given
  std::unique_ptr<Gauge[]> own_gauges_;      // [3] when no registry is given
};

// One storage tier; every implementation must be safe to call from many
// threads at once. Thread-safe.
class Tier {
 public:
  virtual ~Tier() = default;

  virtual TierId id() const = 0;
  // Bytes this tier may hold (its own unit: payload bytes in memory, record
  // bytes on disk, compressed payload bytes in RocksDB).
  virtual int64_t capacity_bytes() const = 0;

  // Stores `span` (complete; its payload checksum already verified by the
  // caller), replacing a span under the same key. On success the span is
  // readable, and `victims` (cleared first) lists the spans this tier chose to
  // give up for room: they stay readable until FinishEviction(). The tier may
  // exceed its capacity by the bytes of spans still leaving.
  // RESOURCE_EXHAUSTED when the span cannot fit even after evicting every
  // evictable span; INTERNAL / DATA_LOSS on I/O errors. On error nothing changed.
  virtual absl::Status Put(StoredSpanPtr span, const TierPutOptions& options,
                           std::vector<SpanKey>* victims) = 0;

  // Reads a span (a leaving one too) and counts a hit or a miss. NOT_FOUND
  // when absent; DATA_LOSS when its record fails verification: the record is
  // then dropped from the tier and counted, and never served.
  virtual absl::StatusOr<StoredSpanPtr> Get(const SpanKey& key) = 0;

  // Reads a span that Put() returned as a victim and that is still leaving;
  // counts no hit. NOT_FOUND when it is no longer leaving (deleted, replaced,
  // rescued or already evicted); DATA_LOSS as for Get().
  virtual absl::StatusOr<StoredSpanPtr> GetVictim(const SpanKey& key) = 0;

  // Completes the eviction of a leaving victim: it leaves the tier and is
  // counted as evicted. Returns false (and changes nothing) when the key is not
  // leaving any more.
  virtual bool FinishEviction(const SpanKey& key) = 0;

  // Whether the tier holds a readable span under `key` (no payload read).
  virtual bool Contains(const SpanKey& key) const = 0;

  // Removes the span; persistent tiers record the deletion so that it stays
  // deleted after a restart. NOT_FOUND when the tier holds no such span.
  virtual absl::Status Delete(const SpanKey& key) = 0;

  // Calls `fn` with the key and metadata (without token ids) of every span
  // held, in no particular order. Used to rebuild the store's directory on
  // open; `fn` must not call back into the tier.
  virtual void ForEachSpan(
      const std::function<void(const SpanKey&, const SpanMeta&)>& fn) const = 0;

  virtual TierStats Stats() const = 0;

  // Makes everything written so far persistent (no-op in memory).
  virtual absl::Status Sync() = 0;
};

}  // namespace kvrecall::store
