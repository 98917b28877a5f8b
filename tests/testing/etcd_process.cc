#include "tests/testing/etcd_process.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/npy.h"

namespace kvrecall::testing {
namespace {

// GET /health over a plain socket; true when etcd answers {"health":"true"}.
bool Healthy(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{1, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  bool ok = false;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request = "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
      std::string response;
      char buf[1024];
      ssize_t n;
      while ((n = read(fd, buf, sizeof(buf))) > 0) response.append(buf, static_cast<size_t>(n));
      ok = absl::StrContains(response, "\"health\":\"true\"");
    }
  }
  close(fd);
  return ok;
}

}  // namespace

int PickFreePort() { return PickFreeLoopbackPort().value_or(0); }

EtcdProcess::EtcdProcess(std::string dir) : dir_(std::move(dir)) {}

EtcdProcess::~EtcdProcess() {
  if (running()) Kill().IgnoreError();  // best effort in a test's teardown
}

std::string EtcdProcess::BinaryPath() {
  const char* bin = std::getenv("KVRECALL_ETCD_BINARY");
  return bin != nullptr && *bin != '\0' ? bin : "/usr/bin/etcd";
}

bool EtcdProcess::Available() { return access(BinaryPath().c_str(), X_OK) == 0; }

std::string EtcdProcess::endpoint() const { return absl::StrCat("127.0.0.1:", client_port_); }

std::string EtcdProcess::Log() const {
  auto log = ReadFileToString(dir_ + "/etcd.log");
  return log.ok() ? *log : std::string();
}

absl::Status EtcdProcess::Start(absl::Duration timeout) {
  if (running()) return absl::FailedPreconditionError("etcd is already running");
  if (!Available()) {
    return absl::FailedPreconditionError(
        absl::StrCat(BinaryPath(), " is missing: apt-get install etcd-server"));
  }
  if (client_port_ == 0) {
    client_port_ = PickFreePort();
    peer_port_ = PickFreePort();
    if (client_port_ == 0 || peer_port_ == 0 || client_port_ == peer_port_) {
      return absl::InternalError("cannot find free loopback ports for etcd");
    }
  }
  const std::string client = absl::StrCat("http://127.0.0.1:", client_port_);
  const std::string peer = absl::StrCat("http://127.0.0.1:", peer_port_);
  std::vector<std::string> args = {BinaryPath(),
                                   "--name=kvr",
                                   "--data-dir=" + dir_ + "/data",
                                   "--listen-client-urls=" + client,
                                   "--advertise-client-urls=" + client,
                                   "--listen-peer-urls=" + peer,
                                   "--initial-advertise-peer-urls=" + peer,
                                   "--initial-cluster=kvr=" + peer,
                                   "--logger=zap",
                                   "--log-level=warn"};
  // Appended: a restart on the same data directory keeps the earlier runs' log.
  const std::string log = dir_ + "/etcd.log";
  if (absl::Status s = process_.Spawn(args, log, ChildProcess::Log::kAppend); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("etcd: ", s.message()));
  }
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (!process_.Alive()) {
      return absl::InternalError(absl::StrCat("etcd exited during startup (status ",
                                              process_.wait_status(), "):\n", Log()));
    }
    if (Healthy(client_port_)) return absl::OkStatus();
    absl::SleepFor(absl::Milliseconds(20));  // polling another process's startup
  }
  Kill().IgnoreError();  // the timeout is the error to report
  return absl::DeadlineExceededError(absl::StrCat("etcd did not become healthy:\n", Log()));
}

absl::Status EtcdProcess::Stop(absl::Duration timeout) {
  // Any exit after SIGTERM counts as stopped (the tests check what etcd
  // kept, not how it exited); one that does not stop in time is killed.
  process_.Stop(timeout).IgnoreError();
  return absl::OkStatus();
}

absl::Status EtcdProcess::Kill() {
  process_.Kill();
  return absl::OkStatus();
}

}  // namespace kvrecall::testing
