#include "clients/cpp/cluster_client.h"

#include <algorithm>
#include <utility>

#include <grpcpp/create_channel.h>
#include <grpcpp/support/channel_arguments.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "service/cluster/placement.h"

namespace kvrecall::client {

bool IsNodeFailure(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable ||
         status.code() == absl::StatusCode::kDeadlineExceeded;
}

absl::StatusOr<std::unique_ptr<ClusterClient>> ClusterClient::Create(
    ClusterClientOptions options) {
  if (options.seeds.empty()) {
    return absl::InvalidArgumentError("ClusterClient: give at least one seed (host:port)");
  }
  options.node.channel = nullptr;
  ClientOptions check = options.node;
  check.target = options.seeds[0];
  if (absl::Status st = RpcPolicy::Validate(check); !st.ok()) return st;
  std::unique_ptr<ClusterClient> c(new ClusterClient(std::move(options)));
  if (absl::Status st = c->Refresh(); !st.ok()) return st;
  return c;
}

absl::StatusOr<ClusterClient::Node*> ClusterClient::NodeAt(const std::string& address) {
  absl::MutexLock lock(&mu_);
  auto it = nodes_.find(address);
  if (it != nodes_.end()) return it->second.get();
  ClientOptions o = options_.node;
  o.target = address;
  if (absl::Status st = RpcPolicy::Validate(o); !st.ok()) return st;
  // Reconnect within a second to a node that was down (gRPC's default
  // backoff grows to 2 minutes: a restarted owner would be skipped that long).
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(o.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(o.max_message_bytes));
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  if (o.http2_max_frame_bytes > 0) {
    args.SetInt(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, static_cast<int>(o.http2_max_frame_bytes));
  }
  if (!o.tls_server_name.empty()) args.SetSslTargetNameOverride(o.tls_server_name);
  o.channel = grpc::CreateCustomChannel(address, ChannelCredentialsFor(o), args);
  auto node = std::make_unique<Node>();
  node->policy = std::make_unique<RpcPolicy>(o);
  absl::StatusOr<std::unique_ptr<KvStoreClient>> client = KvStoreClient::Create(o);
  if (!client.ok()) return client.status();
  node->client = std::move(*client);
  node->cluster = v1::Cluster::NewStub(node->policy->channel());
  Node* out = node.get();
  nodes_.emplace(address, std::move(node));
  return out;
}

absl::StatusOr<KvStoreClient*> ClusterClient::NodeClient(const std::string& address) {
  absl::StatusOr<Node*> n = NodeAt(address);
  if (!n.ok()) return n.status();
  return (*n)->client.get();
}

v1::Membership ClusterClient::membership() const {
  absl::MutexLock lock(&mu_);
  return membership_;
}

absl::Status ClusterClient::Refresh() {
  // The live nodes we know of first, then the seeds.
  std::vector<std::string> addresses;
  {
    absl::MutexLock lock(&mu_);
    for (const v1::NodeInfo& n : membership_.nodes()) {
      if (n.live()) addresses.push_back(n.address());
    }
  }
  for (const std::string& s : options_.seeds) {
    if (std::find(addresses.begin(), addresses.end(), s) == addresses.end()) {
      addresses.push_back(s);
    }
  }
  absl::Status last = absl::UnavailableError("no node to ask");
  for (const std::string& address : addresses) {
    absl::StatusOr<Node*> node = NodeAt(address);
    if (!node.ok()) return node.status();
    std::unique_ptr<grpc::ClientContext> ctx = (*node)->policy->NewContext(
        absl::Now() + std::min(absl::Milliseconds(options_.node.deadline_ms), absl::Seconds(5)));
    v1::Membership m;
    const absl::Status st = FromGrpcStatus(
        (*node)->cluster->GetMembership(ctx.get(), v1::GetMembershipRequest(), &m));
    if (!st.ok()) {
      last = absl::Status(st.code(), absl::StrCat(address, ": ", st.message()));
      if (!IsNodeFailure(st)) return last;  // not a cluster node, or refused
      continue;
    }
    if (m.placement() != cluster::kPlacementVersion) {
      return absl::FailedPreconditionError(
          absl::StrCat("the cluster places data with '", m.placement(), "'; this client implements '",
                       cluster::kPlacementVersion, "'"));
    }
    absl::MutexLock lock(&mu_);
    // A node that lost etcd may answer with an older view: keep the newest.
    if (m.revision() >= membership_.revision() || read_at_ == absl::InfinitePast()) {
      membership_ = std::move(m);
    }
    read_at_ = absl::Now();
    return absl::OkStatus();
  }
  return absl::UnavailableError(
      absl::StrCat("no node of the cluster answered (last: ", last.message(), ")"));
}

void ClusterClient::MaybeRefresh() {
  {
    absl::MutexLock lock(&mu_);
    if (absl::Now() - read_at_ < options_.refresh_interval) return;
  }
  Refresh().IgnoreError();  // the last view stays in force
}

std::vector<std::string> ClusterClient::Order(const Hash128& key) {
  MaybeRefresh();
  std::vector<std::string> live;
  {
    absl::MutexLock lock(&mu_);
    for (const v1::NodeInfo& n : membership_.nodes()) {
      if (n.live()) live.push_back(n.node_id());
    }
  }
  return cluster::PlacementOrder(key, live);
}

std::vector<std::string> ClusterClient::Addresses(const Hash128& key) {
  const std::vector<std::string> order = Order(key);
  std::vector<std::string> out;
  {
    absl::MutexLock lock(&mu_);
    for (const std::string& id : order) {
      for (const v1::NodeInfo& n : membership_.nodes()) {
        if (n.node_id() == id) out.push_back(n.address());
      }
    }
  }
  for (const std::string& s : options_.seeds) {
    if (std::find(out.begin(), out.end(), s) == out.end()) out.push_back(s);
  }
  return out;
}

absl::Status ClusterClient::OnOwner(const Hash128& key,
                                    const std::function<absl::Status(KvStoreClient*)>& call) {
  absl::Status last = absl::UnavailableError("no node to ask");
  bool failed = false;
  for (const std::string& address : Addresses(key)) {
    absl::StatusOr<Node*> node = NodeAt(address);
    if (!node.ok()) return node.status();
    const absl::Status st = call((*node)->client.get());
    if (!IsNodeFailure(st)) {
      if (failed) Refresh().IgnoreError();  // stop routing to the node that failed
      return st;
    }
    failed = true;
    last = absl::Status(st.code(), absl::StrCat(address, ": ", st.message()));
  }
  Refresh().IgnoreError();
  return last;
}

absl::StatusOr<v1::RegisterModelResponse> ClusterClient::RegisterModel(
    const v1::ModelGeometry& model) {
  v1::RegisterModelResponse out;
  absl::Status st = OnOwner(Hash128(), [&](KvStoreClient* c) {
    absl::StatusOr<v1::RegisterModelResponse> r = c->RegisterModel(model);
    if (r.ok()) out = std::move(*r);
    return r.status();
  });
  if (!st.ok()) return st;
  return out;
}

absl::StatusOr<std::vector<PutResult>> ClusterClient::PutSpans(absl::string_view model_id,
                                                               absl::Span<const SpanToPut> spans,
                                                               const PutOptions& options) {
  std::vector<PutResult> results;
  results.reserve(spans.size());
  size_t begin = 0;
  while (begin < spans.size()) {
    // The run of spans with the same first owner (in chain order: each run's
    // parent is stored before it is sent).
    const std::vector<std::string> first = Order(spans[begin].hash);
    size_t end = begin + 1;
    while (end < spans.size() && !first.empty() && Order(spans[end].hash).front() == first[0]) {
      ++end;
    }
    const absl::Span<const SpanToPut> run = spans.subspan(begin, end - begin);
    absl::Status st = OnOwner(spans[begin].hash, [&](KvStoreClient* c) {
      absl::StatusOr<std::vector<PutResult>> r = c->PutSpans(model_id, run, options);
      if (r.ok()) results.insert(results.end(), r->begin(), r->end());
      return r.status();
    });
    if (!st.ok()) return st;
    begin = end;
  }
  return results;
}

absl::StatusOr<std::vector<FetchedSpan>> ClusterClient::GetSpans(absl::string_view model_id,
                                                                 absl::Span<const Hash128> hashes,
                                                                 LayerRange layers) {
  // Hashes by first owner, in request order within each.
  std::vector<std::pair<std::string, std::vector<size_t>>> groups;
  for (size_t i = 0; i < hashes.size(); ++i) {
    const std::vector<std::string> order = Order(hashes[i]);
    const std::string owner = order.empty() ? "" : order[0];
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& g) { return g.first == owner; });
    if (it == groups.end()) {
      groups.emplace_back(owner, std::vector<size_t>{i});
    } else {
      it->second.push_back(i);
    }
  }
  std::vector<FetchedSpan> out(hashes.size());
  for (const auto& [owner, idx] : groups) {
    std::vector<Hash128> group;
    for (size_t i : idx) group.push_back(hashes[i]);
    absl::Status st = OnOwner(group[0], [&](KvStoreClient* c) {
      absl::StatusOr<std::vector<FetchedSpan>> r = c->GetSpans(model_id, group, layers);
      if (!r.ok()) return r.status();
      for (size_t j = 0; j < r->size() && j < idx.size(); ++j) {
        FetchedSpan& f = (*r)[j];
        const size_t at = idx[static_cast<size_t>(f.index)];
        f.index = static_cast<int32_t>(at);
        out[at] = std::move(f);
      }
      return absl::OkStatus();
    });
    if (!st.ok()) return st;
  }
  return out;
}

