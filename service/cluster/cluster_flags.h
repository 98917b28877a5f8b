#pragma once

// The cluster flags of kvrecalld (docs/cluster.md, docs/config.md) and the
// function that turns them into ClusterOptions. Without --etcd_endpoints the
// daemon runs alone (nullopt).

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "service/cluster/cluster_node.h"
#include "service/rpc/server_options.h"

namespace kvrecall::cluster {

// Reads the cluster flags; nullopt when --etcd_endpoints is empty.
// INVALID_ARGUMENT naming the flag when one is wrong. `server` supplies the
// TLS settings used to dial peers and the largest span.
absl::StatusOr<std::optional<ClusterOptions>> ClusterOptionsFromFlags(
    const rpc::ServerOptions& server);

// The cluster flags and their values, for the effective config
// (ServerOptions::additional_flags).
std::vector<std::pair<std::string, std::string>> ClusterFlagsForConfig();

}  // namespace kvrecall::cluster

ABSL_DECLARE_FLAG(std::string, etcd_endpoints);
ABSL_DECLARE_FLAG(std::string, cluster_name);
ABSL_DECLARE_FLAG(std::string, node_id);
ABSL_DECLARE_FLAG(std::string, advertise);
ABSL_DECLARE_FLAG(int32_t, replication_factor);
ABSL_DECLARE_FLAG(int64_t, lease_ttl_s);
ABSL_DECLARE_FLAG(int64_t, replication_interval_s);
ABSL_DECLARE_FLAG(std::string, cluster_token_file);
