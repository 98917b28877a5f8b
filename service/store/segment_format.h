#pragma once

// The segment file format of the DiskTier (docs/formats/segment_file.md).
//
// A segment file is a 32-byte segment header followed by records, each
// starting at an 8-byte-aligned offset:
//
//   segment header (32 bytes, little-endian)
//     0  u32 magic "KVSG"   4  u16 version (1)   6  u16 reserved (0)
//     8  u64 segment id     16 i64 created (us since the epoch)
//     24 u64 XXH3-64 of bytes [0, 24)
//
//   record
//     0  u32 magic "KVRS"   4  u16 version (1)   6  u8 kind (1 span, 2 tombstone)
//     7  u8 flags (bit 0: durable)
//     8  u32 meta_len       12 u32 reserved (0)
//     16 u64 payload_len    24 u64 seq
//     32 u64 header checksum: XXH3-64 of bytes [0, 32) and the meta section
//     40 meta section (meta_len bytes): hash (16 canonical bytes) |
//        tenant (u32 len + bytes) | for a span: SpanMeta (codec.h)
//     40 + meta_len: payload (payload_len bytes; empty for a tombstone)
//     zero padding to a multiple of 8
//     u64 record checksum: XXH3-64 of every byte of the record before it
//
// The header checksum lets recovery trust lengths and metadata without
// reading payloads; the record checksum is verified on every read.

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "service/store/span.h"

namespace kvrecall::store {

inline constexpr uint32_t kSegmentMagic = 0x4753564b;  // bytes "KVSG"
inline constexpr uint32_t kRecordMagic = 0x5352564b;   // bytes "KVRS"
inline constexpr uint16_t kSegmentFormatVersion = 1;
inline constexpr uint64_t kSegmentHeaderBytes = 32;
inline constexpr uint64_t kRecordHeaderBytes = 40;
// Upper bounds that recovery uses to reject garbage lengths.
inline constexpr uint32_t kMaxRecordMetaBytes = 64u << 20;
inline constexpr uint64_t kMaxRecordPayloadBytes = uint64_t{1} << 40;

enum class RecordKind : uint8_t { kSpan = 1, kTombstone = 2 };

inline constexpr uint64_t AlignUp8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }

// The fixed part of a record header, parsed.
struct RecordHeader {
  RecordKind kind = RecordKind::kSpan;
  uint8_t flags = 0;
  uint32_t meta_len = 0;
  uint64_t payload_len = 0;
  uint64_t seq = 0;
  uint64_t header_checksum = 0;

  // Header and meta section.
  uint64_t prefix_bytes() const { return kRecordHeaderBytes + meta_len; }
  // Zero bytes between the payload and the record checksum.
  uint64_t padding_bytes() const {
    return AlignUp8(prefix_bytes() + payload_len) - (prefix_bytes() + payload_len);
  }
  // Whole record, checksum included.
  uint64_t record_bytes() const { return AlignUp8(prefix_bytes() + payload_len) + 8; }
};

// A record ready to be written as [prefix][payload][suffix] (one pwritev).
struct EncodedRecord {
  std::string prefix;  // header + meta section
  std::string suffix;  // padding + record checksum
  uint64_t record_bytes = 0;
};

std::string EncodeSegmentHeader(uint64_t segment_id, absl::Time created);
// The segment id; DATA_LOSS when `bytes` (32) is not a valid segment header.
absl::StatusOr<uint64_t> DecodeSegmentHeader(absl::string_view bytes);

// Encodes a span record (header, meta with token ids, padding, checksums).
// `span.payload` is hashed here but not copied.
EncodedRecord EncodeSpanRecord(const StoredSpan& span, uint64_t seq);
EncodedRecord EncodeTombstoneRecord(const SpanKey& key, uint64_t seq);

// Parses the 40 fixed header bytes: magic, version, kind and length bounds.
// Does not verify the header checksum (it needs the meta section).
// DATA_LOSS when they are not a plausible record header.
absl::StatusOr<RecordHeader> ParseRecordHeader(absl::string_view fixed);
// Whether the header checksum matches `fixed` (40 bytes) and `meta`.
bool VerifyHeaderChecksum(const RecordHeader& header, absl::string_view fixed,
                          absl::string_view meta);
// Decodes a meta section; `meta_out` may be null (tombstones, or key only).
// False when the section is not a valid encoding for `header.kind`.
bool DecodeRecordMeta(const RecordHeader& header, absl::string_view meta, bool with_token_ids,
                      SpanKey* key, SpanMeta* meta_out);

}  // namespace kvrecall::store
