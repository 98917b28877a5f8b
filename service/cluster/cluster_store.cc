#include "service/cluster/cluster_store.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/blocking_counter.h"
#include "common/logging.h"
#include "common/span_hash.h"
#include "common/status_macros.h"
#include "service/rpc/proto_convert.h"
#include "service/store/codec.h"

namespace kvrecall::cluster {
namespace {

// A status that says the node, not the request, failed: another node may
// take the call.
bool IsNodeFailure(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnauthenticated:  // a misconfigured peer token
      return true;
    default:
      return false;
  }
}

// Priority of miss reasons when nodes disagree (lower wins).
int Rank(store::MissReason r) {
  switch (r) {
    case store::MissReason::kModelMismatch:
      return 0;
    case store::MissReason::kDeleted:
      return 1;
    case store::MissReason::kChecksumFailure:
      return 2;
    case store::MissReason::kOwnerUnavailable:
      return 3;
    case store::MissReason::kEvicted:
      return 4;
    case store::MissReason::kOtherNamespace:
      return 5;
    default:
      return 6;
  }
}

}  // namespace

std::optional<Hash128> CatalogPlacementKey(absl::string_view space, absl::string_view key) {
  const size_t nul = key.find('\0');
  if (nul == absl::string_view::npos) return std::nullopt;
  const absl::string_view rest = key.substr(nul + 1);
  if (space == "context") {
    if (rest.size() != 16) return std::nullopt;
    absl::StatusOr<Hash128> h = Hash128::FromBytes(rest);
    return h.ok() ? std::optional<Hash128>(*h) : std::nullopt;
  }
  if (space == "index" || space == "index_latest") {
    if (rest.size() < 32) return std::nullopt;
    absl::StatusOr<Hash128> h = Hash128::FromHex(rest.substr(0, 32));
    return h.ok() ? std::optional<Hash128>(*h) : std::nullopt;
  }
  return std::nullopt;
}

ClusterStore::ClusterStore(std::unique_ptr<store::TieredStore> local, Membership* membership,
                           PeerPool* peers, MetricsRegistry* metrics,
                           const ClusterStoreOptions& options)
    : local_(std::move(local)),
      membership_(membership),
      peers_(peers),
      options_(options),
      self_(membership->node_id()),
      fanout_(std::make_unique<ThreadPool>(std::max(1, options.fanout_threads))) {
  auto counter = [&](int i, const char* name) {
    return metrics == nullptr ? &own_counters_[i] : metrics->GetCounter(name);
  };
  counters_.remote_puts = counter(0, "kvrecall_cluster_remote_copies_total");
  counters_.remote_reads = counter(1, "kvrecall_cluster_remote_reads_total");
  counters_.short_puts = counter(2, "kvrecall_cluster_short_puts_total");
  counters_.failed_peer_calls = counter(3, "kvrecall_cluster_failed_peer_calls_total");
  {
    absl::MutexLock lock(&views_mu_);
    last_view_ = membership_->view();
  }
  membership_->AddListener([this](const MembershipViewPtr& v) { OnViewChange(v); });
}

ClusterStore::~ClusterStore() { fanout_.reset(); }

void ClusterStore::OnViewChange(const MembershipViewPtr& view) {
  absl::MutexLock lock(&views_mu_);
  if (last_view_ != nullptr && last_view_->live_ids != view->live_ids) {
    previous_views_.push_front(last_view_);
    last_change_ = absl::Now();
    while (previous_views_.size() > static_cast<size_t>(std::max(0, options_.recent_views))) {
      previous_views_.pop_back();
    }
  }
  last_view_ = view;
}

// ---------------------------------------------------------------- models

absl::Status ClusterStore::RegisterLocally(const v1::ModelGeometry& model) {
  KVR_ASSIGN_OR_RETURN(store::ModelGeometry g, rpc::GeometryFromProto(model));
  absl::Status st = local_->RegisterModel(g);
  if (st.code() == absl::StatusCode::kAlreadyExists) {
    KVR_LOG(ERROR) << "cluster: model " << g.model_id
                   << " is registered here with another geometry than the cluster's: " << st;
  }
  return st;
}

absl::Status ClusterStore::EnsureModel(absl::string_view model_id) {
  if (local_->GetModel(model_id).ok()) return absl::OkStatus();
  absl::StatusOr<v1::ModelGeometry> m = membership_->FetchModel(model_id);
  if (!m.ok()) return m.status();
  return RegisterLocally(*m);
}

