#pragma once

// The common header of every serialized key index (docs/formats/index.md)
// and little-endian byte writer/reader helpers for the kinds' payloads.
//
//   offset  size  field
//   0       8     magic "KVRINDEX"
//   8       4     format version (u32le), currently 1
//   12      4     header length H (u32le): bytes from offset 16 to the payload
//   16      H     header fields: kind (str), dim (u32), size (u64), key dtype (u8),
//                 build params (str, ParamMap::ToString), payload length (u64),
//                 payload checksum (u64, XXH3-64)
//   16+H    ...   the kind's payload
// A str is u32le length + bytes.

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/types.h"
#include "index/params.h"

namespace kvrecall::index {

inline constexpr char kIndexMagic[8] = {'K', 'V', 'R', 'I', 'N', 'D', 'E', 'X'};
inline constexpr uint32_t kIndexFormatVersion = 1;

struct IndexHeader {
  std::string kind;
  int32_t dim = 0;
  int64_t size = 0;
  DType key_dtype = DType::kF32;
  ParamMap build_params;
};

// Appends little-endian values to a string. Not thread-safe.
class ByteWriter {
 public:
  explicit ByteWriter(std::string* out) : out_(out) {}
  template <typename T>
  void Put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    const size_t at = out_->size();
    out_->resize(at + sizeof(T));
    std::memcpy(out_->data() + at, &v, sizeof(T));
  }
  void PutString(absl::string_view s) {
    Put<uint32_t>(static_cast<uint32_t>(s.size()));
    out_->append(s.data(), s.size());
  }
  template <typename T>
  void PutVector(const std::vector<T>& v) {
    static_assert(std::is_trivially_copyable_v<T>);
    Put<uint64_t>(v.size());
    out_->append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
  }
  void PutBytes(const void* data, size_t n) {
    out_->append(static_cast<const char*>(data), n);
  }

 private:
  std::string* out_;
};

// Reads little-endian values; every read is bounds-checked and a short read
// is DATA_LOSS. Not thread-safe.
class ByteReader {
 public:
  explicit ByteReader(absl::string_view in) : in_(in) {}
  template <typename T>
  absl::StatusOr<T> Get() {
    static_assert(std::is_trivially_copyable_v<T>);
    if (in_.size() < sizeof(T)) return Truncated();
    T v;
    std::memcpy(&v, in_.data(), sizeof(T));
    in_.remove_prefix(sizeof(T));
    return v;
  }
  absl::StatusOr<std::string> GetString();
  template <typename T>
  absl::StatusOr<std::vector<T>> GetVector(uint64_t max_elements = UINT64_MAX) {
    static_assert(std::is_trivially_copyable_v<T>);
    auto n = Get<uint64_t>();
    if (!n.ok()) return n.status();
    if (*n > max_elements || *n > in_.size() / sizeof(T)) return Truncated();
    std::vector<T> v(*n);
    std::memcpy(v.data(), in_.data(), *n * sizeof(T));
    in_.remove_prefix(*n * sizeof(T));
    return v;
  }
  absl::Status GetBytes(void* out, size_t n);
  size_t remaining() const { return in_.size(); }

 private:
  static absl::Status Truncated();
  absl::string_view in_;
};

// Checks that `header` is an index of `kind` (else INVALID_ARGUMENT) and
// reads the leading u32 version of its payload, which must be `version`
// (else FAILED_PRECONDITION naming both; DATA_LOSS when truncated).
absl::Status ReadPayloadVersion(const IndexHeader& header, absl::string_view kind,
                                uint32_t version, ByteReader* reader);

// Header + payload -> index bytes.
std::string EncodeIndex(const IndexHeader& header, absl::string_view payload);

// Splits index bytes into header and payload, verifying magic, version,
// lengths and the payload checksum (DATA_LOSS / FAILED_PRECONDITION).
absl::StatusOr<std::pair<IndexHeader, absl::string_view>> DecodeIndex(absl::string_view bytes);

}  // namespace kvrecall::index
