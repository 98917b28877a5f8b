#include "service/store/codec.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"

namespace kvrecall::store {

void PutU8(std::string* dst, uint8_t v) { dst->push_back(static_cast<char>(v)); }

void PutU16(std::string* dst, uint16_t v) {
  dst->push_back(static_cast<char>(v & 0xff));
  dst->push_back(static_cast<char>(v >> 8));
}

void PutU32(std::string* dst, uint32_t v) {
  char buf[4];
  StoreU32(buf, v);
  dst->append(buf, 4);
}

void PutU64(std::string* dst, uint64_t v) {
  char buf[8];
  StoreU64(buf, v);
  dst->append(buf, 8);
}

void PutLengthPrefixed(std::string* dst, absl::string_view s) {
  PutU32(dst, static_cast<uint32_t>(s.size()));
  dst->append(s.data(), s.size());
}

void PutHash(std::string* dst, const Hash128& h) { dst->append(h.ToBytes()); }

uint32_t LoadU32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return static_cast<uint32_t>(u[0]) | (static_cast<uint32_t>(u[1]) << 8) |
         (static_cast<uint32_t>(u[2]) << 16) | (static_cast<uint32_t>(u[3]) << 24);
}

uint64_t LoadU64(const char* p) {
  return static_cast<uint64_t>(LoadU32(p)) | (static_cast<uint64_t>(LoadU32(p + 4)) << 32);
}

void StoreU32(char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

void StoreU64(char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

bool ByteReader::ReadBytes(size_t n, absl::string_view* out) {
  if (in_.size() < n) {
    in_ = absl::string_view();
    return false;
  }
  *out = in_.substr(0, n);
  in_.remove_prefix(n);
  return true;
}

bool ByteReader::ReadU8(uint8_t* v) {
  absl::string_view b;
  if (!ReadBytes(1, &b)) return false;
  *v = static_cast<uint8_t>(b[0]);
  return true;
}

bool ByteReader::ReadU16(uint16_t* v) {
  absl::string_view b;
  if (!ReadBytes(2, &b)) return false;
  *v = static_cast<uint16_t>(static_cast<unsigned char>(b[0]) |
                             (static_cast<unsigned char>(b[1]) << 8));
  return true;
}

bool ByteReader::ReadU32(uint32_t* v) {
  absl::string_view b;
  if (!ReadBytes(4, &b)) return false;
  *v = LoadU32(b.data());
  return true;
}

bool ByteReader::ReadU64(uint64_t* v) {
  absl::string_view b;
  if (!ReadBytes(8, &b)) return false;
  *v = LoadU64(b.data());
  return true;
}

bool ByteReader::ReadI32(int32_t* v) {
  uint32_t u;
  if (!ReadU32(&u)) return false;
  *v = static_cast<int32_t>(u);
  return true;
}

bool ByteReader::ReadI64(int64_t* v) {
  uint64_t u;
  if (!ReadU64(&u)) return false;
  *v = static_cast<int64_t>(u);
  return true;
}

bool ByteReader::ReadLengthPrefixed(absl::string_view* out) {
  uint32_t n;
  return ReadU32(&n) && ReadBytes(n, out);
}

bool ByteReader::ReadHash(Hash128* h) {
  absl::string_view b;
  if (!ReadBytes(16, &b)) return false;
  auto parsed = Hash128::FromBytes(b);
  if (!parsed.ok()) return false;
  *h = *parsed;
  return true;
}

int64_t TimeToMicros(absl::Time t) {
  if (t == absl::InfinitePast()) return std::numeric_limits<int64_t>::min();
  if (t == absl::InfiniteFuture()) return std::numeric_limits<int64_t>::max();
  return absl::ToUnixMicros(t);
}

absl::Time MicrosToTime(int64_t micros) {
  if (micros == std::numeric_limits<int64_t>::min()) return absl::InfinitePast();
  if (micros == std::numeric_limits<int64_t>::max()) return absl::InfiniteFuture();
  return absl::FromUnixMicros(micros);
}

void EncodeSpanMeta(const SpanMeta& meta, std::string* dst) {
  PutLengthPrefixed(dst, meta.model_id);
  PutHash(dst, meta.parent);
  PutU32(dst, static_cast<uint32_t>(meta.num_tokens));
  PutU32(dst, static_cast<uint32_t>(meta.token_ids.size()));
  const size_t at = dst->size();
  dst->resize(at + 4 * meta.token_ids.size());
  for (size_t i = 0; i < meta.token_ids.size(); ++i) {
    StoreU32(dst->data() + at + 4 * i, meta.token_ids[i]);
  }
  PutU64(dst, static_cast<uint64_t>(meta.payload_bytes));
  PutU64(dst, meta.payload_checksum);
  PutU64(dst, static_cast<uint64_t>(TimeToMicros(meta.created)));
  PutU8(dst, meta.durable ? 1 : 0);
}

bool DecodeSpanMeta(ByteReader* in, bool with_token_ids, SpanMeta* meta) {
  absl::string_view model;
  uint32_t num_ids = 0;
  int64_t created = 0;
  uint8_t flags = 0;
  if (!in->ReadLengthPrefixed(&model) || !in->ReadHash(&meta->parent) ||
      !in->ReadI32(&meta->num_tokens) || !in->ReadU32(&num_ids)) {
    return false;
  }
  absl::string_view ids;
  if (num_ids > (1u << 24) || !in->ReadBytes(size_t{4} * num_ids, &ids)) return false;
  meta->model_id = std::string(model);
  meta->token_ids.clear();
  if (with_token_ids) {
    meta->token_ids.resize(num_ids);
    for (uint32_t i = 0; i < num_ids; ++i) meta->token_ids[i] = LoadU32(ids.data() + 4 * i);
  }
  if (!in->ReadI64(&meta->payload_bytes) || !in->ReadU64(&meta->payload_checksum) ||
      !in->ReadI64(&created) || !in->ReadU8(&flags)) {
    return false;
  }
  if (meta->payload_bytes < 0 || meta->num_tokens < 0) return false;
  meta->created = MicrosToTime(created);
  meta->durable = (flags & 1) != 0;
  return true;
}

std::string EncodeModel(const ModelGeometry& model) {
  std::string out;
  PutU8(&out, 1);
  PutLengthPrefixed(&out, model.model_id);
  PutU32(&out, static_cast<uint32_t>(model.num_layers));
  PutU32(&out, static_cast<uint32_t>(model.num_q_heads));
  PutU32(&out, static_cast<uint32_t>(model.num_kv_heads));
  PutU32(&out, static_cast<uint32_t>(model.head_dim));
  PutU8(&out, static_cast<uint8_t>(model.dtype));
  PutU8(&out, model.keys_post_rope ? 1 : 0);
  PutU32(&out, static_cast<uint32_t>(model.block_tokens));
  return out;
}

absl::StatusOr<ModelGeometry> DecodeModel(absl::string_view bytes) {
  ByteReader in(bytes);
  uint8_t version = 0, dtype = 0, rope = 0;
  absl::string_view id;
  ModelGeometry m;
  if (!in.ReadU8(&version) || version != 1 || !in.ReadLengthPrefixed(&id) ||
      !in.ReadI32(&m.num_layers) || !in.ReadI32(&m.num_q_heads) || !in.ReadI32(&m.num_kv_heads) ||
      !in.ReadI32(&m.head_dim) || !in.ReadU8(&dtype) || !in.ReadU8(&rope) ||
      !in.ReadI32(&m.block_tokens) || in.remaining() != 0) {
    return absl::DataLossError("model record is not a valid encoding (version 1)");
  }
  m.model_id = std::string(id);
  m.dtype = static_cast<DType>(dtype);
  m.keys_post_rope = rope != 0;
  absl::Status valid = ValidateModel(m);
  if (!valid.ok()) {
    return absl::DataLossError(absl::StrCat("stored model record is invalid: ", valid.message()));
  }
  return m;
}

absl::Status ValidateModel(const ModelGeometry& m) {
  if (m.model_id.empty()) return absl::InvalidArgumentError("model_id is empty");
  if (m.model_id.size() > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("model_id is ", m.model_id.size(), " bytes; at most 256 allowed"));
  }
  auto positive = [](const char* name, int32_t v) -> absl::Status {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat(name, " must be > 0, got ", v));
    return absl::OkStatus();
  };
  if (auto s = positive("num_layers", m.num_layers); !s.ok()) return s;
  if (auto s = positive("num_q_heads", m.num_q_heads); !s.ok()) return s;
  if (auto s = positive("num_kv_heads", m.num_kv_heads); !s.ok()) return s;
  if (auto s = positive("head_dim", m.head_dim); !s.ok()) return s;
  if (auto s = positive("block_tokens", m.block_tokens); !s.ok()) return s;
  if (m.num_q_heads % m.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_q_heads (", m.num_q_heads,
                                                   ") is not a multiple of num_kv_heads (",
                                                   m.num_kv_heads, ")"));
  }
  if (m.dtype != DType::kF16 && m.dtype != DType::kBf16 && m.dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(m.dtype)));
  }
  // A full span must stay addressable: at most 2^40 bytes (computed in
  // double first so that huge fields cannot overflow).
  const double span_bytes = static_cast<double>(m.num_layers) * 2.0 * m.num_kv_heads *
                            m.block_tokens * m.head_dim * static_cast<double>(DTypeSize(m.dtype));
  if (span_bytes > static_cast<double>(int64_t{1} << 40)) {
    return absl::InvalidArgumentError(
        absl::StrCat("geometry gives ", span_bytes, " bytes per span; at most 2^40 allowed"));
  }
  return absl::OkStatus();
}

