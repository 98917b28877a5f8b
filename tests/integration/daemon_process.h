#pragma once

// DaemonProcess: a kvrecalld child process for process-level tests. Starts
// <build>/bin/kvrecalld on 127.0.0.1 port 0 with --port_file, waits until it
// serves, and stops it with SIGTERM (graceful) or SIGKILL (crash). The data
// directory survives Stop()/Kill(), so Start() again restarts on it.

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "tests/testing/child_process.h"

namespace kvrecall::testing {

// Not thread-safe.
class DaemonProcess {
 public:
  // `data_dir` is created by the daemon; `extra_flags` are passed as given
  // (e.g. "--memory_capacity_bytes=1MiB").
  DaemonProcess(std::string data_dir, std::vector<std::string> extra_flags);
  // Kills the daemon if it still runs.
  ~DaemonProcess();
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;

  // Path of kvrecalld: $KVRECALL_BINARY_DIR/bin/kvrecalld, else the build
  // directory this helper was compiled in.
  static std::string BinaryPath();

  // Spawns the daemon and waits (up to `timeout`) until it wrote its port.
  // FAILED_PRECONDITION when the binary is missing; INTERNAL when it exits
  // early (its log is in the message); DEADLINE_EXCEEDED on timeout.
  absl::Status Start(absl::Duration timeout = absl::Seconds(60));
  // SIGTERM, then waits for a clean exit; the status says how it exited.
  absl::Status Stop(absl::Duration timeout = absl::Seconds(60));
  // SIGKILL (kill -9) and reap.
  absl::Status Kill();

  bool running() const { return process_.running(); }
  pid_t pid() const { return process_.pid(); }
  int port() const { return port_; }
  // "127.0.0.1:<port>".
  std::string address() const;
  const std::string& data_dir() const { return data_dir_; }
  // Everything the daemon wrote to stdout and stderr so far.
  std::string Log() const;

 private:
  const std::string data_dir_;
  const std::vector<std::string> extra_flags_;
  const std::string port_file_;
  const std::string log_file_;
  ChildProcess process_;
  int port_ = 0;
};

}  // namespace kvrecall::testing
