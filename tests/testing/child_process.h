#pragma once

// A child process for tests and benchmarks that run real programs (kvrecalld,
// redis-server): spawned with its output in a log file, polled, stopped with
// SIGTERM or killed. DaemonProcess (tests/integration) and the benchmarks'
// peers are built on it.

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvrecall::testing {

// Not thread-safe.
class ChildProcess {
 public:
  ChildProcess() = default;
  ~ChildProcess();  // stops the child (Stop()) if it still runs
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // How Spawn opens the log: from empty, or after what earlier runs wrote.
  enum class Log { kTruncate, kAppend };

  // Spawns argv[0] (a path) with `argv`, stdout and stderr to `log_path`,
  // with no signal blocked (it sees SIGTERM even where the caller blocked it).
  absl::Status Spawn(const std::vector<std::string>& argv, const std::string& log_path,
                     Log log = Log::kTruncate);
  // True while the child has not exited (reaps it when it has; wait_status()
  // then says how).
  bool Alive();
  // SIGTERM, then waits up to `timeout` for the child to exit: OK when it
  // exited with status 0, INTERNAL when it exited otherwise, DEADLINE_EXCEEDED
  // when it did not exit in time (it is then killed).
  absl::Status Stop(absl::Duration timeout = absl::Seconds(30));
  // SIGKILL (kill -9) and reap.
  void Kill();

  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  // The waitpid status of the last exit.
  int wait_status() const { return wait_status_; }

 private:
  pid_t pid_ = -1;
  int wait_status_ = 0;
};

// Waits up to `timeout` until `port_file` holds a port (a program started
// with --port_file, such as kvrecalld on port 0) and returns it. INTERNAL
// when the child exits first, DEADLINE_EXCEEDED on timeout.
absl::StatusOr<int> WaitForPortFile(ChildProcess& child, const std::string& port_file,
                                    absl::Duration timeout);

// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read,
// close), for programs that cannot report a port they picked (redis-server).
absl::StatusOr<int> PickFreeLoopbackPort();

}  // namespace kvrecall::testing