absl::StatusOr<LookupResult> ClusterClient::Lookup(absl::string_view model_id,
                                                   absl::Span<const Hash128> hashes) {
  LookupResult out;
  const Hash128 key = hashes.empty() ? Hash128() : hashes[0];
  absl::Status st = OnOwner(key, [&](KvStoreClient* c) {
    absl::StatusOr<LookupResult> r = c->Lookup(model_id, hashes);
    if (r.ok()) out = std::move(*r);
    return r.status();
  });
  if (!st.ok()) return st;
  return out;
}

absl::StatusOr<std::vector<absl::Status>> ClusterClient::DeleteSpans(
    absl::Span<const Hash128> hashes) {
  std::vector<absl::Status> out;
  const Hash128 key = hashes.empty() ? Hash128() : hashes[0];
  absl::Status st = OnOwner(key, [&](KvStoreClient* c) {
    absl::StatusOr<std::vector<absl::Status>> r = c->DeleteSpans(hashes);
    if (r.ok()) out = std::move(*r);
    return r.status();
  });
  if (!st.ok()) return st;
  return out;
}

absl::StatusOr<v1::NodeStatus> ClusterClient::NodeStatus(const std::string& address) {
  absl::StatusOr<Node*> node = NodeAt(address);
  if (!node.ok()) return node.status();
  std::unique_ptr<grpc::ClientContext> ctx = (*node)->policy->NewContext(
      absl::Now() + std::min(absl::Milliseconds(options_.node.deadline_ms), absl::Seconds(5)));
  v1::NodeStatus s;
  const absl::Status st = FromGrpcStatus(
      (*node)->cluster->GetNodeStatus(ctx.get(), v1::GetNodeStatusRequest(), &s));
  if (!st.ok()) return absl::Status(st.code(), absl::StrCat(address, ": ", st.message()));
  return s;
}

absl::Status ClusterClient::ForgetNode(const std::string& node_id) {
  absl::Status last = absl::UnavailableError("no live node to ask");
  for (const std::string& address : Addresses(Hash128())) {
    absl::StatusOr<Node*> node = NodeAt(address);
    if (!node.ok()) return node.status();
    std::unique_ptr<grpc::ClientContext> ctx = (*node)->policy->NewContext(
        absl::Now() + std::min(absl::Milliseconds(options_.node.deadline_ms), absl::Seconds(10)));
    v1::ForgetNodeRequest request;
    request.set_node_id(node_id);
    v1::ForgetNodeResponse response;
    last = FromGrpcStatus((*node)->cluster->ForgetNode(ctx.get(), request, &response));
    if (!IsNodeFailure(last)) break;
  }
  if (last.ok()) Refresh().IgnoreError();
  return last;
}

}  // namespace kvrecall::client
