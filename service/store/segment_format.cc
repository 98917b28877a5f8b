#include "service/store/segment_format.h"

#include <cstring>

#include "common/checksum.h"
#include "service/store/codec.h"

namespace kvrecall::store {

namespace {

std::string EncodeRecordPrefix(RecordKind kind, uint8_t flags, absl::string_view meta,
                               uint64_t payload_len, uint64_t seq) {
  std::string out;
  out.reserve(kRecordHeaderBytes + meta.size());
  PutU32(&out, kRecordMagic);
  PutU16(&out, kSegmentFormatVersion);
  PutU8(&out, static_cast<uint8_t>(kind));
  PutU8(&out, flags);
  PutU32(&out, static_cast<uint32_t>(meta.size()));
  PutU32(&out, 0);
  PutU64(&out, payload_len);
  PutU64(&out, seq);
  Checksum64Builder header;
  header.Update(out.data(), 32);
  header.Update(meta);
  PutU64(&out, header.Digest());
  out.append(meta.data(), meta.size());
  return out;
}

EncodedRecord Finish(std::string prefix, absl::string_view payload) {
  EncodedRecord rec;
  const uint64_t body = prefix.size() + payload.size();
  const uint64_t padding = AlignUp8(body) - body;
  Checksum64Builder all;
  all.Update(prefix);
  all.Update(payload);
  rec.suffix.assign(padding, '\0');
  all.Update(rec.suffix);
  PutU64(&rec.suffix, all.Digest());
  rec.record_bytes = body + rec.suffix.size();
  rec.prefix = std::move(prefix);
  return rec;
}

}  // namespace

std::string EncodeSegmentHeader(uint64_t segment_id, absl::Time created) {
  std::string out;
  PutU32(&out, kSegmentMagic);
  PutU16(&out, kSegmentFormatVersion);
  PutU16(&out, 0);
  PutU64(&out, segment_id);
  PutU64(&out, static_cast<uint64_t>(TimeToMicros(created)));
  PutU64(&out, Checksum64(out));
  return out;
}

absl::StatusOr<uint64_t> DecodeSegmentHeader(absl::string_view bytes) {
  if (bytes.size() < kSegmentHeaderBytes || LoadU32(bytes.data()) != kSegmentMagic ||
      Checksum64(bytes.data(), 24) != LoadU64(bytes.data() + 24)) {
    return absl::DataLossError("not a kvrecall segment header");
  }
  const uint16_t version = static_cast<uint16_t>(static_cast<unsigned char>(bytes[4]) |
                                                 (static_cast<unsigned char>(bytes[5]) << 8));
  if (version != kSegmentFormatVersion) {
    return absl::DataLossError("unsupported segment format version");
  }
  return LoadU64(bytes.data() + 8);
}

EncodedRecord EncodeSpanRecord(const StoredSpan& span, uint64_t seq) {
  std::string meta;
  PutHash(&meta, span.key.hash);
  PutLengthPrefixed(&meta, span.key.tenant);
  EncodeSpanMeta(span.meta, &meta);
  return Finish(EncodeRecordPrefix(RecordKind::kSpan, span.meta.durable ? 1 : 0, meta,
                                   span.payload.size(), seq),
                span.payload);
}

EncodedRecord EncodeTombstoneRecord(const SpanKey& key, uint64_t seq) {
  std::string meta;
  PutHash(&meta, key.hash);
  PutLengthPrefixed(&meta, key.tenant);
  return Finish(EncodeRecordPrefix(RecordKind::kTombstone, 0, meta, 0, seq), "");
}

absl::StatusOr<RecordHeader> ParseRecordHeader(absl::string_view fixed) {
  if (fixed.size() < kRecordHeaderBytes || LoadU32(fixed.data()) != kRecordMagic) {
    return absl::DataLossError("no record magic");
  }
  ByteReader in(fixed.substr(4));
  uint16_t version = 0;
  uint8_t kind = 0;
  uint32_t reserved = 0;
  RecordHeader h;
  if (!in.ReadU16(&version) || !in.ReadU8(&kind) || !in.ReadU8(&h.flags) ||
      !in.ReadU32(&h.meta_len) || !in.ReadU32(&reserved) || !in.ReadU64(&h.payload_len) ||
      !in.ReadU64(&h.seq) || !in.ReadU64(&h.header_checksum)) {
    return absl::DataLossError("short record header");
  }
  if (version != kSegmentFormatVersion) return absl::DataLossError("unknown record version");
  if (kind != static_cast<uint8_t>(RecordKind::kSpan) &&
      kind != static_cast<uint8_t>(RecordKind::kTombstone)) {
    return absl::DataLossError("unknown record kind");
  }
  h.kind = static_cast<RecordKind>(kind);
  if (h.meta_len < 20 || h.meta_len > kMaxRecordMetaBytes ||
      h.payload_len > kMaxRecordPayloadBytes ||
      (h.kind == RecordKind::kTombstone && h.payload_len != 0)) {
    return absl::DataLossError("implausible record lengths");
  }
  return h;
}

bool VerifyHeaderChecksum(const RecordHeader& header, absl::string_view fixed,
                          absl::string_view meta) {
  if (fixed.size() < kRecordHeaderBytes || meta.size() != header.meta_len) return false;
  Checksum64Builder b;
  b.Update(fixed.data(), 32);
  b.Update(meta);
  return b.Digest() == header.header_checksum;
}

bool DecodeRecordMeta(const RecordHeader& header, absl::string_view meta, bool with_token_ids,
                      SpanKey* key, SpanMeta* meta_out) {
  ByteReader in(meta);
  absl::string_view tenant;
  if (!in.ReadHash(&key->hash) || !in.ReadLengthPrefixed(&tenant)) return false;
  key->tenant = std::string(tenant);
  if (header.kind == RecordKind::kTombstone) return in.remaining() == 0;
  SpanMeta local;
  SpanMeta* m = meta_out != nullptr ? meta_out : &local;
  if (!DecodeSpanMeta(&in, with_token_ids, m) || in.remaining() != 0) return false;
  return m->payload_bytes == static_cast<int64_t>(header.payload_len);
}

}  // namespace kvrecall::store