absl::Status ClusterStore::RegisterModel(const store::ModelGeometry& geometry) {
  KVR_RETURN_IF_ERROR(store::ValidateModel(geometry));
  absl::StatusOr<store::ModelGeometry> existing = local_->GetModel(geometry.model_id);
  if (existing.ok() && !rpc::SameGeometry(*existing, geometry)) {
    return absl::AlreadyExistsError(absl::StrCat(
        "model '", geometry.model_id, "' is registered with a different geometry"));
  }
  KVR_RETURN_IF_ERROR(membership_->PublishModel(rpc::GeometryToProto(geometry)));
  return local_->RegisterModel(geometry);
}

absl::StatusOr<store::ModelGeometry> ClusterStore::GetModel(absl::string_view model_id) const {
  absl::StatusOr<store::ModelGeometry> m = local_->GetModel(model_id);
  if (m.ok() || m.status().code() != absl::StatusCode::kNotFound) return m;
  // Registered on another node a moment ago: the watch has not told us yet.
  absl::StatusOr<v1::ModelGeometry> remote = membership_->FetchModel(model_id);
  if (!remote.ok()) {
    if (remote.status().code() == absl::StatusCode::kNotFound) return m.status();
    return remote.status();
  }
  KVR_ASSIGN_OR_RETURN(store::ModelGeometry g, rpc::GeometryFromProto(*remote));
  absl::Status st = local_->RegisterModel(g);
  if (!st.ok()) return st;
  return g;
}

std::vector<store::ModelGeometry> ClusterStore::ListModels() const { return local_->ListModels(); }

// ---------------------------------------------------------------- placement helpers

bool ClusterStore::RecentlyChanged() const {
  absl::MutexLock lock(&views_mu_);
  return absl::Now() - last_change_ < options_.widen_reads_after_change;
}

std::vector<ClusterStore::Candidate> ClusterStore::ReadCandidates(const MembershipView& view,
                                                                  const Hash128& key,
                                                                  bool widen) const {
  std::vector<Candidate> out;
  auto add = [&](const MembershipView& v, const std::string& id) {
    if (IsSelf(id)) return;
    for (const Candidate& c : out) {
      if (c.node_id == id) return;
    }
    const v1::NodeInfo* n = view.Find(id);
    if (n == nullptr || !n->live()) return;  // only live nodes answer
    out.push_back(Candidate{id, n->address()});
  };
  for (const std::string& id : view.Owners(key)) add(view, id);
  absl::MutexLock lock(&views_mu_);
  for (const MembershipViewPtr& old : previous_views_) {
    for (const std::string& id : old->Owners(key)) add(*old, id);
  }
  if (widen) {
    for (const std::string& id : view.Order(key)) add(view, id);
  }
  return out;
}

bool ClusterStore::OwnerDown(const MembershipView& view, const Hash128& key,
                             const std::vector<std::string>& unreachable) {
  for (const std::string& id : view.OwnersIfAllLive(key)) {
    if (!view.IsLive(id)) return true;
    if (std::find(unreachable.begin(), unreachable.end(), id) != unreachable.end()) return true;
  }
  for (const std::string& id : view.Owners(key)) {
    if (std::find(unreachable.begin(), unreachable.end(), id) != unreachable.end()) return true;
  }
  return false;
}

store::MissReason ClusterStore::Combine(const std::vector<store::MissReason>& reasons,
                                        bool owner_down) {
  store::MissReason best = store::MissReason::kNeverStored;
  if (owner_down) best = store::MissReason::kOwnerUnavailable;
  for (store::MissReason r : reasons) {
    if (r == store::MissReason::kNone || r == store::MissReason::kParentMissing) continue;
    if (Rank(r) < Rank(best)) best = r;
  }
  return best;
}

void ClusterStore::Remember(const store::SpanKey& key) {
  absl::MutexLock lock(&recent_mu_);
  if (static_cast<int64_t>(recent_.size()) >= options_.recent_puts / 2) {
    recent_old_ = std::move(recent_);
    recent_.clear();
  }
  recent_.insert(key);
}

bool ClusterStore::Remembered(const store::SpanKey& key) const {
  absl::MutexLock lock(&recent_mu_);
  return recent_.contains(key) || recent_old_.contains(key);
}

// ---------------------------------------------------------------- spans

