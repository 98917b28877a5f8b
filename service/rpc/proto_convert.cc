#include "service/rpc/proto_convert.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvrecall::rpc {

v1::DType DTypeToProto(DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return v1::DTYPE_F16;
    case DType::kBf16:
      return v1::DTYPE_BF16;
    case DType::kF32:
      return v1::DTYPE_F32;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, absl::string_view field) {
  switch (dtype) {
    case v1::DTYPE_F16:
      return DType::kF16;
    case v1::DTYPE_BF16:
      return DType::kBf16;
    case v1::DTYPE_F32:
      return DType::kF32;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": dtype must be DTYPE_F16, DTYPE_BF16 or DTYPE_F32 (got ",
                       static_cast<int>(dtype), ")"));
  }
}

v1::MissReason MissReasonToProto(store::MissReason reason) {
  switch (reason) {
    case store::MissReason::kNone:
      return v1::MISS_REASON_UNSPECIFIED;
    case store::MissReason::kNeverStored:
      return v1::MISS_REASON_NEVER_STORED;
    case store::MissReason::kEvicted:
      return v1::MISS_REASON_EVICTED;
    case store::MissReason::kDeleted:
      return v1::MISS_REASON_DELETED;
    case store::MissReason::kModelMismatch:
      return v1::MISS_REASON_MODEL_MISMATCH;
    case store::MissReason::kChecksumFailure:
      return v1::MISS_REASON_CHECKSUM_FAILURE;
    case store::MissReason::kOtherNamespace:
      return v1::MISS_REASON_OTHER_NAMESPACE;
    case store::MissReason::kParentMissing:
      return v1::MISS_REASON_PARENT_MISSING;
    case store::MissReason::kOwnerUnavailable:
      return v1::MISS_REASON_OWNER_UNAVAILABLE;
  }
  return v1::MISS_REASON_UNSPECIFIED;
}

absl::string_view MissReasonText(store::MissReason reason) {
  switch (reason) {
    case store::MissReason::kNone:
      return "none";
    case store::MissReason::kNeverStored:
      return "never_stored";
    case store::MissReason::kEvicted:
      return "evicted";
    case store::MissReason::kDeleted:
      return "deleted";
    case store::MissReason::kModelMismatch:
      return "model_mismatch";
    case store::MissReason::kChecksumFailure:
      return "checksum_failure";
    case store::MissReason::kOtherNamespace:
      return "other_namespace";
    case store::MissReason::kParentMissing:
      return "parent_missing";
    case store::MissReason::kOwnerUnavailable:
      return "owner_unavailable";
  }
  return "unknown";
}

v1::Tier TierToProto(store::TierId tier) {
  switch (tier) {
    case store::TierId::kMemory:
      return v1::TIER_MEMORY;
    case store::TierId::kDisk:
      return v1::TIER_DISK;
    case store::TierId::kRocksDb:
      return v1::TIER_ROCKSDB;
  }
  return v1::TIER_UNSPECIFIED;
}

absl::StatusOr<Hash128> HashFromProto(absl::string_view bytes, absl::string_view field) {
  if (bytes.size() != 16) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": a span hash is 16 bytes (docs/hashing.md), got ", bytes.size()));
  }
  return Hash128::FromBytes(bytes);
}

v1::ModelGeometry GeometryToProto(const store::ModelGeometry& geometry) {
  v1::ModelGeometry proto;
  proto.set_model_id(geometry.model_id);
  proto.set_num_layers(geometry.num_layers);
  proto.set_num_q_heads(geometry.num_q_heads);
  proto.set_num_kv_heads(geometry.num_kv_heads);
  proto.set_head_dim(geometry.head_dim);
  proto.set_dtype(DTypeToProto(geometry.dtype));
  proto.set_keys_post_rope(geometry.keys_post_rope);
  proto.set_block_tokens(geometry.block_tokens);
  return proto;
}

absl::StatusOr<store::ModelGeometry> GeometryFromProto(const v1::ModelGeometry& proto) {
  store::ModelGeometry g;
  if (proto.model_id().empty() || proto.model_id().size() > 256) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.model_id: must be 1..256 bytes, got ", proto.model_id().size()));
  }
  g.model_id = proto.model_id();
  auto positive = [](absl::string_view field, int32_t v, int32_t max) -> absl::Status {
    if (v < 1 || v > max) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.", field, ": must be in 1..", max, ", got ", v));
    }
    return absl::OkStatus();
  };
  KVR_RETURN_IF_ERROR(positive("num_layers", proto.num_layers(), 4096));
  KVR_RETURN_IF_ERROR(positive("num_q_heads", proto.num_q_heads(), 4096));
  KVR_RETURN_IF_ERROR(positive("num_kv_heads", proto.num_kv_heads(), 4096));
  KVR_RETURN_IF_ERROR(positive("head_dim", proto.head_dim(), 65536));
  if (proto.num_q_heads() % proto.num_kv_heads() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.num_q_heads (", proto.num_q_heads(),
                     ") must be a multiple of model.num_kv_heads (", proto.num_kv_heads(), ")"));
  }
  KVR_ASSIGN_OR_RETURN(g.dtype, DTypeFromProto(proto.dtype(), "model.dtype"));
  g.num_layers = proto.num_layers();
  g.num_q_heads = proto.num_q_heads();
  g.num_kv_heads = proto.num_kv_heads();
  g.head_dim = proto.head_dim();
  g.keys_post_rope = proto.keys_post_rope();
  g.block_tokens = proto.block_tokens() == 0 ? 256 : proto.block_tokens();
  KVR_RETURN_IF_ERROR(positive("block_tokens", g.block_tokens, 65536));
  return g;
}

bool SameGeometry(const store::ModelGeometry& a, const store::ModelGeometry& b) {
  return a.model_id == b.model_id && a.num_layers == b.num_layers &&
         a.num_q_heads == b.num_q_heads && a.num_kv_heads == b.num_kv_heads &&
         a.head_dim == b.head_dim && a.dtype == b.dtype && a.keys_post_rope == b.keys_post_rope &&
         a.block_tokens == b.block_tokens;
}

}  // namespace kvrecall::rpc
