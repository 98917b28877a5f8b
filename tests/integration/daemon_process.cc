#include "tests/integration/daemon_process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/npy.h"

extern char** environ;

namespace kvrecall::testing {
namespace {

std::string ParentOf(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

}  // namespace

DaemonProcess::DaemonProcess(std::string data_dir, std::vector<std::string> extra_flags)
    : data_dir_(std::move(data_dir)),
      extra_flags_(std::move(extra_flags)),
      port_file_(ParentOf(data_dir_) + "/kvrecalld.port"),
      log_file_(ParentOf(data_dir_) + "/kvrecalld.log") {}

DaemonProcess::~DaemonProcess() {
  if (running()) Kill().IgnoreError();  // best effort in a test's teardown
}

std::string DaemonProcess::BinaryPath() {
  const char* dir = std::getenv("KVRECALL_BINARY_DIR");
  return absl::StrCat(dir != nullptr && *dir != '\0' ? dir : KVRECALL_BUILD_DIR, "/bin/kvrecalld");
}

std::string DaemonProcess::address() const { return absl::StrCat("127.0.0.1:", port_); }

std::string DaemonProcess::Log() const {
  auto log = ReadFileToString(log_file_);
  return log.ok() ? *log : std::string();
}

absl::Status DaemonProcess::Start(absl::Duration timeout) {
  if (running()) return absl::FailedPreconditionError("kvrecalld is already running");
  const std::string binary = BinaryPath();
  if (access(binary.c_str(), X_OK) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(binary, " is missing: build kvrecalld"));
  }
  unlink(port_file_.c_str());
  std::vector<std::string> args = {binary, "--listen=127.0.0.1:0",
                                   "--port_file=" + port_file_, "--data_dir=" + data_dir_};
  args.insert(args.end(), extra_flags_.begin(), extra_flags_.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_file_.c_str(),
                                   O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  // The daemon must see SIGTERM even if the test blocked it.
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, binary.c_str(), &actions, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return absl::InternalError(absl::StrCat("posix_spawn: ", std::strerror(rc)));
  pid_ = pid;

  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return absl::InternalError(absl::StrCat("kvrecalld exited during startup (status ", status,
                                              "):\n", Log()));
    }
    auto text = ReadFileToString(port_file_);
    int port = 0;
    if (text.ok() && absl::SimpleAtoi(absl::StripAsciiWhitespace(*text), &port) && port > 0) {
      port_ = port;
      return absl::OkStatus();
    }
    absl::SleepFor(absl::Milliseconds(5));  // polling another process's startup
  }
  Kill().IgnoreError();  // the timeout is the error to report
  return absl::DeadlineExceededError(absl::StrCat("kvrecalld did not start:\n", Log()));
}

absl::Status DaemonProcess::Stop(absl::Duration timeout) {
  if (!running()) return absl::OkStatus();
  kill(pid_, SIGTERM);
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return absl::OkStatus();
      return absl::InternalError(absl::StrCat("kvrecalld exited with status ", status, ":\n",
                                              Log()));
    }
    absl::SleepFor(absl::Milliseconds(5));  // polling another process's exit
  }
  Kill().IgnoreError();  // the timeout is the error to report
  return absl::DeadlineExceededError("kvrecalld did not stop on SIGTERM");
}

absl::Status DaemonProcess::Kill() {
  if (!running()) return absl::OkStatus();
  kill(pid_, SIGKILL);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return absl::OkStatus();
}

}  // namespace kvrecall::testing