absl::Status ClusterStore::CheckParent(const store::StoredSpan& span,
                                       const store::ModelGeometry& model,
                                       const store::PutOptions& options,
                                       const MembershipView& view) {
  const Hash128& parent = span.meta.parent;
  if (options.parent_checked || parent == SpanRootHash(model.model_id, options.salt)) {
    return absl::OkStatus();
  }
  const store::SpanKey pk{span.key.tenant, parent};
  if (Remembered(pk)) return absl::OkStatus();
  store::LookupResult here = local_->Lookup(span.key.tenant, model.model_id, {parent});
  if (here.prefix_spans == 1) return absl::OkStatus();
  std::vector<store::MissReason> reasons;
  if (!here.missing.empty()) reasons.push_back(here.missing.front());
  bool unanswered = false;
  for (const Candidate& c : ReadCandidates(view, parent, RecentlyChanged())) {
    absl::StatusOr<std::vector<PeerProbe>> probe =
        peers_->ProbeSpans(c.address, span.key.tenant, model.model_id, {parent});
    if (!probe.ok()) {
      counters_.failed_peer_calls->Increment();
      unanswered = true;
      continue;
    }
    if ((*probe)[0].found) {
      Remember(pk);
      return absl::OkStatus();
    }
    reasons.push_back((*probe)[0].miss);
  }
  if (unanswered) {
    return absl::UnavailableError(absl::StrCat("parent ", parent.ToHex(),
                                               ": the nodes that hold it did not answer; retry"));
  }
  if (Combine(reasons, false) == store::MissReason::kModelMismatch) {
    return absl::FailedPreconditionError(absl::StrCat(
        "parent ", parent.ToHex(), " belongs to another model than '", model.model_id, "'"));
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "parent ", parent.ToHex(),
      " is neither a stored span of this tenant (on any node of the cluster) nor the root hash "
      "of model '",
      model.model_id, "' with the given salt"));
}

absl::StatusOr<store::PutOutcome> ClusterStore::Put(store::StoredSpan span,
                                                    const store::PutOptions& options) {
  KVR_ASSIGN_OR_RETURN(store::ModelGeometry model, GetModel(span.meta.model_id));
  const MembershipViewPtr view = membership_->view();
  KVR_RETURN_IF_ERROR(CheckParent(span, model, options, *view));
  const store::SpanKey key = span.key;
  const std::vector<std::string> order = view->Order(key.hash);
  const size_t want =
      std::max<size_t>(1, std::min<size_t>(view->replication_factor, order.size()));
  const bool self_owner =
      order.empty() ||
      std::find(order.begin(), order.begin() + std::min(want, order.size()), self_) !=
          order.begin() + std::min(want, order.size());

  store::PutOutcome outcome;
  outcome.already_present = true;
  size_t copies = 0;
  store::StoredSpanPtr stored;  // this node's copy, the source of the remote ones
  if (self_owner) {
    store::PutOptions local_options = options;
    local_options.parent_checked = true;
    KVR_ASSIGN_OR_RETURN(outcome, local_->Put(std::move(span), local_options));
    ++copies;
    if (want > 1) {
      store::GetResult got = local_->Get(key, model.model_id);
      if (got.span == nullptr) {
        return absl::InternalError(absl::StrCat("span ", key.hash.ToHex(),
                                                " left this node before it was replicated (",
                                                store::MissReasonName(got.miss), ")"));
      }
      stored = std::move(got.span);
    }
  }
  const store::StoredSpan* source = stored != nullptr ? stored.get() : &span;
  // The other owners, replaced by the next nodes in placement order when they fail.
  size_t next = 0;
  size_t tried_owners = 0;
  absl::Status last_error;
  while (copies < want && next < order.size()) {
    const std::string& node = order[next++];
    if (IsSelf(node)) {
      if (self_owner) continue;  // stored above
      // An owner failed and this node is next in placement order: it keeps
      // a copy in the owner's place (the sweep hands it over later).
      store::PutOptions local_options = options;
      local_options.parent_checked = true;
      absl::StatusOr<store::PutOutcome> here = local_->Put(span, local_options);
      if (!here.ok()) {
        if (!IsNodeFailure(here.status())) return here.status();
        last_error = here.status();
        continue;
      }
      ++copies;
      outcome.already_present = outcome.already_present && here->already_present;
      if (copies == 1) outcome.durable_tier = here->durable_tier;
      continue;
    }
    const v1::NodeInfo* info = view->Find(node);
    if (info == nullptr) continue;
    ++tried_owners;
    std::vector<bool> present;
    std::vector<store::TierId> tiers;
    store::StoredSpanPtr unowned;  // StoreSpans takes shared pointers
    absl::Status st;
    if (stored != nullptr) {
      st = peers_->StoreSpans(info->address(), {stored}, &present, &tiers);
    } else {
      // Not an owner: send the caller's span without copying it.
      unowned = store::StoredSpanPtr(std::shared_ptr<const store::StoredSpan>(), source);
      st = peers_->StoreSpans(info->address(), {unowned}, &present, &tiers);
    }
    if (!st.ok()) {
      if (!IsNodeFailure(st)) return st;  // the span itself was refused
      counters_.failed_peer_calls->Increment();
      last_error = st;
      continue;
    }
    counters_.remote_puts->Increment();
    ++copies;
    if (!present.empty()) outcome.already_present = outcome.already_present && present[0];
    if (!self_owner && !tiers.empty() && copies == 1) outcome.durable_tier = tiers[0];
  }
  if (copies == 0) {
    return absl::UnavailableError(absl::StrCat("span ", key.hash.ToHex(),
                                               ": no node could store it (", last_error.message(),
                                               ")"));
  }
  if (copies < want) {
    counters_.short_puts->Increment();
    KVR_LOG(WARNING) << "cluster: span " << key.hash.ToHex() << " stored on " << copies << " of "
                     << want << " nodes (" << last_error
                     << "); background replication makes the rest";
  }
  (void)tried_owners;
  Remember(key);
  return outcome;
}

