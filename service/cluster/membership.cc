#include "service/cluster/membership.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "service/cluster/placement.h"

namespace kvrecall::cluster {
namespace {

constexpr absl::string_view kNodes = "nodes/";
constexpr absl::string_view kMembers = "members/";
constexpr absl::string_view kModels = "models/";
constexpr absl::string_view kConfig = "config";

bool SameGeometry(const v1::ModelGeometry& a, const v1::ModelGeometry& b) {
  auto block = [](const v1::ModelGeometry& m) { return m.block_tokens() == 0 ? 256 : m.block_tokens(); };
  return a.model_id() == b.model_id() && a.num_layers() == b.num_layers() &&
         a.num_q_heads() == b.num_q_heads() && a.num_kv_heads() == b.num_kv_heads() &&
         a.head_dim() == b.head_dim() && a.dtype() == b.dtype() &&
         a.keys_post_rope() == b.keys_post_rope() && block(a) == block(b);
}

}  // namespace

std::string LocalHostId() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  if (in && std::getline(in, id)) {
    id = std::string(absl::StripAsciiWhitespace(id));
    if (!id.empty()) return id;
  }
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  return host;
}

// ---------------------------------------------------------------- view

const v1::NodeInfo* MembershipView::Find(absl::string_view node_id) const {
  for (const v1::NodeInfo& n : nodes) {
    if (n.node_id() == node_id) return &n;
  }
  return nullptr;
}

bool MembershipView::IsLive(absl::string_view node_id) const {
  return std::binary_search(live_ids.begin(), live_ids.end(), std::string(node_id));
}

std::vector<std::string> MembershipView::Owners(const Hash128& key) const {
  return cluster::Owners(key, live_ids, replication_factor);
}

std::vector<std::string> MembershipView::Order(const Hash128& key) const {
  return PlacementOrder(key, live_ids);
}

std::vector<std::string> MembershipView::OwnersIfAllLive(const Hash128& key) const {
  return cluster::Owners(key, known_ids, replication_factor);
}

v1::Membership MembershipView::ToProto(absl::string_view self) const {
  v1::Membership out;
  out.set_cluster(cluster);
  out.set_replication_factor(replication_factor);
  for (const v1::NodeInfo& n : nodes) *out.add_nodes() = n;
  out.set_revision(revision);
  out.set_self(std::string(self));
  out.set_placement(std::string(kPlacementVersion));
  out.set_lease_ttl_s(lease_ttl_s);
  return out;
}

// ---------------------------------------------------------------- membership

absl::StatusOr<std::unique_ptr<Membership>> Membership::Create(const MembershipOptions& options) {
  KVR_RETURN_IF_ERROR(ValidateNodeId(options.node_id));
  if (options.advertise.empty() || options.advertise.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--advertise='", options.advertise, "' must be host:port"));
  }
  if (options.cluster_name.empty() || options.cluster_name.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--cluster_name='", options.cluster_name, "' must be non-empty, without '/'"));
  }
  if (options.replication_factor < 0 || options.replication_factor > 16) {
    return absl::InvalidArgumentError(absl::StrCat("--replication_factor=",
                                                   options.replication_factor,
                                                   " must be in 0..16 (0: the cluster's)"));
  }
  if (options.lease_ttl_s < 2 || options.lease_ttl_s > 300) {
    return absl::InvalidArgumentError(
        absl::StrCat("--lease_ttl_s=", options.lease_ttl_s, " must be in 2..300"));
  }
  EtcdOptions etcd;
  etcd.endpoints = options.etcd_endpoints;
  etcd.call_timeout = options.etcd_timeout;
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<EtcdClient> client, EtcdClient::Create(etcd));
  return std::unique_ptr<Membership>(new Membership(options, std::move(client)));
}

Membership::Membership(const MembershipOptions& options, std::unique_ptr<EtcdClient> etcd)
    : options_(options), etcd_(std::move(etcd)) {
  self_.set_node_id(options.node_id);
  self_.set_address(options.advertise);
  self_.set_host_id(options.host_id.empty() ? LocalHostId() : options.host_id);
  self_.set_live(true);
  auto view = std::make_shared<MembershipView>();
  view->cluster = options.cluster_name;
  view_ = std::move(view);
}

