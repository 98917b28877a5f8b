#pragma once

// A child process for the benchmark's peers (kvrecalld, redis-server):
// spawned with its output in a log file, stopped with SIGTERM.

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvrecall::bench {

// Not thread-safe.
class ChildProcess {
 public:
  ChildProcess() = default;
  ~ChildProcess();  // stops the child if it still runs
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // Spawns argv[0] (a path) with `argv`, stdout and stderr to `log_path`.
  absl::Status Spawn(const std::vector<std::string>& argv, const std::string& log_path);
  // True while the child has not exited (reaps it when it has).
  bool Alive();
  // SIGTERM, wait up to `timeout`, then SIGKILL.
  void Stop(absl::Duration timeout = absl::Seconds(30));
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
};

// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read,
// close). Used for redis-server, which cannot report a port it picked.
absl::StatusOr<int> PickFreeLoopbackPort();

}  // namespace kvrecall::bench
