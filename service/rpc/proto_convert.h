#pragma once

// Conversions between the store's value types (service/store/span.h) and the
// kvrecall.v1 messages. Nothing else: request validation lives in the
// services.

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/types.h"
#include "kvrecall/v1/common.pb.h"
#include "kvrecall/v1/kv_store.pb.h"
#include "service/store/span.h"

namespace kvrecall::rpc {

v1::DType DTypeToProto(DType dtype);
// INVALID_ARGUMENT for DTYPE_UNSPECIFIED or an unknown value; `field` names
// the field in the message.
absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, absl::string_view field);

v1::MissReason MissReasonToProto(store::MissReason reason);
v1::Tier TierToProto(store::TierId tier);
// Lowercase name of a miss reason ("never_stored", ...), for messages and metrics.
absl::string_view MissReasonText(store::MissReason reason);

// A span hash field: exactly 16 bytes, else INVALID_ARGUMENT naming `field`.
absl::StatusOr<Hash128> HashFromProto(absl::string_view bytes, absl::string_view field);

v1::ModelGeometry GeometryToProto(const store::ModelGeometry& geometry);
// Converts and validates a geometry (INVALID_ARGUMENT naming the field):
// non-empty model id of at most 256 bytes, positive sizes, q heads a multiple
// of kv heads, a dtype; block_tokens 0 becomes 256, at most 65536.
absl::StatusOr<store::ModelGeometry> GeometryFromProto(const v1::ModelGeometry& proto);

bool SameGeometry(const store::ModelGeometry& a, const store::ModelGeometry& b);

}  // namespace kvrecall::rpc
