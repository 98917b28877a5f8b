#include "common/types.h"

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace kvrecall {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF16:
    case DType::kBf16:
      return 2;
    case DType::kF32:
      return 4;
  }
  return 0;
}

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return "f16";
    case DType::kBf16:
      return "bf16";
    case DType::kF32:
      return "f32";
  }
  return "unknown";
}

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  const std::string lower = absl::AsciiStrToLower(name);
  if (lower == "f16" || lower == "float16" || lower == "half" || lower == "fp16") {
    return DType::kF16;
  }
  if (lower == "bf16" || lower == "bfloat16") return DType::kBf16;
  if (lower == "f32" || lower == "float32" || lower == "float" || lower == "fp32") {
    return DType::kF32;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype '", name, "': expected f16, bf16 or f32"));
}

namespace {

void PutBigEndian64(uint64_t v, char* out) {
  for (int i = 7; i >= 0; --i) {
    out[i] = static_cast<char>(v & 0xff);
    v >>= 8;
  }
}

uint64_t GetBigEndian64(const char* in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<unsigned char>(in[i]);
  return v;
}

}  // namespace

std::string Hash128::ToBytes() const {
  std::string out(16, '\0');
  PutBigEndian64(high, out.data());
  PutBigEndian64(low, out.data() + 8);
  return out;
}

std::string Hash128::ToHex() const { return absl::BytesToHexString(ToBytes()); }

absl::StatusOr<Hash128> Hash128::FromBytes(absl::string_view bytes) {
  if (bytes.size() != 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("a span hash is 16 bytes, got ", bytes.size()));
  }
  Hash128 h;
  h.high = GetBigEndian64(bytes.data());
  h.low = GetBigEndian64(bytes.data() + 8);
  return h;
}

absl::StatusOr<Hash128> Hash128::FromHex(absl::string_view hex) {
  if (hex.size() != 32) {
    return absl::InvalidArgumentError(
        absl::StrCat("a span hash is 32 hex digits, got ", hex.size(), " characters"));
  }
  for (char c : hex) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) {
      return absl::InvalidArgumentError(absl::StrCat("not a hex digit in hash '", hex, "'"));
    }
  }
  return FromBytes(absl::HexStringToBytes(hex));
}

}  // namespace kvrecall
