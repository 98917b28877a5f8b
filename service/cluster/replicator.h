#pragma once

// Replicator: the background replication of one cluster node
// (docs/cluster.md). A sweep goes over every span this node holds and, with
// the membership of the moment:
//
//   - asks the span's live owners (one ProbeSpans per node and batch)
//     whether they hold it;
//   - copies it to every owner that lacks it (re-replication after a node
//     died; spans handed to a node that joined);
//   - drops this node's copy when placement no longer puts it here and every
//     owner holds it (rebalancing: the span moved);
//   - deletes this node's copy when no owner holds it and one recorded its
//     deletion (this node was away when it was deleted: reconciliation).
//
// Catalog entries (contexts, index payloads, artifacts) are copied to the
// nodes that lack them, never overwriting a different value.
//
// A sweep starts after every membership change, every `interval`, and
// sooner (`retry_after`) when the last one left copies undone. Progress and
// counters are in Stats() (Cluster.GetNodeStatus, Admin.Stats) and metrics.
//
// Thread-safe.

#include <cstdint>
#include <memory>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "kvrecall/v1/cluster.pb.h"
#include "service/cluster/cluster_store.h"
#include "service/cluster/membership.h"
#include "service/cluster/peers.h"

namespace kvrecall::cluster {

struct ReplicatorOptions {
  // --replication_interval_s: time between sweeps without a membership change.
  absl::Duration interval = absl::Seconds(30);
  // Time before another sweep when the last left copies undone.
  absl::Duration retry_after = absl::Seconds(2);
  // Wait after a membership change before sweeping (changes come in bursts).
  absl::Duration settle = absl::Milliseconds(200);
  // Spans per probe and per copy call; bytes per copy call.
  int32_t batch_spans = 256;
  int64_t batch_bytes = int64_t{64} << 20;
};

class Replicator {
 public:
  // No pointer is owned; all must outlive the replicator. `metrics` may be null.
  Replicator(ClusterStore* store, Membership* membership, PeerPool* peers,
             MetricsRegistry* metrics, const ReplicatorOptions& options);
  ~Replicator();

  // Starts the sweeping thread (and a first sweep). Stop() joins it.
  void Start() ABSL_LOCKS_EXCLUDED(mu_);
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);
  // Asks for a sweep soon.
  void Trigger() ABSL_LOCKS_EXCLUDED(mu_);
  // Runs one sweep on the calling thread (tests, tools).
  absl::Status SweepOnce();

  v1::ReplicationStats Stats() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct SweepResult {
    int64_t debt = 0;
    int64_t misplaced = 0;
    int64_t failed = 0;
  };
  void Loop();
  absl::Status SweepSpans(const MembershipView& view, SweepResult* result);
  absl::Status SweepCatalog(const MembershipView& view, SweepResult* result);

  ClusterStore* const store_;
  Membership* const membership_;
  PeerPool* const peers_;
  const ReplicatorOptions options_;

  mutable absl::Mutex mu_;
  bool running_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool triggered_ ABSL_GUARDED_BY(mu_) = false;
  v1::ReplicationStats stats_ ABSL_GUARDED_BY(mu_);
  absl::Mutex sweep_mu_;  // one sweep at a time
  std::thread thread_;

  Gauge own_gauges_[3];
  Counter own_counters_[4];
  Gauge* debt_gauge_;
  Gauge* misplaced_gauge_;
  Gauge* progress_gauge_;  // per mille of the sweep running now
  Counter* replicated_spans_;
  Counter* replicated_bytes_;
  Counter* moved_spans_;
  Counter* sweeps_;
};

}  // namespace kvrecall::cluster
