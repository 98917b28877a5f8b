#pragma once

// DiskTier: spans in append-only segment files (segment_format.h,
// docs/formats/segment_file.md) under one directory, with an in-memory offset
// index rebuilt on start by scanning the segments.
//
// Writes append a complete record (header, metadata with token ids, payload,
// XXH3-64 checksum) with one pwritev and publish it in the index only after
// the write returned, so no reader sees a partial record; a `sync` put is
// fdatasync'ed before it is published. Reads verify the record checksum: a
// mismatch drops the record from the index, counts it and returns DATA_LOSS.
//
// Deletion appends a tombstone record, so a deleted span stays deleted after a
// restart. Tombstones are kept while any copy of the span's record remains in
// a segment file.
//
// Capacity (bytes of live records) is kept by evicting the oldest records
// first (log order: segment, then offset). Once a closed segment's live
// fraction drops below compaction_live_fraction, a background thread copies
// its live records to the active segment (keeping their sequence numbers),
// syncs them, and removes the file. Evicted records need no tombstone: only
// the oldest, partially evicted segment can still hold them, and a record that
// reappears from it after a crash is a valid copy of its span.
//
// Recovery (Create): segments are scanned in id order. Record headers are
// checked everywhere (header checksum); in the two newest segments, where a
// crash can tear writes, whole records are verified. A torn tail is truncated;
// a corrupt record in the middle is skipped (found again by its magic) and
// counted. For every key, the record or tombstone with the highest sequence
// number wins.
//
// Locks: `write_mu_` serializes appends (and is never needed by readers);
// `mu_` guards the index and segment table and is held only for in-memory
// updates, never across I/O. Thread-safe.

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/metrics.h"
#include "service/store/segment_format.h"
#include "service/store/tier.h"

namespace kvrecall::store {

struct DiskTierOptions {
  // Directory of the segment files; created when missing. Required.
  std::string dir;
  // Bytes of live records (headers included). > 0; default 64 GiB.
  int64_t capacity_bytes = int64_t{64} << 30;
  // A segment is closed and a new one started at this size. >= 64 KiB;
  // default 256 MiB. The effective size is at most max(capacity / 4, 64 KiB),
  // so that eviction and compaction work in steps smaller than the capacity.
  int64_t segment_bytes = int64_t{256} << 20;
  // A closed segment whose live fraction drops below this is compacted. 0..1, default 0.5.
  double compaction_live_fraction = 0.5;
  // Run compaction on a background thread. When false, only CompactNow() compacts.
  bool background_compaction = true;
  // Where kvrecall_store_tier_*{tier="disk"} are registered; may be null.
  MetricsRegistry* metrics = nullptr;
};

// What recovery found in the segment files.
struct DiskRecoveryStats {
  int64_t segments = 0;             // segment files scanned
  int64_t span_records = 0;         // valid span records (live or superseded)
  int64_t tombstones = 0;           // valid tombstone records
  int64_t live_spans = 0;           // spans in the rebuilt index
  int64_t corrupt_records = 0;      // records skipped in the middle of a segment
  int64_t truncated_bytes = 0;      // torn tails cut off the end of segments
  int64_t unreadable_segments = 0;  // files with a bad segment header (renamed *.corrupt)
};

struct DiskCompactionStats {
  int64_t segments_compacted = 0;  // segments whose live records were copied, then removed
  int64_t segments_removed = 0;    // segment files removed (compacted or fully dead)
  int64_t records_copied = 0;
  int64_t bytes_reclaimed = 0;  // file bytes freed
};

class DiskTier : public Tier {
 public:
  // Opens (creating when missing) the segments under options.dir and rebuilds
  // the index. INVALID_ARGUMENT for bad options; INTERNAL for I/O errors.
  static absl::StatusOr<std::unique_ptr<DiskTier>> Create(const DiskTierOptions& options);
  // Stops the compaction thread; closes the files.
  ~DiskTier() override;

  TierId id() const override { return TierId::kDisk; }

  // Spans whose newest record recovery found corrupt (header intact, payload
  // not) and that no later read has reported yet.
  std::vector<SpanKey> RecoveredCorruptKeys() const;
  int64_t capacity_bytes() const override { return options_.capacity_bytes; }
  absl::Status Put(StoredSpanPtr span, const TierPutOptions& options,
                   std::vector<SpanKey>* victims) override;
  absl::StatusOr<StoredSpanPtr> Get(const SpanKey& key) override;
  absl::StatusOr<StoredSpanPtr> GetVictim(const SpanKey& key) override;
  bool FinishEviction(const SpanKey& key) override;
  bool Contains(const SpanKey& key) const override;
  // Writes a (synced) tombstone when any record of the key remains in a
  // segment file, even when no live one does; NOT_FOUND when none was live.
  absl::Status Delete(const SpanKey& key) override;
  void ForEachSpan(const std::function<void(const SpanKey&, const SpanMeta&)>& fn) const override;
  TierStats Stats() const override;
  // fdatasync of the active segment and fsync of the directory.
  absl::Status Sync() override;

  // Compacts (or removes, when empty) every closed segment whose live
  // fraction is below the threshold. Returns how many segments it removed.
  absl::StatusOr<int> CompactNow();

  DiskRecoveryStats recovery_stats() const;
  DiskCompactionStats compaction_stats() const;
  // Bytes of all segment files (live, dead and headers).
  int64_t file_bytes() const;
  int64_t num_segments() const;
  int64_t segment_bytes() const { return segment_bytes_; }

