#pragma once

// Little-endian binary encodings shared by the persistent tiers: fixed-width
// integers, length-prefixed strings, 128-bit hashes, span metadata and model
// geometry. Layouts are documented in docs/formats/segment_file.md and
// docs/formats/rocksdb_catalog.md; they are part of the on-disk format.

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/types.h"
#include "service/store/compression.h"
#include "service/store/span.h"

namespace kvrecall::store {

void PutU8(std::string* dst, uint8_t v);
void PutU16(std::string* dst, uint16_t v);
void PutU32(std::string* dst, uint32_t v);
void PutU64(std::string* dst, uint64_t v);
// u32 length, then the bytes.
void PutLengthPrefixed(std::string* dst, absl::string_view s);
// The 16 canonical (big-endian) bytes of the hash.
void PutHash(std::string* dst, const Hash128& h);

uint32_t LoadU32(const char* p);
uint64_t LoadU64(const char* p);
void StoreU32(char* p, uint32_t v);
void StoreU64(char* p, uint64_t v);

// Reads the encodings above from a byte string; every Read returns false
// (and leaves the reader unusable) when the input is too short.
// Not thread-safe.
class ByteReader {
 public:
  explicit ByteReader(absl::string_view in) : in_(in) {}
  bool ReadU8(uint8_t* v);
  bool ReadU16(uint16_t* v);
  bool ReadU32(uint32_t* v);
  bool ReadU64(uint64_t* v);
  bool ReadI32(int32_t* v);
  bool ReadI64(int64_t* v);
  bool ReadBytes(size_t n, absl::string_view* out);
  bool ReadLengthPrefixed(absl::string_view* out);
  bool ReadHash(Hash128* h);
  size_t remaining() const { return in_.size(); }

 private:
  absl::string_view in_;
};

// absl::Time <-> i64 microseconds since the Unix epoch (InfinitePast and
// InfiniteFuture map to INT64_MIN and INT64_MAX).
int64_t TimeToMicros(absl::Time t);
absl::Time MicrosToTime(int64_t micros);

// Span metadata body:
//   model_id (u32 len + bytes) | parent (16) | num_tokens (i32) |
//   num_token_ids (u32) | token ids (u32 each) | payload_bytes (i64) |
//   payload_checksum (u64) | created (i64 us) | flags (u8, bit 0 durable)
void EncodeSpanMeta(const SpanMeta& meta, std::string* dst);
// Decodes what EncodeSpanMeta wrote. Token ids are skipped unless
// `with_token_ids`. False on truncated or inconsistent input.
bool DecodeSpanMeta(ByteReader* in, bool with_token_ids, SpanMeta* meta);

// Model geometry value: version (u8 = 1) | model_id (u32 len + bytes) |
// num_layers, num_q_heads, num_kv_heads, head_dim (i32 each) | dtype (u8) |
// keys_post_rope (u8) | block_tokens (i32).
std::string EncodeModel(const ModelGeometry& model);
// DATA_LOSS when the bytes are not a valid encoding.
absl::StatusOr<ModelGeometry> DecodeModel(absl::string_view bytes);

// Validates a geometry: non-empty id of at most 256 bytes, positive sizes,
// num_q_heads a multiple of num_kv_heads, a known dtype. INVALID_ARGUMENT
// with the offending field otherwise.
absl::Status ValidateModel(const ModelGeometry& model);

bool SameGeometry(const ModelGeometry& a, const ModelGeometry& b);

// What the RocksDB catalog holds per cold span: version (u8 = 1) | span
// meta (EncodeSpanMeta) | compression (u8) | stored_bytes (i64) |
// stored_checksum (u64) | seq (u64).
struct ColdRecord {
  SpanMeta meta;
  Compression compression = Compression::kNone;
  int64_t stored_bytes = 0;
  uint64_t stored_checksum = 0;  // XXH3-64 of the stored (compressed) bytes
  uint64_t seq = 0;
};
std::string EncodeColdRecord(const ColdRecord& r);
// False on truncated, overlong or inconsistent input.
bool DecodeColdRecord(absl::string_view in, bool with_token_ids, ColdRecord* r);

}  // namespace kvrecall::store
