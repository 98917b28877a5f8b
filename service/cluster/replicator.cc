#include "service/cluster/replicator.h"

#include <algorithm>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/checksum.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace kvrecall::cluster {
namespace {

// The catalog spaces replication keeps (service/retrieval's).
constexpr absl::string_view kCatalogSpaces[] = {"context", "index", "index_latest", "artifact",
                                                "tenant_artifact"};

}  // namespace

Replicator::Replicator(ClusterStore* store, Membership* membership, PeerPool* peers,
                       MetricsRegistry* metrics, const ReplicatorOptions& options)
    : store_(store), membership_(membership), peers_(peers), options_(options) {
  auto gauge = [&](int i, const char* name) {
    return metrics == nullptr ? &own_gauges_[i] : metrics->GetGauge(name);
  };
  auto counter = [&](int i, const char* name) {
    return metrics == nullptr ? &own_counters_[i] : metrics->GetCounter(name);
  };
  debt_gauge_ = gauge(0, "kvrecall_cluster_replication_debt_spans");
  misplaced_gauge_ = gauge(1, "kvrecall_cluster_misplaced_spans");
  progress_gauge_ = gauge(2, "kvrecall_cluster_sweep_progress_permille");
  replicated_spans_ = counter(0, "kvrecall_cluster_replicated_spans_total");
  replicated_bytes_ = counter(1, "kvrecall_cluster_replicated_bytes_total");
  moved_spans_ = counter(2, "kvrecall_cluster_moved_spans_total");
  sweeps_ = counter(3, "kvrecall_cluster_sweeps_total");
  membership_->AddListener([this](const MembershipViewPtr&) { Trigger(); });
}

Replicator::~Replicator() { Stop(); }

void Replicator::Start() {
  absl::MutexLock lock(&mu_);
  if (running_) return;
  running_ = true;
  triggered_ = true;
  thread_ = std::thread([this] { Loop(); });
}

void Replicator::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void Replicator::Trigger() {
  absl::MutexLock lock(&mu_);
  triggered_ = true;
}

v1::ReplicationStats Replicator::Stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

void Replicator::Loop() {
  absl::Duration wait = absl::ZeroDuration();
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || triggered_; };
      mu_.AwaitWithTimeout(absl::Condition(&wake), wait);
      if (stop_) return;
      if (triggered_) {
        // Let a burst of membership changes settle.
        triggered_ = false;
        auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_; };
        mu_.AwaitWithTimeout(absl::Condition(&stop), options_.settle);
        if (stop_) return;
        triggered_ = false;
      }
    }
    absl::Status st = SweepOnce();
    if (!st.ok()) KVR_LOG(WARNING) << "cluster: replication sweep: " << st;
    v1::ReplicationStats s = Stats();
    wait = (!st.ok() || s.debt_spans() > 0 || s.misplaced_spans() > 0 || s.failed_copies() > 0)
               ? options_.retry_after
               : options_.interval;
  }
}

absl::Status Replicator::SweepOnce() {
  absl::MutexLock sweep(&sweep_mu_);
  const MembershipViewPtr view = membership_->view();
  if (!view->IsLive(membership_->node_id())) return absl::OkStatus();  // not joined (yet)
  const absl::Time start = absl::Now();
  SweepResult result;
  absl::Status spans = SweepSpans(*view, &result);
  absl::Status catalog = SweepCatalog(*view, &result);
  const int64_t ms = absl::ToInt64Milliseconds(absl::Now() - start);
  {
    absl::MutexLock lock(&mu_);
    stats_.set_debt_spans(result.debt);
    stats_.set_misplaced_spans(result.misplaced);
    stats_.set_sweeps(stats_.sweeps() + 1);
    stats_.set_last_sweep_ms(ms);
    stats_.set_sweep_checked(0);
    stats_.set_sweep_total(0);
    stats_.set_failed_copies(result.failed);
  }
  debt_gauge_->Set(result.debt);
  misplaced_gauge_->Set(result.misplaced);
  progress_gauge_->Set(1000);
  sweeps_->Increment();
  if (result.debt > 0 || result.misplaced > 0 || result.failed > 0) {
    KVR_LOG(INFO) << "cluster: sweep in " << ms << " ms left " << result.debt
                  << " spans short of replicas, " << result.misplaced << " misplaced, "
                  << result.failed << " failed copies; retrying";
  }
  KVR_RETURN_IF_ERROR(spans);
  return catalog;
}

