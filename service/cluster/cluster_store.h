#pragma once

// ClusterStore: the TieredStore a cluster node serves its RPCs from
// (docs/cluster.md). It wraps the node's local store and makes the cluster
// look like one store, so KvStore and Retrieval work unchanged on any node
// (a node that receives a call it does not own forwards it this way):
//
//   Put     checks the parent against the cluster (root, this node, a span
//           this node stored recently, or the parent's owners), then stores
//           the span on its R owners among the live nodes (rendezvous
//           order); an owner that fails is replaced by the next node in the
//           order. Acknowledged once at least one copy is stored; copies
//           short of min(R, live nodes) are counted as replication debt and
//           made by the background replication (replicator.h).
//   Get     this node, then the owners in order, then the owners under
//           recent earlier memberships (spans still moving after a node
//           joined). A miss combines what every node said: a definitive
//           reason (model mismatch, deleted, checksum failure) first, then
//           owner_unavailable when a node placed to hold the span is down,
//           then evicted, other namespace, never stored.
//   Lookup  the same per span, in parallel over the owners.
//   Delete  on every live node (stray copies included); Pin/Unpin on the
//           first owner that holds the span.
//   Models  registered in etcd (cluster-wide), then locally; an unknown
//           model is looked up in etcd before NOT_FOUND.
//   Catalog contexts and their indexes are written to the owners of the
//           context id; other spaces (artifacts) to every live node. Reads
//           fall back to those nodes.
//
// Thread-safe.

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "common/thread_pool.h"
#include "service/cluster/membership.h"
#include "service/cluster/peers.h"
#include "service/store/tiered_store.h"

namespace kvrecall::cluster {

// The placement key of a catalog entry: the context id for the spaces of
// contexts and indexes ("context", "index", "index_latest"; keys as in
// docs/formats/retrieval_catalog.md), nullopt for the spaces every node
// keeps (artifacts, ...).
std::optional<Hash128> CatalogPlacementKey(absl::string_view space, absl::string_view key);

struct ClusterStoreOptions {
  // Spans this node stored recently, remembered for the parent check of the
  // next spans of the same chain. Default 65536.
  int64_t recent_puts = 65536;
  // Earlier memberships whose owners reads also ask (during rebalancing).
  int32_t recent_views = 4;
  // After a change of the live nodes, reads that miss on a span's owners
  // ask every live node for this long (the background sweep has handed
  // every copy to its owners by then). Default 60 s.
  absl::Duration widen_reads_after_change = absl::Seconds(60);
  // Threads for parallel probes and catalog fan-out. Default 4.
  int32_t fanout_threads = 4;
};

// Counters of the cluster data path (Stats, metrics).
struct ClusterStoreCounters {
  Counter* remote_puts = nullptr;      // copies stored on other nodes by Put
  Counter* remote_reads = nullptr;     // spans read from other nodes by Get
  Counter* short_puts = nullptr;       // puts acknowledged with fewer than min(R, live) copies
  Counter* failed_peer_calls = nullptr;
};

class ClusterStore final : public store::TieredStore {
 public:
  // None of the pointers is owned except `local`; `membership` and `peers`
  // must outlive the store. `metrics` may be null.
  ClusterStore(std::unique_ptr<store::TieredStore> local, Membership* membership, PeerPool* peers,
               MetricsRegistry* metrics, const ClusterStoreOptions& options);
  ~ClusterStore() override;

  // The node's own store (what ClusterPeer serves).
  store::TieredStore* local() const { return local_.get(); }
  // Registers a model published in etcd locally (the membership's model
  // listener); OK when already registered.
  absl::Status RegisterLocally(const v1::ModelGeometry& model);
  // Makes sure `model_id` is registered locally, reading etcd when needed.
  absl::Status EnsureModel(absl::string_view model_id);