Membership::~Membership() {
  Leave();
  Stop();
}

std::string Membership::Key(absl::string_view suffix) const {
  return absl::StrCat("/kvrecall/", options_.cluster_name, "/", suffix);
}

absl::Status Membership::EnsureConfig() {
  const int32_t wanted_r = options_.replication_factor > 0 ? options_.replication_factor : 2;
  v1::Membership config;
  config.set_cluster(options_.cluster_name);
  config.set_replication_factor(wanted_r);
  config.set_lease_ttl_s(options_.lease_ttl_s);
  config.set_placement(std::string(kPlacementVersion));
  EtcdKeyValue existing;
  KVR_ASSIGN_OR_RETURN(bool created,
                       etcd_->PutIfAbsent(Key(kConfig), config.SerializeAsString(), 0, &existing));
  if (!created) {
    if (!config.ParseFromString(existing.value)) {
      return absl::DataLossError(absl::StrCat("etcd key ", Key(kConfig), " is not a cluster config"));
    }
    if (config.placement() != kPlacementVersion) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cluster '", options_.cluster_name, "' places spans with ", config.placement(),
          "; this kvrecalld implements ", kPlacementVersion));
    }
    if (options_.replication_factor > 0 &&
        config.replication_factor() != options_.replication_factor) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--replication_factor=", options_.replication_factor, " but cluster '",
          options_.cluster_name, "' has replication factor ", config.replication_factor(),
          " (set when it was created; pass 0 to adopt it)"));
    }
  } else {
    KVR_LOG(INFO) << "created cluster '" << options_.cluster_name << "' with replication factor "
                  << wanted_r;
  }
  absl::MutexLock lock(&mu_);
  replication_factor_ = config.replication_factor();
  lease_ttl_s_ = config.lease_ttl_s() > 0 ? config.lease_ttl_s() : options_.lease_ttl_s;
  return absl::OkStatus();
}

absl::Status Membership::Resync() {
  KVR_ASSIGN_OR_RETURN(auto all, etcd_->GetPrefix(Key("")));
  const std::string nodes_prefix = Key(kNodes);
  const std::string members_prefix = Key(kMembers);
  const std::string models_prefix = Key(kModels);
  absl::flat_hash_map<std::string, v1::NodeInfo> live, members;
  std::vector<v1::ModelGeometry> models;
  for (const EtcdKeyValue& kv : all.first) {
    v1::NodeInfo node;
    if (absl::StartsWith(kv.key, nodes_prefix) && node.ParseFromString(kv.value)) {
      node.set_live(true);
      node.set_lease_id(kv.lease);
      live[node.node_id()] = node;
    } else if (absl::StartsWith(kv.key, members_prefix) && node.ParseFromString(kv.value)) {
      members[node.node_id()] = node;
    } else if (absl::StartsWith(kv.key, models_prefix)) {
      v1::ModelGeometry m;
      if (m.ParseFromString(kv.value)) models.push_back(std::move(m));
    }
  }
  std::function<void(const v1::ModelGeometry&)> model_listener;
  std::vector<std::function<void(const MembershipViewPtr&)>> listeners;
  MembershipViewPtr view;
  {
    absl::MutexLock lock(&mu_);
    live_ = std::move(live);
    members_ = std::move(members);
    revision_ = all.second;
    etcd_ok_ = true;
    PublishView();
    model_listener = model_listener_;
    listeners = listeners_;
    view = view_;
  }
  if (model_listener) {
    for (const v1::ModelGeometry& m : models) model_listener(m);
  }
  for (const auto& l : listeners) l(view);
  return absl::OkStatus();
}