absl::Status Replicator::SweepSpans(const MembershipView& view, SweepResult* result) {
  store::TieredStore* local = store_->local();
  std::vector<store::SpanListing> spans = local->ListSpans();
  const std::string& self = membership_->node_id();
  const int64_t total = static_cast<int64_t>(spans.size());
  {
    absl::MutexLock lock(&mu_);
    stats_.set_sweep_total(total);
    stats_.set_sweep_checked(0);
  }
  // Tenant by tenant, in batches.
  std::sort(spans.begin(), spans.end(), [](const auto& a, const auto& b) {
    return a.key.tenant != b.key.tenant ? a.key.tenant < b.key.tenant : a.key.hash < b.key.hash;
  });
  const size_t batch = static_cast<size_t>(std::max(1, options_.batch_spans));
  int64_t checked = 0;
  for (size_t begin = 0; begin < spans.size();) {
    {
      absl::MutexLock lock(&mu_);
      if (stop_) return absl::CancelledError("stopping");
    }
    size_t end = begin;
    while (end < spans.size() && end - begin < batch &&
           spans[end].key.tenant == spans[begin].key.tenant) {
      ++end;
    }
    const std::string& tenant = spans[begin].key.tenant;
    const size_t n = end - begin;
    // Owners of each span, and the spans each other owner should hold.
    std::vector<std::vector<std::string>> owners(n);
    std::vector<bool> self_owner(n);
    std::map<std::string, std::vector<size_t>> ask;  // node -> span indexes
    for (size_t i = 0; i < n; ++i) {
      owners[i] = view.Owners(spans[begin + i].key.hash);
      for (const std::string& o : owners[i]) {
        if (o == self) {
          self_owner[i] = true;
        } else {
          ask[o].push_back(i);
        }
      }
    }
    std::vector<int> holders(n, 0);
    std::vector<bool> deleted(n, false);
    std::vector<bool> unknown(n, false);  // an owner did not answer
    std::map<std::string, std::vector<size_t>> lacking;  // node -> span indexes to copy
    for (size_t i = 0; i < n; ++i) holders[i] = self_owner[i] ? 1 : 0;
    for (const auto& [node, idx] : ask) {
      const v1::NodeInfo* info = view.Find(node);
      if (info == nullptr) continue;
      std::vector<Hash128> hashes;
      for (size_t i : idx) hashes.push_back(spans[begin + i].key.hash);
      absl::StatusOr<std::vector<PeerProbe>> probe =
          peers_->ProbeSpans(info->address(), tenant, "", hashes);
      if (!probe.ok()) {
        for (size_t i : idx) unknown[i] = true;
        ++result->failed;
        continue;
      }
      for (size_t j = 0; j < idx.size(); ++j) {
        const PeerProbe& p = (*probe)[j];
        if (p.found) {
          ++holders[idx[j]];
        } else if (p.miss == store::MissReason::kDeleted) {
          deleted[idx[j]] = true;
        } else {
          lacking[node].push_back(idx[j]);
        }
      }
    }
    // Reconciliation: no owner holds it and one recorded a deletion.
    std::vector<bool> gone(n, false);
    for (size_t i = 0; i < n; ++i) {
      const int owners_holding = holders[i] - (self_owner[i] ? 1 : 0);
      if (deleted[i] && owners_holding == 0 && !unknown[i]) {
        absl::Status st = local->Delete(spans[begin + i].key);
        if (st.ok() || st.code() == absl::StatusCode::kNotFound) {
          gone[i] = true;
          absl::MutexLock lock(&mu_);
          stats_.set_reconciled_deletes(stats_.reconciled_deletes() + 1);
        }
      }
    }
    // Copies to the owners that lack them.
    for (auto& [node, idx] : lacking) {
      const v1::NodeInfo* info = view.Find(node);
      if (info == nullptr) continue;
      std::vector<store::StoredSpanPtr> pending;
      std::vector<size_t> pending_idx;
      int64_t pending_bytes = 0;
      auto flush = [&]() {
        if (pending.empty()) return;
        absl::Status st = peers_->StoreSpans(info->address(), pending, nullptr, nullptr);
        if (st.ok()) {
          replicated_spans_->Increment(static_cast<int64_t>(pending.size()));
          replicated_bytes_->Increment(pending_bytes);
          absl::MutexLock lock(&mu_);
          stats_.set_replicated_spans(stats_.replicated_spans() +
                                      static_cast<int64_t>(pending.size()));
          stats_.set_replicated_bytes(stats_.replicated_bytes() + pending_bytes);
          for (size_t i : pending_idx) ++holders[i];
        } else {
          KVR_LOG(WARNING) << "cluster: copying " << pending.size() << " spans to " << node
                           << ": " << st;
          result->failed += static_cast<int64_t>(pending.size());
        }
        pending.clear();
        pending_idx.clear();
        pending_bytes = 0;
      };
      for (size_t i : idx) {
        if (gone[i]) continue;
        const store::SpanListing& s = spans[begin + i];
        store::GetResult got = local->Get(s.key, s.model_id);
        if (got.span == nullptr) continue;  // evicted or deleted meanwhile
        pending_bytes += static_cast<int64_t>(got.span->payload.size());
        pending.push_back(std::move(got.span));
        pending_idx.push_back(i);
        if (pending.size() >= batch ||
            pending_bytes >= options_.batch_bytes) {
          flush();
        }
      }
      flush();
    }
    // Moves, debt.
    for (size_t i = 0; i < n; ++i) {
      if (gone[i]) continue;
      const size_t want = owners[i].size();
      const int owners_holding = holders[i];
      if (!self_owner[i]) {
        if (static_cast<size_t>(owners_holding) >= want && want > 0 && !unknown[i]) {
          absl::Status st = local->Drop(spans[begin + i].key);
          if (st.ok()) {
            moved_spans_->Increment();
            absl::MutexLock lock(&mu_);
            stats_.set_moved_spans(stats_.moved_spans() + 1);
          }
        } else {
          ++result->misplaced;
        }
      } else if (static_cast<size_t>(owners_holding) < want) {
        ++result->debt;
      }
    }
    checked += static_cast<int64_t>(n);
    {
      absl::MutexLock lock(&mu_);
      stats_.set_sweep_checked(checked);
    }
    progress_gauge_->Set(total == 0 ? 1000 : checked * 1000 / total);
    begin = end;
  }
  return absl::OkStatus();
}