  absl::Status RegisterModel(const store::ModelGeometry& geometry) override;
  absl::StatusOr<store::ModelGeometry> GetModel(absl::string_view model_id) const override;
  std::vector<store::ModelGeometry> ListModels() const override;
  absl::StatusOr<store::PutOutcome> Put(store::StoredSpan span,
                                        const store::PutOptions& options) override;
  store::GetResult Get(const store::SpanKey& key, absl::string_view model_id) override;
  store::LookupResult Lookup(absl::string_view tenant, absl::string_view model_id,
                             absl::Span<const Hash128> chain) override;
  absl::Status Delete(const store::SpanKey& key) override;
  absl::Status Drop(const store::SpanKey& key) override { return local_->Drop(key); }
  std::vector<store::SpanListing> ListSpans() const override { return local_->ListSpans(); }
  absl::Status Pin(const store::SpanKey& key, absl::Duration ttl) override;
  absl::Status Unpin(const store::SpanKey& key) override;
  store::StoreStats Stats() const override { return local_->Stats(); }
  absl::Status CatalogPut(absl::string_view space, absl::string_view key,
                          absl::string_view value) override;
  absl::StatusOr<std::string> CatalogGet(absl::string_view space,
                                         absl::string_view key) const override;
  absl::Status CatalogDelete(absl::string_view space, absl::string_view key) override;
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> CatalogScan(
      absl::string_view space, absl::string_view prefix) const override {
    return local_->CatalogScan(space, prefix);
  }
  absl::Status Sync() override { return local_->Sync(); }

  // Copies of puts acknowledged short of min(R, live nodes) since start.
  int64_t short_puts() const { return counters_.short_puts->value(); }

 private:
  struct Candidate {
    std::string node_id;
    std::string address;
  };
  // The nodes to ask for `key`, best first: the live owners, then owners
  // under recent memberships, then (`widen`) every other live node; this
  // node excluded.
  std::vector<Candidate> ReadCandidates(const MembershipView& view, const Hash128& key,
                                        bool widen = false) const ABSL_LOCKS_EXCLUDED(views_mu_);
  // Whether the live nodes changed (or this node started) within
  // options_.widen_reads_after_change: copies may still sit on nodes that
  // are not owners (put while an owner was down, not handed over yet), so
  // reads that miss on the owners ask every live node.
  bool RecentlyChanged() const ABSL_LOCKS_EXCLUDED(views_mu_);
  // Whether a node placed to hold `key` (had every known node been live) is
  // down or did not answer.
  static bool OwnerDown(const MembershipView& view, const Hash128& key,
                        const std::vector<std::string>& unreachable);
  static store::MissReason Combine(const std::vector<store::MissReason>& reasons, bool owner_down);
  absl::Status CheckParent(const store::StoredSpan& span, const store::ModelGeometry& model,
                           const store::PutOptions& options, const MembershipView& view);
  void Remember(const store::SpanKey& key) ABSL_LOCKS_EXCLUDED(recent_mu_);
  bool Remembered(const store::SpanKey& key) const ABSL_LOCKS_EXCLUDED(recent_mu_);
  void OnViewChange(const MembershipViewPtr& view) ABSL_LOCKS_EXCLUDED(views_mu_);
  // The nodes a catalog entry goes to (this node excluded).
  std::vector<Candidate> CatalogTargets(const MembershipView& view, absl::string_view space,
                                        absl::string_view key) const;
  absl::Status CatalogFanOut(const MembershipView& view, const v1::CatalogEntry& entry);
  bool IsSelf(absl::string_view node) const { return node == self_; }

  const std::unique_ptr<store::TieredStore> local_;
  Membership* const membership_;
  PeerPool* const peers_;
  const ClusterStoreOptions options_;
  const std::string self_;
  ClusterStoreCounters counters_;
  Counter own_counters_[4];

  mutable absl::Mutex recent_mu_;
  absl::flat_hash_set<store::SpanKey> recent_ ABSL_GUARDED_BY(recent_mu_);
  absl::flat_hash_set<store::SpanKey> recent_old_ ABSL_GUARDED_BY(recent_mu_);

  mutable absl::Mutex views_mu_;
  std::deque<MembershipViewPtr> previous_views_ ABSL_GUARDED_BY(views_mu_);
  MembershipViewPtr last_view_ ABSL_GUARDED_BY(views_mu_);
  absl::Time last_change_ ABSL_GUARDED_BY(views_mu_) = absl::Now();

  std::unique_ptr<ThreadPool> fanout_;
};

}  // namespace kvrecall::cluster
