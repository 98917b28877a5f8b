#include "service/store/span.h"

namespace kvrecall::store {

absl::string_view MissReasonName(MissReason reason) {
  switch (reason) {
    case MissReason::kNone:
      return "none";
    case MissReason::kNeverStored:
      return "never_stored";
    case MissReason::kEvicted:
      return "evicted";
    case MissReason::kDeleted:
      return "deleted";
    case MissReason::kModelMismatch:
      return "model_mismatch";
    case MissReason::kChecksumFailure:
      return "checksum_failure";
    case MissReason::kOtherNamespace:
      return "other_namespace";
    case MissReason::kParentMissing:
      return "parent_missing";
    case MissReason::kOwnerUnavailable:
      return "owner_unavailable";
  }
  return "unknown";
}

absl::string_view TierName(TierId tier) {
  switch (tier) {
    case TierId::kMemory:
      return "memory";
    case TierId::kDisk:
      return "disk";
    case TierId::kRocksDb:
      return "rocksdb";
  }
  return "unknown";
}

}  // namespace kvrecall::store
