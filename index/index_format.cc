#include "index/index_format.h"

#include "absl/strings/str_cat.h"
#include "common/checksum.h"
#include "common/status_macros.h"

namespace kvrecall::index {

absl::Status ByteReader::Truncated() {
  return absl::DataLossError("index bytes are truncated or corrupt");
}

absl::StatusOr<std::string> ByteReader::GetString() {
  KVR_ASSIGN_OR_RETURN(uint32_t n, Get<uint32_t>());
  if (n > in_.size()) return Truncated();
  std::string s(in_.substr(0, n));
  in_.remove_prefix(n);
  return s;
}

absl::Status ByteReader::GetBytes(void* out, size_t n) {
  if (n > in_.size()) return Truncated();
  if (n == 0) return absl::OkStatus();  // `out` may be null (an empty vector's data())
  std::memcpy(out, in_.data(), n);
  in_.remove_prefix(n);
  return absl::OkStatus();
}

absl::Status ReadPayloadVersion(const IndexHeader& header, absl::string_view kind,
                                uint32_t version, ByteReader* reader) {
  if (header.kind != kind) {
    return absl::InvalidArgumentError(
        absl::StrCat("index bytes hold kind '", header.kind, "', not '", kind, "'"));
  }
  KVR_ASSIGN_OR_RETURN(uint32_t found, reader->Get<uint32_t>());
  if (found != version) {
    return absl::FailedPreconditionError(absl::StrCat(kind, " payload version ", found,
                                                      " is not supported (this build reads ",
                                                      version, ")"));
  }
  return absl::OkStatus();
}

std::string EncodeIndex(const IndexHeader& header, absl::string_view payload) {
  std::string fields;
  ByteWriter w(&fields);
  w.PutString(header.kind);
  w.Put<uint32_t>(static_cast<uint32_t>(header.dim));
  w.Put<uint64_t>(static_cast<uint64_t>(header.size));
  w.Put<uint8_t>(static_cast<uint8_t>(header.key_dtype));
  w.PutString(header.build_params.ToString());
  w.Put<uint64_t>(payload.size());
  w.Put<uint64_t>(Checksum64(payload));
  std::string out(kIndexMagic, sizeof(kIndexMagic));
  ByteWriter o(&out);
  o.Put<uint32_t>(kIndexFormatVersion);
  o.Put<uint32_t>(static_cast<uint32_t>(fields.size()));
  out += fields;
  out.append(payload.data(), payload.size());
  return out;
}

absl::StatusOr<std::pair<IndexHeader, absl::string_view>> DecodeIndex(absl::string_view bytes) {
  if (bytes.size() < 16 || std::memcmp(bytes.data(), kIndexMagic, 8) != 0) {
    return absl::DataLossError("not a kvrecall index (bad magic)");
  }
  ByteReader r(bytes.substr(8));
  KVR_ASSIGN_OR_RETURN(uint32_t version, r.Get<uint32_t>());
  if (version != kIndexFormatVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        "index format version ", version, " is not supported (this build reads ",
        kIndexFormatVersion, ")"));
  }
  KVR_ASSIGN_OR_RETURN(uint32_t header_len, r.Get<uint32_t>());
  if (header_len > bytes.size() - 16) return absl::DataLossError("index header truncated");
  ByteReader h(bytes.substr(16, header_len));
  IndexHeader header;
  KVR_ASSIGN_OR_RETURN(header.kind, h.GetString());
  KVR_ASSIGN_OR_RETURN(uint32_t dim, h.Get<uint32_t>());
  KVR_ASSIGN_OR_RETURN(uint64_t size, h.Get<uint64_t>());
  KVR_ASSIGN_OR_RETURN(uint8_t dtype, h.Get<uint8_t>());
  KVR_ASSIGN_OR_RETURN(std::string params, h.GetString());
  KVR_ASSIGN_OR_RETURN(uint64_t payload_len, h.Get<uint64_t>());
  KVR_ASSIGN_OR_RETURN(uint64_t checksum, h.Get<uint64_t>());
  header.dim = static_cast<int32_t>(dim);
  header.size = static_cast<int64_t>(size);
  if (dtype < 1 || dtype > 3) return absl::DataLossError("index header has a bad dtype");
  header.key_dtype = static_cast<DType>(dtype);
  auto parsed = ParamMap::Parse(params);
  if (!parsed.ok()) return absl::DataLossError("index header has bad build params");
  header.build_params = *parsed;
  const absl::string_view payload = bytes.substr(16 + header_len);
  if (payload.size() != payload_len) {
    return absl::DataLossError(absl::StrCat("index payload is ", payload.size(),
                                            " bytes, header says ", payload_len));
  }
  if (Checksum64(payload) != checksum) {
    return absl::DataLossError("index payload checksum mismatch");
  }
  return std::make_pair(std::move(header), payload);
}

}  // namespace kvrecall::index