absl::Status Replicator::SweepCatalog(const MembershipView& view, SweepResult* result) {
  store::TieredStore* local = store_->local();
  const std::string& self = membership_->node_id();
  // What each other live node holds, per space: key -> checksum.
  for (absl::string_view space : kCatalogSpaces) {
    absl::StatusOr<std::vector<std::pair<std::string, std::string>>> entries =
        local->CatalogScan(space, "");
    if (!entries.ok()) return entries.status();
    if (entries->empty()) continue;
    absl::flat_hash_map<std::string, absl::flat_hash_map<std::string, uint64_t>> held;
    absl::flat_hash_map<std::string, bool> reachable;
    for (const v1::NodeInfo& n : view.nodes) {
      if (!n.live() || n.node_id() == self) continue;
      v1::CatalogReadRequest request;
      request.set_space(std::string(space));
      request.set_prefix(true);
      request.set_checksums_only(true);
      absl::StatusOr<std::vector<v1::CatalogEntry>> got = peers_->CatalogRead(n.address(), request);
      reachable[n.node_id()] = got.ok();
      if (!got.ok()) {
        ++result->failed;
        continue;
      }
      auto& keys = held[n.node_id()];
      for (const v1::CatalogEntry& e : *got) keys[e.key()] = e.checksum();
    }
    std::map<std::string, v1::CatalogWriteRequest> copies;
    for (const auto& [key, value] : *entries) {
      std::vector<std::string> targets;
      std::optional<Hash128> placement = CatalogPlacementKey(space, key);
      if (placement.has_value()) {
        targets = view.Owners(*placement);
      } else {
        targets = view.live_ids;
      }
      for (const std::string& t : targets) {
        if (t == self || !reachable[t]) continue;
        if (held[t].contains(key)) continue;  // present (never overwritten)
        v1::CatalogEntry* e = copies[t].add_entries();
        e->set_space(std::string(space));
        e->set_key(key);
        e->set_value(value);
      }
    }
    for (auto& [node, request] : copies) {
      const v1::NodeInfo* info = view.Find(node);
      if (info == nullptr) continue;
      absl::Status st = peers_->CatalogWrite(info->address(), request);
      if (!st.ok()) {
        result->failed += request.entries_size();
        continue;
      }
      absl::MutexLock lock(&mu_);
      stats_.set_replicated_catalog_entries(stats_.replicated_catalog_entries() +
                                            request.entries_size());
    }
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::cluster