store::GetResult ClusterStore::Get(const store::SpanKey& key, absl::string_view model_id) {
  store::GetResult here = local_->Get(key, model_id);
  if (here.span != nullptr) return here;
  const MembershipViewPtr view = membership_->view();
  std::vector<store::MissReason> reasons = {here.miss};
  std::vector<std::string> unreachable;
  std::vector<Candidate> candidates = ReadCandidates(*view, key.hash, RecentlyChanged());
  for (size_t i = 0; i < candidates.size(); ++i) {
    const Candidate c = candidates[i];
    absl::StatusOr<std::vector<store::GetResult>> got =
        peers_->FetchSpans(c.address, key.tenant, model_id, {key.hash});
    if (!got.ok()) {
      counters_.failed_peer_calls->Increment();
      unreachable.push_back(c.node_id);
      // A holder is down: a copy may have been put on a node outside the
      // owners in its place; ask every live node.
      if (unreachable.size() == 1) {
        for (const Candidate& more : ReadCandidates(*view, key.hash, /*widen=*/true)) {
          bool listed = false;
          for (const Candidate& have : candidates) listed = listed || have.node_id == more.node_id;
          if (!listed) candidates.push_back(more);
        }
      }
      continue;
    }
    store::GetResult& r = (*got)[0];
    if (r.span != nullptr) {
      counters_.remote_reads->Increment();
      return std::move(r);
    }
    reasons.push_back(r.miss);
  }
  store::GetResult miss;
  miss.miss = Combine(reasons, OwnerDown(*view, key.hash, unreachable));
  return miss;
}

