#include "clients/cli/cluster_commands.h"

#include <memory>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "clients/cli/output.h"
#include "clients/cpp/cluster_client.h"

namespace kvrecall::cli {
namespace {

std::string Mib(int64_t bytes) { return absl::StrFormat("%.1f", bytes / 1048576.0); }

absl::Status Status(client::ClusterClient& c, const GlobalOptions& g, std::ostream& out) {
  const v1::Membership m = c.membership();
  std::vector<std::pair<const v1::NodeInfo*, absl::StatusOr<v1::NodeStatus>>> rows;
  for (const v1::NodeInfo& n : m.nodes()) {
    rows.emplace_back(&n, n.live() ? c.NodeStatus(n.address())
                                   : absl::StatusOr<v1::NodeStatus>(
                                         absl::UnavailableError("down (no lease)")));
  }
  if (g.json) {
    out << "{\"membership\": " << ToJson(m) << ", \"nodes\": [";
    for (size_t i = 0; i < rows.size(); ++i) {
      out << (i ? ", " : "");
      if (rows[i].second.ok()) {
        out << ToJson(*rows[i].second);
      } else {
        out << "{\"node\": " << ToJson(*rows[i].first) << ", \"error\": \""
            << rows[i].second.status().message() << "\"}";
      }
    }
    out << "]}\n";
    return absl::OkStatus();
  }
  int live = 0;
  int64_t debt = 0, misplaced = 0;
  for (const auto& [n, s] : rows) {
    live += n->live() ? 1 : 0;
    if (s.ok()) {
      debt += s->replication().debt_spans();
      misplaced += s->replication().misplaced_spans();
    }
  }
  out << absl::StrFormat(
      "cluster %s: %d live of %d known nodes, replication factor %d, lease ttl %d s, "
      "placement %s, etcd revision %d\n",
      m.cluster(), live, m.nodes_size(), m.replication_factor(), m.lease_ttl_s(), m.placement(),
      m.revision());
  out << absl::StrFormat("%-12s %-22s %-5s %6s %9s %10s %8s %6s %9s %10s %6s %7s %s\n", "node",
                         "address", "state", "lease", "spans", "MiB", "primary", "debt",
                         "misplaced", "replicated", "moved", "sweeps", "sweep");
  for (const auto& [n, s] : rows) {
    if (!s.ok()) {
      out << absl::StrFormat("%-12s %-22s %-5s %s\n", n->node_id(), n->address(),
                             n->live() ? "error" : "down", s.status().message());
      continue;
    }
    const v1::ReplicationStats& r = s->replication();
    const std::string sweep =
        r.sweep_total() > 0 ? absl::StrFormat("%d/%d", r.sweep_checked(), r.sweep_total())
                            : absl::StrFormat("idle (last %d ms)", r.last_sweep_ms());
    out << absl::StrFormat("%-12s %-22s %-5s %5ds %9d %10s %8d %6d %9d %10d %6d %7d %s\n",
                           n->node_id(), n->address(), s->etcd_connected() ? "live" : "no-etcd",
                           s->lease_ttl_left_s(), s->spans(), Mib(s->bytes()), s->primary_spans(),
                           r.debt_spans(), r.misplaced_spans(), r.replicated_spans(),
                           r.moved_spans(), r.sweeps(), sweep);
  }
  out << absl::StrFormat("replication debt: %d spans short of their copies, %d spans to move\n",
                         debt, misplaced);
  return absl::OkStatus();
}

}  // namespace

void ClusterCommands::Register(CLI::App* app) {
  auto* cluster = app->add_subcommand("cluster", "a kvrecalld cluster: status, forget")
                      ->require_subcommand(1);
  cluster->add_subcommand("status",
                          "every node: live or down, lease, spans, replication debt and progress");
  cluster->add_subcommand("forget", "forget a node that is down for good (admin)")
      ->add_option("node", node_to_forget, "node id")
      ->required();
}

int ClusterCommands::Run(CLI::App* cmd, const GlobalOptions& g, std::ostream& out,
                         std::ostream& err) {
  client::ClusterClientOptions o;
  o.seeds = {g.target};
  o.node = g.client_options();
  o.node.max_attempts = 1;
  absl::StatusOr<std::unique_ptr<client::ClusterClient>> c = client::ClusterClient::Create(o);
  if (!c.ok()) return Fail(err, c.status());
  const std::string verb = cmd->get_subcommands().front()->get_name();
  absl::Status s;
  if (verb == "status") {
    s = Status(**c, g, out);
  } else {
    s = (*c)->ForgetNode(node_to_forget);
    if (s.ok()) out << "forgot node " << node_to_forget << "\n";
  }
  return s.ok() ? kExitOk : Fail(err, s);
}

}  // namespace kvrecall::cli
