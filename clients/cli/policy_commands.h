#pragma once

// The layer-policy commands of `kvrecall` (docs/cli.md): profile-policy (the
// HyLRA profiler and dynamic program over attention captures) and policy
// put|get|ls|tidal (role tables stored as `layer_policy` artifacts).
// Registered on the command's CLI::App by RunCli (clients/cli/cli.cc).

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "clients/cli/retrieval_commands.h"
#include "gpu/worker/hylra.h"
#include "gpu/worker/policy.h"

namespace CLI {
class App;
}

namespace kvrecall::cli {

// Not thread-safe (one per command line).
class PolicyCommands {
 public:
  // Adds the subcommands and their options to `app`.
  void Register(CLI::App* app);
  // True when `name` is one of the subcommands added.
  bool Handles(const std::string& name) const;
  // Runs the parsed subcommand `cmd`. Exit codes as RunCli.
  int Run(CLI::App* cmd, const GlobalOptions& g, std::ostream& out, std::ostream& err);

 private:
  // One subcommand each (Run picks by name).
  absl::Status ProfilePolicy(const GlobalOptions& g, std::ostream& out, std::ostream& err) const;
  absl::Status Tidal(const GlobalOptions& g, std::ostream& out) const;  // policy tidal
  absl::Status Put(const GlobalOptions& g, std::ostream& out) const;    // policy put
  absl::Status Get(const GlobalOptions& g, std::ostream& out) const;    // policy get
  absl::Status List(const GlobalOptions& g, std::ostream& out) const;   // policy ls
  // profile-policy: the HyLRA profiles of --captures, and the plan's options.
  absl::StatusOr<std::vector<worker::HylraProfile>> Profile(
      const worker::Budget& b, const worker::StepSelection& step_selection, const GlobalOptions& g,
      std::ostream& err) const;
  worker::HylraPlanOptions PlanOptions(const worker::LayerSpec& sel, size_t profiled_layers) const;

  // profile-policy
  std::string captures, model, select = "local:exact", knobs, steps = "last:256";
  std::string score = "mass", head_merge = "min", out_path, name;
  double budget = 0, full_threshold = 0;
  int32_t k = 0, max_compute = 0, n_full = 0, sinks = 4, window = 64, num_layers = 0;
  int32_t threads = 0;
  bool renumber = false, reuse_full = false, upload = false;
  // policy put|get|ls|tidal
  std::string file, description, remote;
  int64_t version = 0;
  int32_t tidal_num_full = 2, select_layer = 2, reselect = -1;
  int32_t tidal_sinks = 0, tidal_window = 1;
};

}  // namespace kvrecall::cli