 private:
  struct SegmentFile;   // an open segment file, shared with readers
  struct Segment;       // bookkeeping of one segment (under mu_)
  struct RecoveryScan;  // state of Recover()
  struct Loc {
    uint64_t segment = 0;
    uint64_t offset = 0;
    uint64_t length = 0;      // record bytes
    uint64_t prefix_len = 0;  // header + meta section
    uint64_t payload_len = 0;
    uint64_t seq = 0;
  };
  struct IndexEntry {
    Loc loc;
    SpanMeta meta;  // without token ids
    bool leaving = false;
  };
  // One record of a segment file: where, what, whose.
  struct RecordRef {
    Loc loc;
    RecordKind kind;
    SpanKey key;
  };

  explicit DiskTier(const DiskTierOptions& options);
  absl::Status Recover();
  absl::Status RecoverSegment(uint64_t id, const std::string& path, bool verify_payloads,
                              RecoveryScan* scan);
  absl::Status OpenNewActiveSegment() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  // Appends one record ([a][b][c], `loc` filled but for segment and offset)
  // to the active segment, rotating first when it is full. The segment's
  // pending count is raised; Publish...Locked lowers it.
  absl::Status Append(absl::string_view a, absl::string_view b, absl::string_view c, Loc* loc,
                      std::shared_ptr<SegmentFile>* file);
  absl::StatusOr<StoredSpanPtr> ReadSpan(const std::shared_ptr<SegmentFile>& file, const Loc& loc,
                                         const SpanKey& key) const;
  // Reads, verifies and returns the span at the index entry of `key` (leaving
  // only when `victim`); drops a corrupt record.
  absl::StatusOr<StoredSpanPtr> ReadIndexed(const SpanKey& key, bool victim);

  void DropEntryLocked(const SpanKey& key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Records a written record of `key` at `loc` in its segment's table.
  void AddRefLocked(const Loc& loc, RecordKind kind, const SpanKey& key)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SelectVictimsLocked(const SpanKey& key, int64_t need, std::vector<SpanKey>* victims)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool WakeCompaction() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stopping_ || compaction_wanted_;
  }
  void AddLiveLocked(uint64_t segment, int64_t delta) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveSegmentLocked(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PublishMetricsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool WantsCompactionLocked(const Segment& s) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // True when `r`, a record of segment `id`, is the one the index (a span)
  // or the tombstone map (a tombstone) points at: compaction must keep it.
  bool IsCurrentLocked(uint64_t id, const RecordRef& r) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Copies the current records of segment `id` into the active segment, syncs
  // the copies, then removes the segment file (*removed). No-op for a segment
  // that no longer wants compaction.
  absl::Status CompactSegment(uint64_t id, bool* removed);
  // Copies record `r` of `file` (segment `id`) to the active segment and
  // points the index or tombstone map at the copy; false when it was no longer
  // current or failed its checksum (then dropped and remembered as lost).
  // `written`: the files written to, to sync.
  absl::StatusOr<bool> MoveRecord(uint64_t id, const SegmentFile& file, const RecordRef& r,
                                  std::string* buf,
                                  std::vector<std::shared_ptr<SegmentFile>>* written);
  // Removes compacted segment `id` once no live span remains in it.
  absl::Status RemoveCompactedSegment(uint64_t id, const SegmentFile& file, bool compacted,
                                      int64_t copied, bool* removed);
  void CompactionLoop();
  absl::Status SyncDir() const;

  const DiskTierOptions options_;
  const int64_t segment_bytes_;
  mutable TierMetrics metrics_;
  std::atomic<uint64_t> next_seq_{1};

  absl::Mutex write_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  uint64_t next_segment_id_ ABSL_GUARDED_BY(write_mu_) = 1;

  absl::Mutex compact_mu_ ABSL_ACQUIRED_BEFORE(write_mu_);  // one compaction at a time

  mutable absl::Mutex mu_;
  std::map<uint64_t, std::unique_ptr<Segment>> segments_ ABSL_GUARDED_BY(mu_);
  uint64_t active_id_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<SpanKey, IndexEntry> index_ ABSL_GUARDED_BY(mu_);
  // The newest tombstone of each key that still has a record in some file.
  absl::flat_hash_map<SpanKey, Loc> tombs_ ABSL_GUARDED_BY(mu_);
  // Records of each key physically present in segment files (live or not).
  absl::flat_hash_map<SpanKey, int32_t> instances_ ABSL_GUARDED_BY(mu_);
  // Live records found corrupt by compaction or recovery: the next Get says
  // DATA_LOSS (and the store reports a checksum failure).
  absl::flat_hash_set<SpanKey> lost_ ABSL_GUARDED_BY(mu_);
  int64_t live_bytes_ ABSL_GUARDED_BY(mu_) = 0;      // live span records
  int64_t leaving_bytes_ ABSL_GUARDED_BY(mu_) = 0;   // of which leaving
  int64_t reserved_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // puts written, not yet published
  DiskRecoveryStats recovery_ ABSL_GUARDED_BY(mu_);
  DiskCompactionStats compaction_ ABSL_GUARDED_BY(mu_);
  bool compaction_wanted_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;

  std::thread compaction_thread_;
};

}  // namespace kvrecall::store