bool SameGeometry(const ModelGeometry& a, const ModelGeometry& b) {
  return a.model_id == b.model_id && a.num_layers == b.num_layers &&
         a.num_q_heads == b.num_q_heads && a.num_kv_heads == b.num_kv_heads &&
         a.head_dim == b.head_dim && a.dtype == b.dtype && a.keys_post_rope == b.keys_post_rope &&
         a.block_tokens == b.block_tokens;
}

namespace {
constexpr uint8_t kSpanRecordVersion = 1;
}  // namespace

std::string EncodeColdRecord(const ColdRecord& r) {
  std::string out;
  PutU8(&out, kSpanRecordVersion);
  EncodeSpanMeta(r.meta, &out);
  PutU8(&out, static_cast<uint8_t>(r.compression));
  PutU64(&out, static_cast<uint64_t>(r.stored_bytes));
  PutU64(&out, r.stored_checksum);
  PutU64(&out, r.seq);
  return out;
}

bool DecodeColdRecord(absl::string_view in, bool with_token_ids, ColdRecord* r) {
  ByteReader reader(in);
  uint8_t version = 0, compression = 0;
  if (!reader.ReadU8(&version) || version != kSpanRecordVersion ||
      !DecodeSpanMeta(&reader, with_token_ids, &r->meta) || !reader.ReadU8(&compression) ||
      !reader.ReadI64(&r->stored_bytes) || !reader.ReadU64(&r->stored_checksum) ||
      !reader.ReadU64(&r->seq) || reader.remaining() != 0) {
    return false;
  }
  if (compression > static_cast<uint8_t>(Compression::kZstd) || r->stored_bytes < 0) return false;
  r->compression = static_cast<Compression>(compression);
  return true;
}

}  // namespace kvrecall::store
