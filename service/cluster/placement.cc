#include "service/cluster/placement.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/checksum.h"

namespace kvrecall::cluster {

uint64_t RendezvousScore(const Hash128& key, absl::string_view node_id) {
  std::string data = key.ToBytes();
  data.append(node_id.data(), node_id.size());
  return Checksum64(data);
}

std::vector<std::string> PlacementOrder(const Hash128& key, absl::Span<const std::string> nodes) {
  std::vector<std::pair<uint64_t, const std::string*>> scored;
  scored.reserve(nodes.size());
  for (const std::string& n : nodes) scored.emplace_back(RendezvousScore(key, n), &n);
  std::sort(scored.begin(), scored.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : *a.second < *b.second;
  });
  std::vector<std::string> out;
  out.reserve(scored.size());
  for (const auto& [score, node] : scored) out.push_back(*node);
  return out;
}

std::vector<std::string> Owners(const Hash128& key, absl::Span<const std::string> nodes,
                                int replication_factor) {
  std::vector<std::string> order = PlacementOrder(key, nodes);
  if (replication_factor >= 0 && order.size() > static_cast<size_t>(replication_factor)) {
    order.resize(static_cast<size_t>(replication_factor));
  }
  return order;
}

absl::Status ValidateNodeId(absl::string_view node_id) {
  if (node_id.empty() || node_id.size() > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("node id '", node_id, "' must be 1..64 characters"));
  }
  for (char c : node_id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "node id '", node_id, "' may only hold letters, digits, '.', '_' and '-'"));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvrecall::cluster
