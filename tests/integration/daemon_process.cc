#include "tests/integration/daemon_process.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "common/npy.h"

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
  // Appended: a restart on the same data directory keeps the earlier runs' log.
  if (absl::Status s = process_.Spawn(args, log_file_, ChildProcess::Log::kAppend); !s.ok()) {
    return s;
  }
  absl::StatusOr<int> port = WaitForPortFile(process_, port_file_, timeout);
  if (port.ok()) {
    port_ = *port;
    return absl::OkStatus();
  }
  Kill().IgnoreError();  // the startup failure is the error to report
  return absl::Status(port.status().code(),
                      absl::StrCat("kvrecalld ", port.status().message(), ":\n", Log()));
}

absl::Status DaemonProcess::Stop(absl::Duration timeout) {
  if (absl::Status s = process_.Stop(timeout); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("kvrecalld ", s.message(), ":\n", Log()));
  }
  return absl::OkStatus();
}

absl::Status DaemonProcess::Kill() {
  process_.Kill();
  return absl::OkStatus();
}

}  // namespace kvrecall::testing
