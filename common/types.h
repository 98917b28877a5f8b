#pragma once

// Vocabulary types shared by every kvrecall library: element types of
// tensors and the 128-bit span hash. No protobuf or third-party types here.

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrecall {

// Element type of keys, values and queries.
enum class DType : uint8_t {
  kF16 = 1,   // IEEE 754 binary16
  kBf16 = 2,  // bfloat16 (upper half of an IEEE binary32)
  kF32 = 3,   // IEEE 754 binary32
};

// Bytes per element: 2, 2 or 4.
size_t DTypeSize(DType dtype);

// "f16", "bf16" or "f32".
absl::string_view DTypeName(DType dtype);

// Parses "f16"/"float16"/"half", "bf16"/"bfloat16", "f32"/"float32"/"float".
// INVALID_ARGUMENT otherwise.
absl::StatusOr<DType> ParseDType(absl::string_view name);

// A 128-bit hash in canonical byte order (big-endian, the XXH128 canonical
// form; docs/hashing.md). Value type, thread-compatible.
struct Hash128 {
  uint64_t high = 0;
  uint64_t low = 0;

  // The 16 canonical bytes: high as big-endian, then low as big-endian.
  std::string ToBytes() const;
  // 32 lowercase hex digits of the canonical bytes.
  std::string ToHex() const;
  bool IsZero() const { return high == 0 && low == 0; }

  // REQUIRES: bytes.size() == 16, else INVALID_ARGUMENT.
  static absl::StatusOr<Hash128> FromBytes(absl::string_view bytes);
  // Accepts exactly 32 hex digits (either case), else INVALID_ARGUMENT.
  static absl::StatusOr<Hash128> FromHex(absl::string_view hex);

  friend bool operator==(const Hash128& a, const Hash128& b) {
    return a.high == b.high && a.low == b.low;
  }
  friend bool operator!=(const Hash128& a, const Hash128& b) { return !(a == b); }
  friend bool operator<(const Hash128& a, const Hash128& b) {
    return a.high != b.high ? a.high < b.high : a.low < b.low;
  }
  template <typename H>
  friend H AbslHashValue(H h, const Hash128& x) {
    return H::combine(std::move(h), x.high, x.low);
  }
};

}  // namespace kvrecall