void Membership::PublishView() {
  auto view = std::make_shared<MembershipView>();
  view->cluster = options_.cluster_name;
  view->revision = revision_;
  view->replication_factor = replication_factor_;
  view->lease_ttl_s = lease_ttl_s_;
  absl::flat_hash_map<std::string, v1::NodeInfo> all = members_;
  for (auto& [id, n] : all) n.set_live(false);
  for (const auto& [id, n] : live_) all[id] = n;
  if (joined_ && !leaving_) {  // this node is live as soon as it registered
    v1::NodeInfo self = self_;
    self.set_lease_id(lease_);
    all[self.node_id()] = self;
  }
  for (const auto& [id, n] : all) {
    view->nodes.push_back(n);
    view->known_ids.push_back(id);
    if (n.live()) view->live_ids.push_back(id);
  }
  std::sort(view->nodes.begin(), view->nodes.end(),
            [](const v1::NodeInfo& a, const v1::NodeInfo& b) { return a.node_id() < b.node_id(); });
  std::sort(view->known_ids.begin(), view->known_ids.end());
  std::sort(view->live_ids.begin(), view->live_ids.end());
  view_ = std::move(view);
}

absl::Status Membership::Start() {
  KVR_RETURN_IF_ERROR(EnsureConfig());
  KVR_RETURN_IF_ERROR(Resync());
  watcher_ = std::thread([this] { WatchLoop(); });
  const MembershipViewPtr v = view();
  KVR_LOG(INFO) << "cluster '" << options_.cluster_name << "' via etcd "
                << etcd_->current_endpoint() << ": " << v->live_ids.size() << " live of "
                << v->known_ids.size() << " known nodes, replication factor "
                << v->replication_factor;
  return absl::OkStatus();
}

absl::Status Membership::Register() {
  int64_t ttl = 0;
  v1::NodeInfo self;
  {
    absl::MutexLock lock(&mu_);
    ttl = lease_ttl_s_;
    self_.set_started_unix_ms(absl::ToUnixMillis(absl::Now()));
    self = self_;
  }
  KVR_ASSIGN_OR_RETURN(int64_t lease, etcd_->GrantLease(absl::Seconds(ttl)));
  self.set_lease_id(lease);
  v1::NodeInfo member = self;
  member.set_live(false);
  member.set_lease_id(0);
  KVR_RETURN_IF_ERROR(etcd_->Put(Key(absl::StrCat(kMembers, self.node_id())),
                                 member.SerializeAsString()).status());
  KVR_RETURN_IF_ERROR(
      etcd_->Put(Key(absl::StrCat(kNodes, self.node_id())), self.SerializeAsString(), lease)
          .status());
  std::vector<std::function<void(const MembershipViewPtr&)>> listeners;
  MembershipViewPtr view;
  {
    absl::MutexLock lock(&mu_);
    lease_ = lease;
    self_ = self;
    joined_ = true;
    etcd_ok_ = true;
    PublishView();
    listeners = listeners_;
    view = view_;
  }
  for (const auto& l : listeners) l(view);
  KVR_LOG(INFO) << "joined cluster '" << options_.cluster_name << "' as " << self.node_id()
                << " (" << self.address() << ", lease " << lease << ", ttl " << ttl << " s)";
  return absl::OkStatus();
}

absl::Status Membership::Join() {
  KVR_RETURN_IF_ERROR(Register());
  keeper_ = std::thread([this] { KeepAliveLoop(); });
  return absl::OkStatus();
}

void Membership::KeepAliveLoop() {
  absl::Duration wait;
  {
    absl::MutexLock lock(&mu_);
    wait = absl::Seconds(lease_ttl_s_) / 3;
  }
  while (true) {
    int64_t lease = 0;
    {
      absl::MutexLock lock(&mu_);
      auto done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return leaving_ || stopping_; };
      mu_.AwaitWithTimeout(absl::Condition(&done), wait);
      if (done()) return;
      lease = lease_;
    }
    absl::StatusOr<absl::Duration> ttl = etcd_->KeepAliveOnce(lease);
    if (ttl.ok()) {
      absl::MutexLock lock(&mu_);
      etcd_ok_ = true;
      wait = absl::Seconds(lease_ttl_s_) / 3;
      continue;
    }
    if (ttl.status().code() == absl::StatusCode::kNotFound) {
      KVR_LOG(WARNING) << "cluster: lease " << lease << " of " << options_.node_id
                       << " expired (etcd unreachable for longer than the TTL?); registering again";
      absl::Status st = Register();
      if (!st.ok()) KVR_LOG(WARNING) << "cluster: registering again failed: " << st;
    } else {
      absl::MutexLock lock(&mu_);
      if (etcd_ok_) KVR_LOG(WARNING) << "cluster: keep-alive failed: " << ttl.status();
      etcd_ok_ = false;
    }
    wait = absl::Milliseconds(500);  // retry soon
  }
}

