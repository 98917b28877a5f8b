#include "tests/testing/etcd_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/npy.h"

extern char** environ;

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

int PickFreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = 0;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

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
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string log = dir_ + "/etcd.log";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(),
                                   O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0], &actions, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return absl::InternalError(absl::StrCat("posix_spawn etcd: ", std::strerror(rc)));
  pid_ = pid;
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return absl::InternalError(
          absl::StrCat("etcd exited during startup (status ", status, "):\n", Log()));
    }
    if (Healthy(client_port_)) return absl::OkStatus();
    absl::SleepFor(absl::Milliseconds(20));  // polling another process's startup
  }
  Kill().IgnoreError();  // the timeout is the error to report
  return absl::DeadlineExceededError(absl::StrCat("etcd did not become healthy:\n", Log()));
}

absl::Status EtcdProcess::Stop(absl::Duration timeout) {
  if (!running()) return absl::OkStatus();
  kill(pid_, SIGTERM);
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return absl::OkStatus();
    }
    absl::SleepFor(absl::Milliseconds(10));  // polling another process's exit
  }
  return Kill();
}

absl::Status EtcdProcess::Kill() {
  if (!running()) return absl::OkStatus();
  kill(pid_, SIGKILL);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return absl::OkStatus();
}

}  // namespace kvrecall::testing
