#pragma once

// The cluster commands of `kvrecall` (docs/cluster.md): `cluster status`
// (every node of the cluster --target belongs to: live or down, lease, spans
// held, replication debt and progress) and `cluster forget NODE` (a node
// down for good leaves the known members). Registered on the command's
// CLI::App by RunCli (clients/cli/cli.cc).

#include <ostream>
#include <string>

#include "clients/cli/retrieval_commands.h"

namespace CLI {
class App;
}

namespace kvrecall::cli {

// Not thread-safe (one per command line).
class ClusterCommands {
 public:
  void Register(CLI::App* app);
  bool Handles(const std::string& name) const { return name == "cluster"; }
  // Exit codes as RunCli.
  int Run(CLI::App* cmd, const GlobalOptions& g, std::ostream& out, std::ostream& err);

 private:
  std::string node_to_forget;
};

}  // namespace kvrecall::cli
