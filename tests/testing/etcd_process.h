#pragma once

// EtcdProcess: a real etcd (Debian's etcd-server, /usr/bin/etcd) on loopback
// ports for cluster tests. Picks two free ports (client and peer) once, so a
// restart on the same data directory serves the same endpoint.
//
//   EtcdProcess etcd(MakeTempDir("etcd"));
//   KVR_ASSERT_OK(etcd.Start());
//   ... --etcd_endpoints=etcd.endpoint() ...
//   KVR_ASSERT_OK(etcd.Stop());   // or Kill(), then Start() again
//
// Not thread-safe.

#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "tests/testing/child_process.h"

namespace kvrecall::testing {

class EtcdProcess {
 public:
  // `dir` holds etcd's data directory and log.
  explicit EtcdProcess(std::string dir);
  ~EtcdProcess();
  EtcdProcess(const EtcdProcess&) = delete;
  EtcdProcess& operator=(const EtcdProcess&) = delete;

  // The etcd binary: $KVRECALL_ETCD_BINARY, else /usr/bin/etcd.
  static std::string BinaryPath();
  // Whether the binary is there (tests skip with a clear message otherwise
  // unless KVRECALL_REQUIRE_ETCD is set).
  static bool Available();

  // Spawns etcd and waits (up to `timeout`) until /health says true.
  absl::Status Start(absl::Duration timeout = absl::Seconds(30));
  // SIGTERM and wait.
  absl::Status Stop(absl::Duration timeout = absl::Seconds(30));
  // SIGKILL and reap.
  absl::Status Kill();

  bool running() const { return process_.running(); }
  // "127.0.0.1:<client port>".
  std::string endpoint() const;
  std::string Log() const;

 private:
  const std::string dir_;
  int client_port_ = 0;
  int peer_port_ = 0;
  ChildProcess process_;
};

// A TCP port on 127.0.0.1 that was free a moment ago, 0 if none could be
// bound (PickFreeLoopbackPort).
int PickFreePort();

}  // namespace kvrecall::testing
