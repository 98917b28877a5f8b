#pragma once

// Placement of spans and contexts over the live nodes of a kvrecalld cluster
// (docs/cluster.md): rendezvous (highest random weight) hashing. Every node
// and every client (C++ here, Python kvrecall.cluster) computes the same
// order from the same membership; both pass tests/vectors/placement_vectors.tsv.
//
//   score(node, key) = XXH3-64 (seed 0) of key's 16 canonical bytes followed
//                      by the node id's bytes
//   order(key)       = nodes by descending score, ties by ascending node id
//   owners(key, R)   = the first min(R, nodes) of order(key)
//
// A node joining or leaving moves only the keys it gains or loses (about 1/N
// of them), and every key's owners are spread evenly.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/types.h"

namespace kvrecall::cluster {

// The name of this placement function, published in the membership so that
// a client implementing another one can refuse to route.
inline constexpr absl::string_view kPlacementVersion = "rendezvous-xxh3-64.v1";

// Rendezvous score of `node_id` for `key`.
uint64_t RendezvousScore(const Hash128& key, absl::string_view node_id);

// `nodes` in placement order for `key` (highest score first). Duplicates are
// kept; callers pass distinct ids.
std::vector<std::string> PlacementOrder(const Hash128& key, absl::Span<const std::string> nodes);

// The first min(replication_factor, nodes.size()) of PlacementOrder.
std::vector<std::string> Owners(const Hash128& key, absl::Span<const std::string> nodes,
                                int replication_factor);

// Node ids are 1..64 bytes of [A-Za-z0-9._-] (they appear in etcd keys,
// metrics labels and the placement vectors). INVALID_ARGUMENT otherwise.
absl::Status ValidateNodeId(absl::string_view node_id);

}  // namespace kvrecall::cluster
