#include "service/cluster/cluster_flags.h"

#include <fstream>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

ABSL_FLAG(std::string, etcd_endpoints, "",
          "Comma-separated host:port of etcd (v3 API). Set: this daemon is a node of the "
          "cluster --cluster_name (docs/cluster.md). Empty: it runs alone. Default empty.");
ABSL_FLAG(std::string, cluster_name, "default",
          "The cluster's name: its etcd keys live under /kvrecall/<name>/. Default \"default\".");
ABSL_FLAG(std::string, node_id, "",
          "This node's id, unique in the cluster: 1..64 of [A-Za-z0-9._-]. Required with "
          "--etcd_endpoints.");
ABSL_FLAG(std::string, advertise, "",
          "host:port where clients and the other nodes reach this node. Default: the "
          "--listen address when it names a host (not 0.0.0.0 or port 0).");
ABSL_FLAG(int32_t, replication_factor, 0,
          "Copies of every span (R) for a new cluster; 0 adopts the cluster's (2 for a new "
          "one). A node asking for another R than the cluster's refuses to start. Default 0.");
ABSL_FLAG(int64_t, lease_ttl_s, 10,
          "etcd lease of this node, seconds: a node that dies leaves the membership, and "
          "clients reroute, within it. Range 2..300. Default 10.");
ABSL_FLAG(int64_t, replication_interval_s, 30,
          "Seconds between background replication sweeps when the membership does not change "
          "(a change starts one at once). Range 1..86400. Default 30.");
ABSL_FLAG(std::string, cluster_token_file, "",
          "File holding the secret nodes send each other (x-kvrecall-peer-token). Required "
          "with a tenants file; every node of the cluster must have the same. Default empty.");

namespace kvrecall::cluster {

absl::StatusOr<std::optional<ClusterOptions>> ClusterOptionsFromFlags(
    const rpc::ServerOptions& server) {
  const std::string endpoints = absl::GetFlag(FLAGS_etcd_endpoints);
  if (endpoints.empty()) return std::optional<ClusterOptions>();
  ClusterOptions o;
  for (absl::string_view e : absl::StrSplit(endpoints, ',', absl::SkipWhitespace())) {
    o.membership.etcd_endpoints.emplace_back(absl::StripAsciiWhitespace(e));
  }
  o.membership.cluster_name = absl::GetFlag(FLAGS_cluster_name);
  o.membership.node_id = absl::GetFlag(FLAGS_node_id);
  if (o.membership.node_id.empty()) {
    return absl::InvalidArgumentError("--node_id is required with --etcd_endpoints");
  }
  o.membership.advertise = absl::GetFlag(FLAGS_advertise);
  if (o.membership.advertise.empty()) {
    const std::string& listen = server.listen_address;
    const size_t colon = listen.rfind(':');
    const std::string host = colon == std::string::npos ? "" : listen.substr(0, colon);
    const std::string port = colon == std::string::npos ? "" : listen.substr(colon + 1);
    if (host.empty() || host == "0.0.0.0" || host == "[::]" || port == "0") {
      return absl::InvalidArgumentError(absl::StrCat(
          "--advertise is required when --listen (", listen,
          ") does not name the host and port other nodes can dial"));
    }
    o.membership.advertise = listen;
  }
  o.membership.replication_factor = absl::GetFlag(FLAGS_replication_factor);
  if (o.membership.replication_factor < 0 || o.membership.replication_factor > 16) {
    return absl::InvalidArgumentError("--replication_factor must be in 0..16");
  }
  o.membership.lease_ttl_s = absl::GetFlag(FLAGS_lease_ttl_s);
  if (o.membership.lease_ttl_s < 2 || o.membership.lease_ttl_s > 300) {
    return absl::InvalidArgumentError("--lease_ttl_s must be in 2..300");
  }
  const int64_t interval = absl::GetFlag(FLAGS_replication_interval_s);
  if (interval < 1 || interval > 86400) {
    return absl::InvalidArgumentError("--replication_interval_s must be in 1..86400");
  }
  o.replicator.interval = absl::Seconds(interval);
  const std::string token_file = absl::GetFlag(FLAGS_cluster_token_file);
  if (!token_file.empty()) {
    std::ifstream in(token_file);
    if (!in) {
      return absl::InvalidArgumentError(
          absl::StrCat("--cluster_token_file: cannot read ", token_file));
    }
    std::stringstream ss;
    ss << in.rdbuf();
    o.peers.peer_token = std::string(absl::StripAsciiWhitespace(ss.str()));
    if (o.peers.peer_token.size() < 16) {
      return absl::InvalidArgumentError(
          "--cluster_token_file: the secret must be at least 16 characters");
    }
  } else if (!server.tenants_file.empty()) {
    return absl::InvalidArgumentError(
        "--cluster_token_file is required with --tenants_file and --etcd_endpoints (the "
        "nodes prove to each other that they belong to the cluster)");
  }
  if (!server.tls_cert_file.empty()) {
    o.peers.tls = true;
    o.peers.tls_ca_file = server.tls_client_ca_file;
    o.peers.tls_cert_file = server.tls_cert_file;
    o.peers.tls_key_file = server.tls_key_file;
  }
  o.max_span_bytes = server.max_span_bytes;
  o.peers.max_message_bytes = server.max_message_bytes;
  o.membership.host_id = LocalHostId();
  return std::optional<ClusterOptions>(std::move(o));
}

std::vector<std::pair<std::string, std::string>> ClusterFlagsForConfig() {
  return {
      {"etcd_endpoints", absl::GetFlag(FLAGS_etcd_endpoints)},
      {"cluster_name", absl::GetFlag(FLAGS_cluster_name)},
      {"node_id", absl::GetFlag(FLAGS_node_id)},
      {"advertise", absl::GetFlag(FLAGS_advertise)},
      {"replication_factor", absl::StrCat(absl::GetFlag(FLAGS_replication_factor))},
      {"lease_ttl_s", absl::StrCat(absl::GetFlag(FLAGS_lease_ttl_s))},
      {"replication_interval_s", absl::StrCat(absl::GetFlag(FLAGS_replication_interval_s))},
      {"cluster_token_file", absl::GetFlag(FLAGS_cluster_token_file)},
  };
}

}  // namespace kvrecall::cluster