store::LookupResult ClusterStore::Lookup(absl::string_view tenant, absl::string_view model_id,
                                         absl::Span<const Hash128> chain) {
  const size_t n = chain.size();
  std::vector<bool> found(n, false);
  std::vector<int32_t> tokens(n, 0);
  std::vector<std::vector<store::MissReason>> reasons(n);
  std::vector<std::vector<std::string>> unreachable(n);
  for (size_t i = 0; i < n; ++i) {
    store::LookupResult r = local_->Lookup(tenant, model_id, {chain[i]});
    if (r.prefix_spans == 1) {
      found[i] = true;
      tokens[i] = static_cast<int32_t>(r.prefix_tokens);
    } else if (!r.missing.empty()) {
      reasons[i].push_back(r.missing.front());
    }
  }
  const MembershipViewPtr view = membership_->view();
  const bool widen = RecentlyChanged();
  std::vector<std::vector<Candidate>> candidates(n);
  for (size_t i = 0; i < n; ++i) {
    if (!found[i]) candidates[i] = ReadCandidates(*view, chain[i], widen);
  }
  // Round k asks each still-missing span's k-th candidate, one call per node.
  for (size_t round = 0;; ++round) {
    std::map<std::string, std::pair<std::string, std::vector<size_t>>> by_node;
    for (size_t i = 0; i < n; ++i) {
      if (found[i] || round >= candidates[i].size()) continue;
      auto& slot = by_node[candidates[i][round].node_id];
      slot.first = candidates[i][round].address;
      slot.second.push_back(i);
    }
    if (by_node.empty()) break;
    std::vector<std::pair<std::string, const std::vector<size_t>*>> calls;
    for (const auto& [node, slot] : by_node) calls.emplace_back(node, &slot.second);
    std::vector<absl::StatusOr<std::vector<PeerProbe>>> answers(
        calls.size(), absl::UnknownError("not asked"));
    absl::BlockingCounter done(static_cast<int>(calls.size()));
    for (size_t c = 0; c < calls.size(); ++c) {
      fanout_->Schedule([&, c] {
        std::vector<Hash128> hashes;
        for (size_t i : *calls[c].second) hashes.push_back(chain[i]);
        answers[c] = peers_->ProbeSpans(by_node[calls[c].first].first, tenant, model_id, hashes);
        done.DecrementCount();
      });
    }
    done.Wait();
    for (size_t c = 0; c < calls.size(); ++c) {
      const std::vector<size_t>& idx = *calls[c].second;
      if (!answers[c].ok()) {
        counters_.failed_peer_calls->Increment();
        for (size_t i : idx) unreachable[i].push_back(calls[c].first);
        continue;
      }
      for (size_t j = 0; j < idx.size(); ++j) {
        const PeerProbe& p = (*answers[c])[j];
        if (p.found) {
          found[idx[j]] = true;
          tokens[idx[j]] = p.num_tokens;
        } else {
          reasons[idx[j]].push_back(p.miss);
        }
      }
    }
  }
  store::LookupResult result;
  size_t i = 0;
  for (; i < n && found[i]; ++i) {
    ++result.prefix_spans;
    result.prefix_tokens += tokens[i];
  }
  for (size_t j = i; j < n; ++j) {
    if (found[j]) {
      result.missing.push_back(j == i ? store::MissReason::kNone : store::MissReason::kParentMissing);
    } else {
      result.missing.push_back(Combine(reasons[j], OwnerDown(*view, chain[j], unreachable[j])));
    }
  }
  return result;
}

absl::Status ClusterStore::Delete(const store::SpanKey& key) {
  const MembershipViewPtr view = membership_->view();
  std::vector<const v1::NodeInfo*> others;
  for (const v1::NodeInfo& node : view->nodes) {
    if (node.live() && !IsSelf(node.node_id())) others.push_back(&node);
  }
  std::vector<absl::Status> results(others.size());
  absl::BlockingCounter done(static_cast<int>(others.size()));
  for (size_t i = 0; i < others.size(); ++i) {
    fanout_->Schedule([&, i] {
      absl::StatusOr<std::vector<absl::Status>> r =
          peers_->SpanOp(others[i]->address(), key.tenant, v1::SPAN_OP_DELETE, {key.hash});
      results[i] = r.ok() ? (*r)[0] : r.status();
      done.DecrementCount();
    });
  }
  absl::Status here = local_->Delete(key);
  done.Wait();
  if (here.ok()) return here;
  absl::Status not_found = here;
  bool any_ok = false;
  absl::Status failure;
  for (size_t i = 0; i < results.size(); ++i) {
    const absl::Status& s = results[i];
    if (s.ok()) {
      any_ok = true;
    } else if (s.code() == absl::StatusCode::kNotFound) {
      // Prefer a message that says more than never_stored.
      if (absl::StrContains(not_found.message(), "never_stored")) not_found = s;
    } else {
      counters_.failed_peer_calls->Increment();
      failure = s;
    }
  }
  if (any_ok) return absl::OkStatus();
  if (here.code() != absl::StatusCode::kNotFound) return here;
  if (!failure.ok()) {
    return absl::UnavailableError(absl::StrCat("span ", key.hash.ToHex(),
                                               " not found on the nodes that answered; ",
                                               failure.message()));
  }
  return not_found;
}

absl::Status ClusterStore::Pin(const store::SpanKey& key, absl::Duration ttl) {
  absl::Status here = local_->Pin(key, ttl);
  if (here.code() != absl::StatusCode::kNotFound) return here;
  const MembershipViewPtr view = membership_->view();
  // Every live node: pins are rare, and during churn the span may sit on a
  // node outside its owners.
  for (const Candidate& c : ReadCandidates(*view, key.hash, /*widen=*/true)) {
    absl::StatusOr<std::vector<absl::Status>> r =
        peers_->SpanOp(c.address, key.tenant, v1::SPAN_OP_PIN, {key.hash}, ttl);
    if (!r.ok()) {
      counters_.failed_peer_calls->Increment();
      continue;
    }
    if ((*r)[0].code() != absl::StatusCode::kNotFound) return (*r)[0];
  }
  return here;
}

