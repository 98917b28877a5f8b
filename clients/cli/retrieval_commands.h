#pragma once

// The retrieval commands of `kvrecall` (docs/cli.md): open, queries, index
// ls|build|rm, search, attend, artifacts ls|get|put, fit-loki, build-index.
// Registered on the command's CLI::App by RunCli (clients/cli/cli.cc).

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "clients/cpp/client_options.h"
#include "common/progress.h"

namespace CLI {
class App;
}

namespace kvrecall::cli {

// The global options every command shares.
struct GlobalOptions {
  std::string target;
  std::string token;
  // TLS (docs/security.md): --tls, --tls_ca, --tls_cert, --tls_key, --tls_server_name.
  bool tls = false;
  std::string tls_ca, tls_cert, tls_key, tls_server_name;
  int64_t deadline_ms = 0;
  bool json = false;
  bool progress = false;  // draw progress bars on stderr
  // No bar (auto mode, stderr not a terminal): long local work prints a line
  // per stage on stderr instead.
  bool stage_lines = false;

  // How long work shows its stages on stderr.
  ProgressMode progress_mode() const {
    return progress ? ProgressMode::kBar : stage_lines ? ProgressMode::kLines : ProgressMode::kNone;
  }
  // The options of a client of the daemon: address, token, TLS, deadline.
  client::ClientOptions client_options() const {
    client::ClientOptions options;
    options.target = target;
    options.bearer_token = token;
    options.tls = tls;
    options.tls_root_ca_file = tls_ca;
    options.tls_client_cert_file = tls_cert;
    options.tls_client_key_file = tls_key;
    options.tls_server_name = tls_server_name;
    options.deadline_ms = deadline_ms;
    return options;
  }
};

// Not thread-safe (one per command line).
class RetrievalCommands {
 public:
  // Adds the subcommands and their options to `app`.
  void Register(CLI::App* app);
  // True when `name` is one of the subcommands added.
  bool Handles(const std::string& name) const;
  // Runs the parsed subcommand `cmd`. Exit codes as RunCli.
  int Run(CLI::App* cmd, const GlobalOptions& g, std::ostream& out, std::ostream& err);

 private:
  struct Call;
  // One subcommand each (Run picks by name).
  absl::Status Open(const Call& c) const;
  absl::Status AddQueries(const Call& c) const;
  absl::Status Index(const Call& c) const;  // index ls|build|rm
  absl::Status SearchOrAttend(const Call& c) const;
  absl::Status Artifacts(const Call& c) const;  // artifacts ls|get|put
  absl::Status FitLoki(const Call& c) const;
  absl::Status BuildIndexOffline(const Call& c) const;  // build-index

  // Options of the retrieval commands.
  std::string model, context, hashes, hashes_file, tokens, text, salt;
  std::string kind = "roar", params, knobs, build_params, exclude, queries_npy, out_path;
  std::string layers, kv_heads, captures, layout = "nhd", file, description;
  int32_t layer = 0, k = 0;
  int64_t first_position = 0, effort = 0, version = 0, decode = 0, position = -1;
  double budget = 0, wait_s = 3600;
  bool union_per_group = false, no_wait = false, upload = false, renumber = false;
};

}  // namespace kvrecall::cli