void Membership::WatchLoop() {
  absl::Duration backoff = absl::Milliseconds(100);
  while (true) {
    int64_t from = 0;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      from = revision_ + 1;
    }
    absl::Status st = etcd_->Watch(
        Key(""), from, [this](const std::vector<EtcdEvent>& events, int64_t revision) {
          return Apply(events, revision);
        },
        &watch_handle_);
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      etcd_ok_ = false;
    }
    if (st.code() == absl::StatusCode::kOutOfRange) {
      KVR_LOG(WARNING) << "cluster: " << st << "; reading the membership again";
    } else if (!st.ok()) {
      KVR_LOG(WARNING) << "cluster: membership watch broke: " << st << "; retrying";
    }
    {
      absl::MutexLock lock(&mu_);
      auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
      mu_.AwaitWithTimeout(absl::Condition(&stop), backoff);
      if (stopping_) return;
    }
    backoff = std::min(backoff * 2, absl::Seconds(2));
    // After a break, read everything again: events may be compacted away,
    // and a fresh read resets the revision to resume from.
    absl::Status resync = Resync();
    if (resync.ok()) backoff = absl::Milliseconds(100);
  }
}

bool Membership::Apply(const std::vector<EtcdEvent>& events, int64_t revision) {
  const std::string nodes_prefix = Key(kNodes);
  const std::string members_prefix = Key(kMembers);
  const std::string models_prefix = Key(kModels);
  std::vector<v1::ModelGeometry> models;
  bool changed = false;
  std::vector<std::function<void(const MembershipViewPtr&)>> listeners;
  std::function<void(const v1::ModelGeometry&)> model_listener;
  MembershipViewPtr view;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return false;
    etcd_ok_ = true;
    for (const EtcdEvent& e : events) {
      if (absl::StartsWith(e.kv.key, nodes_prefix)) {
        const std::string id = e.kv.key.substr(nodes_prefix.size());
        if (e.deleted) {
          changed |= live_.erase(id) > 0;
        } else {
          v1::NodeInfo node;
          if (!node.ParseFromString(e.kv.value)) continue;
          node.set_live(true);
          node.set_lease_id(e.kv.lease);
          live_[id] = node;
          changed = true;
        }
      } else if (absl::StartsWith(e.kv.key, members_prefix)) {
        const std::string id = e.kv.key.substr(members_prefix.size());
        if (e.deleted) {
          changed |= members_.erase(id) > 0;
        } else {
          v1::NodeInfo node;
          if (!node.ParseFromString(e.kv.value)) continue;
          members_[id] = node;
          changed = true;
        }
      } else if (absl::StartsWith(e.kv.key, models_prefix) && !e.deleted) {
        v1::ModelGeometry m;
        if (m.ParseFromString(e.kv.value)) models.push_back(std::move(m));
      }
    }
    // A delete of our own key while we still hold the lease (etcd restored
    // from an old snapshot, or someone removed it): the keep-alive finds out.
    if (revision > revision_) revision_ = revision;
    if (changed) PublishView();
    listeners = listeners_;
    model_listener = model_listener_;
    view = view_;
  }
  if (model_listener) {
    for (const v1::ModelGeometry& m : models) model_listener(m);
  }
  if (changed) {
    for (const auto& l : listeners) l(view);
  }
  return true;
}

void Membership::Leave() {
  int64_t lease = 0;
  {
    absl::MutexLock lock(&mu_);
    if (!joined_ || leaving_) return;
    leaving_ = true;
    lease = lease_;
    PublishView();
  }
  if (keeper_.joinable()) keeper_.join();
  absl::Status st = etcd_->RevokeLease(lease);
  if (!st.ok()) {
    KVR_LOG(WARNING) << "cluster: revoking lease " << lease << ": " << st
                     << " (the node leaves when it expires)";
  } else {
    KVR_LOG(INFO) << "left cluster '" << options_.cluster_name << "'";
  }
}

