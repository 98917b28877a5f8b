#pragma once

// Output helpers shared by the `kvrecall` commands: a failed call's message
// and exit code, and protobuf messages as JSON for --json.

#include <ostream>
#include <string>

#include "absl/status/status.h"
#include <google/protobuf/message.h>

namespace kvrecall::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;
inline constexpr int kExitUsage = 2;

// Prints "kvrecall: CODE: message" to `err`; returns kExitFailed.
int Fail(std::ostream& err, const absl::Status& status);

// The message as indented JSON with proto field names and default values ("{}" on error).
std::string ToJson(const google::protobuf::Message& message);

}  // namespace kvrecall::cli
