#pragma once

// The one logging facade of kvrecall (Abseil 20220623 has no absl/log).
//
//   KVR_LOG(INFO) << "listening on " << address;
//   KVR_CHECK(ptr != nullptr) << "why it cannot be null";
//
// Lines go to stderr as "I1124 16:00:57.123456 12345 file.cc:42] message".
// Log at boundaries (startup, configuration, errors), never per token or per
// span in a loop. FATAL and failed checks abort after logging.

#include <sstream>
#include <string>

#include "absl/strings/string_view.h"

namespace kvrecall {

enum class LogSeverity : int { kInfo = 0, kWarning = 1, kError = 2, kFatal = 3 };

// Lines below this severity are dropped. Default kInfo. Thread-safe.
void SetMinLogSeverity(LogSeverity severity);
LogSeverity MinLogSeverity();

namespace internal {

// Collects one log line and writes it, in one write(2), when destroyed.
// Not thread-safe (one per statement).
class LogMessage {
 public:
  LogMessage(const char* file, int line, LogSeverity severity);
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  ~LogMessage();

  std::ostream& stream() { return stream_; }

 private:
  LogSeverity severity_;
  std::ostringstream stream_;
};

// Swallows a stream expression so that a disabled log statement compiles.
struct LogMessageVoidify {
  void operator&(std::ostream&) {}
};

}  // namespace internal
}  // namespace kvrecall

#define KVR_LOG_SEVERITY_INFO ::kvrecall::LogSeverity::kInfo
#define KVR_LOG_SEVERITY_WARNING ::kvrecall::LogSeverity::kWarning
#define KVR_LOG_SEVERITY_ERROR ::kvrecall::LogSeverity::kError
#define KVR_LOG_SEVERITY_FATAL ::kvrecall::LogSeverity::kFatal

#define KVR_LOG(severity)                                                     \
  !(KVR_LOG_SEVERITY_##severity >= ::kvrecall::MinLogSeverity())              \
      ? (void)0                                                               \
      : ::kvrecall::internal::LogMessageVoidify() &                           \
            ::kvrecall::internal::LogMessage(__FILE__, __LINE__,              \
                                             KVR_LOG_SEVERITY_##severity)     \
                .stream()

#define KVR_CHECK(condition)                                                  \
  (condition) ? (void)0                                                       \
              : ::kvrecall::internal::LogMessageVoidify() &                   \
                    ::kvrecall::internal::LogMessage(__FILE__, __LINE__,      \
                                                     KVR_LOG_SEVERITY_FATAL)  \
                            .stream()                                         \
                        << "Check failed: " #condition " "