absl::Status ClusterStore::Unpin(const store::SpanKey& key) {
  absl::Status here = local_->Unpin(key);
  if (here.code() != absl::StatusCode::kNotFound) return here;
  const MembershipViewPtr view = membership_->view();
  // Every live node: pins are rare, and during churn the span may sit on a
  // node outside its owners.
  for (const Candidate& c : ReadCandidates(*view, key.hash, /*widen=*/true)) {
    absl::StatusOr<std::vector<absl::Status>> r =
        peers_->SpanOp(c.address, key.tenant, v1::SPAN_OP_UNPIN, {key.hash});
    if (!r.ok()) {
      counters_.failed_peer_calls->Increment();
      continue;
    }
    if ((*r)[0].code() != absl::StatusCode::kNotFound) return (*r)[0];
  }
  return here;
}

// ---------------------------------------------------------------- catalog

std::vector<ClusterStore::Candidate> ClusterStore::CatalogTargets(const MembershipView& view,
                                                                  absl::string_view space,
                                                                  absl::string_view key) const {
  std::vector<Candidate> out;
  std::optional<Hash128> placement = CatalogPlacementKey(space, key);
  if (placement.has_value()) return ReadCandidates(view, *placement);
  for (const v1::NodeInfo& n : view.nodes) {
    if (n.live() && !IsSelf(n.node_id())) out.push_back(Candidate{n.node_id(), n.address()});
  }
  return out;
}

absl::Status ClusterStore::CatalogFanOut(const MembershipView& view,
                                         const v1::CatalogEntry& entry) {
  const std::vector<Candidate> targets = CatalogTargets(view, entry.space(), entry.key());
  if (targets.empty()) return absl::OkStatus();
  v1::CatalogWriteRequest request;
  *request.add_entries() = entry;
  std::vector<absl::Status> results(targets.size());
  absl::BlockingCounter done(static_cast<int>(targets.size()));
  for (size_t i = 0; i < targets.size(); ++i) {
    fanout_->Schedule([&, i] {
      results[i] = peers_->CatalogWrite(targets[i].address, request);
      done.DecrementCount();
    });
  }
  done.Wait();
  for (size_t i = 0; i < results.size(); ++i) {
    if (!results[i].ok()) {
      counters_.failed_peer_calls->Increment();
      KVR_LOG(WARNING) << "cluster: catalog " << entry.space() << " entry not copied to "
                       << targets[i].node_id << ": " << results[i]
                       << " (background replication retries)";
    }
  }
  return absl::OkStatus();
}

absl::Status ClusterStore::CatalogPut(absl::string_view space, absl::string_view key,
                                      absl::string_view value) {
  KVR_RETURN_IF_ERROR(local_->CatalogPut(space, key, value));
  v1::CatalogEntry entry;
  entry.set_space(std::string(space));
  entry.set_key(std::string(key));
  entry.set_value(std::string(value));
  return CatalogFanOut(*membership_->view(), entry);
}

absl::StatusOr<std::string> ClusterStore::CatalogGet(absl::string_view space,
                                                     absl::string_view key) const {
  absl::StatusOr<std::string> here = local_->CatalogGet(space, key);
  if (here.ok() || here.status().code() != absl::StatusCode::kNotFound) return here;
  const MembershipViewPtr view = membership_->view();
  v1::CatalogReadRequest request;
  request.set_space(std::string(space));
  request.set_key(std::string(key));
  for (const Candidate& c : CatalogTargets(*view, space, key)) {
    absl::StatusOr<std::vector<v1::CatalogEntry>> got = peers_->CatalogRead(c.address, request);
    if (got.ok() && !got->empty()) return std::move((*got)[0]).value();
    if (!got.ok()) counters_.failed_peer_calls->Increment();
  }
  return here;
}

absl::Status ClusterStore::CatalogDelete(absl::string_view space, absl::string_view key) {
  absl::Status here = local_->CatalogDelete(space, key);
  if (!here.ok() && here.code() != absl::StatusCode::kNotFound) return here;
  v1::CatalogEntry entry;
  entry.set_space(std::string(space));
  entry.set_key(std::string(key));
  entry.set_deleted(true);
  KVR_RETURN_IF_ERROR(CatalogFanOut(*membership_->view(), entry));
  return here;
}

}  // namespace kvrecall::cluster