void Membership::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  watch_handle_.Cancel();
  if (watcher_.joinable()) watcher_.join();
  if (keeper_.joinable()) keeper_.join();
}

MembershipViewPtr Membership::view() const {
  absl::MutexLock lock(&mu_);
  return view_;
}

MembershipViewPtr Membership::WaitForChange(int64_t revision, absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  auto changed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return view_->revision > revision || stopping_;
  };
  mu_.AwaitWithTimeout(absl::Condition(&changed), timeout);
  return view_;
}

void Membership::AddListener(std::function<void(const MembershipViewPtr&)> listener) {
  absl::MutexLock lock(&mu_);
  listeners_.push_back(std::move(listener));
}

void Membership::SetModelListener(std::function<void(const v1::ModelGeometry&)> listener) {
  absl::MutexLock lock(&mu_);
  model_listener_ = std::move(listener);
}

absl::Status Membership::PublishModel(const v1::ModelGeometry& model) {
  EtcdKeyValue existing;
  KVR_ASSIGN_OR_RETURN(
      bool created, etcd_->PutIfAbsent(Key(absl::StrCat(kModels, model.model_id())),
                                       model.SerializeAsString(), 0, &existing));
  if (created) return absl::OkStatus();
  v1::ModelGeometry current;
  if (!current.ParseFromString(existing.value)) {
    return absl::DataLossError(absl::StrCat("etcd holds an unreadable geometry of model ",
                                            model.model_id()));
  }
  if (!SameGeometry(current, model)) {
    return absl::AlreadyExistsError(absl::StrCat(
        "model ", model.model_id(),
        " is registered in the cluster with a different geometry; register the new one under "
        "another id"));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::ModelGeometry> Membership::FetchModel(absl::string_view model_id) {
  KVR_ASSIGN_OR_RETURN(std::optional<EtcdKeyValue> kv,
                       etcd_->Get(Key(absl::StrCat(kModels, model_id))));
  if (!kv.has_value()) {
    return absl::NotFoundError(absl::StrCat("unknown model id '", model_id, "'"));
  }
  v1::ModelGeometry m;
  if (!m.ParseFromString(kv->value)) {
    return absl::DataLossError(absl::StrCat("etcd holds an unreadable geometry of model ", model_id));
  }
  return m;
}

absl::Status Membership::Forget(absl::string_view node_id) {
  KVR_RETURN_IF_ERROR(ValidateNodeId(node_id));
  KVR_ASSIGN_OR_RETURN(std::optional<EtcdKeyValue> live,
                       etcd_->Get(Key(absl::StrCat(kNodes, node_id))));
  if (live.has_value()) {
    return absl::FailedPreconditionError(
        absl::StrCat("node ", node_id, " is live; stop it before forgetting it"));
  }
  KVR_ASSIGN_OR_RETURN(int64_t deleted, etcd_->Delete(Key(absl::StrCat(kMembers, node_id))));
  if (deleted == 0) return absl::NotFoundError(absl::StrCat("node ", node_id, " is not known"));
  return absl::OkStatus();
}

int64_t Membership::lease_id() const {
  absl::MutexLock lock(&mu_);
  return lease_;
}

absl::StatusOr<absl::Duration> Membership::LeaseTimeLeft() {
  const int64_t lease = lease_id();
  if (lease == 0) return absl::FailedPreconditionError("not joined");
  return etcd_->LeaseTimeToLive(lease);
}

bool Membership::etcd_connected() const {
  absl::MutexLock lock(&mu_);
  return etcd_ok_;
}

v1::NodeInfo Membership::self_info() const {
  absl::MutexLock lock(&mu_);
  v1::NodeInfo s = self_;
  s.set_lease_id(lease_);
  s.set_live(joined_ && !leaving_);
  return s;
}

}  // namespace kvrecall::cluster
