#pragma once

// The one converter between absl::Status and grpc::Status. Both use the
// canonical code numbering (google.rpc.Code), so codes map one to one and
// messages are kept.

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include <grpcpp/support/status.h>

namespace kvrecall::rpc {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// "OK", "CANCELLED", ..., "UNAUTHENTICATED" for codes 0..16; "UNKNOWN" otherwise.
absl::string_view StatusCodeName(int code);

}  // namespace kvrecall::rpc
