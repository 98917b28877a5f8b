#include "service/rpc/put_stream.h"

#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/span_hash.h"
#include "common/status_macros.h"
#include "service/rpc/proto_convert.h"

namespace kvrecall::rpc {
namespace {

// Reads the protobuf wire format from a message split over several pieces.
class PieceReader {
 public:
  explicit PieceReader(const std::vector<absl::string_view>& pieces) : pieces_(pieces) {
    for (const auto& p : pieces) total_ += p.size();
  }
  size_t position() const { return position_; }
  size_t remaining() const { return total_ - position_; }
  bool done() const { return position_ >= total_; }

  bool ReadByte(uint8_t* out) {
    while (piece_ < pieces_.size() && offset_ == pieces_[piece_].size()) {
      ++piece_;
      offset_ = 0;
    }
    if (piece_ == pieces_.size()) return false;
    *out = static_cast<uint8_t>(pieces_[piece_][offset_++]);
    ++position_;
    return true;
  }
  bool ReadVarint(uint64_t* out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t b = 0;
      if (!ReadByte(&b)) return false;
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) {
        *out = v;
        return true;
      }
    }
    return false;
  }
  // Moves `n` bytes ahead; with `dst`, copies them there; with `append`,
  // appends them to it.
  bool Take(size_t n, char* dst, std::string* append = nullptr) {
    if (n > total_ - position_) return false;
    while (n > 0) {
      while (offset_ == pieces_[piece_].size()) {
        ++piece_;
        offset_ = 0;
      }
      const size_t len = std::min(n, pieces_[piece_].size() - offset_);
      if (dst != nullptr) {
        std::memcpy(dst, pieces_[piece_].data() + offset_, len);
        dst += len;
      }
      if (append != nullptr) append->append(pieces_[piece_].data() + offset_, len);
      offset_ += len;
      position_ += len;
      n -= len;
    }
    return true;
  }

 private:
  const std::vector<absl::string_view>& pieces_;
  size_t total_ = 0;
  size_t piece_ = 0;
  size_t offset_ = 0;
  size_t position_ = 0;
};

absl::Status Malformed() { return absl::InvalidArgumentError("malformed PutSpansRequest"); }

}  // namespace

PutStream::PutStream(store::TieredStore* store, std::string tenant, int64_t max_span_bytes,
                     bool require_token_ids, InflightLimiter* limiter)
    : store_(store),
      tenant_(std::move(tenant)),
      max_span_bytes_(max_span_bytes),
      require_token_ids_(require_token_ids),
      limiter_(limiter) {}

absl::Status PutStream::Fail(int index, const absl::Status& status) const {
  const int stored = response_.results_size();
  return absl::Status(
      status.code(),
      absl::StrCat("span ", index, " of the stream: ", status.message(),
                   stored == 0 ? std::string(" (no span of this stream is stored)")
                               : absl::StrCat(" (spans 0..", stored - 1,
                                              " of this stream are stored)")));
}

absl::Status PutStream::Consume(const grpc::ByteBuffer& message, bool* complete) {
  std::vector<grpc::Slice> slices;
  if (!message.Dump(&slices).ok()) return Malformed();
  std::vector<absl::string_view> pieces;
  pieces.reserve(slices.size());
  for (const auto& s : slices) {
    pieces.emplace_back(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  KVR_RETURN_IF_ERROR(Parse(pieces));
  *complete = complete_;
  return absl::OkStatus();
}

absl::Status PutStream::ConsumeBytes(absl::string_view message, bool* complete) {
  KVR_RETURN_IF_ERROR(Parse({message}));
  *complete = complete_;
  return absl::OkStatus();
}

absl::Status PutStream::Parse(const std::vector<absl::string_view>& pieces) {
  if (complete_) return absl::InternalError("PutStream: the completed span was not stored");
  // Pass 1: where the fields are. Repeated header fields merge (their
  // encodings concatenate); for the bytes field the last occurrence wins,
  // as protobuf parsing defines.
  std::string header_bytes;
  bool has_header = false;
  Field chunk;
  PieceReader reader(pieces);
  while (!reader.done()) {
    uint64_t tag = 0;
    if (!reader.ReadVarint(&tag)) return Malformed();
    const uint64_t field = tag >> 3;
    const int wire_type = static_cast<int>(tag & 7);
    if (wire_type == 2) {
      uint64_t size = 0;
      if (!reader.ReadVarint(&size)) return Malformed();
      // A length is a claim of the sender: check it against the bytes
      // received before allocating anything for it.
      if (size > reader.remaining()) return Malformed();
      if (field == 1) {
        const size_t at = header_bytes.size();
        header_bytes.resize(at + size);
        if (!reader.Take(size, header_bytes.data() + at)) return Malformed();
        has_header = true;
      } else {
        const size_t at = reader.position();
        if (!reader.Take(size, nullptr)) return Malformed();
        if (field == 2) chunk = Field{at, static_cast<size_t>(size), true};
      }
    } else if (wire_type == 0) {
      uint64_t ignored = 0;
      if (!reader.ReadVarint(&ignored)) return Malformed();
    } else if (wire_type == 1 || wire_type == 5) {
      if (!reader.Take(wire_type == 1 ? 8 : 4, nullptr)) return Malformed();
    } else {
      return Malformed();
    }
  }

  if (has_header) {
    v1::PutSpanHeader header;
    if (!header.ParseFromString(header_bytes)) return Fail(num_headers_, Malformed());
    KVR_RETURN_IF_ERROR(StartSpan(header));
  } else if (!in_span_) {
    return Fail(num_headers_,
                absl::InvalidArgumentError("a payload chunk arrived without a span header"));
  }
  if (chunk.present && chunk.size > 0) KVR_RETURN_IF_ERROR(AppendPayload(pieces, chunk));
  if (in_span_ && received_ == span_.meta.payload_bytes) {
    in_span_ = false;
    complete_ = true;
  }
  return absl::OkStatus();
}

absl::Status PutStream::StartSpan(const v1::PutSpanHeader& h) {
  const int index = num_headers_++;
  if (in_span_) {
    return Fail(index_, absl::InvalidArgumentError(absl::StrCat(
                            "a new header arrived after ", received_, " of ",
                            span_.meta.payload_bytes, " payload bytes; nothing of it is stored")));
  }
  if (h.model_id().empty()) {
    return Fail(index, absl::InvalidArgumentError("header.model_id: required"));
  }
  auto it = models_.find(h.model_id());
  if (it == models_.end()) {
    absl::StatusOr<store::ModelGeometry> g = store_->GetModel(h.model_id());
    if (!g.ok()) {
      if (g.status().code() == absl::StatusCode::kNotFound) {
        return Fail(index, absl::NotFoundError(
                               absl::StrCat("unknown model ", h.model_id(), " (RegisterModel first)")));
      }
      return Fail(index, g.status());
    }
    it = models_.emplace(h.model_id(), *std::move(g)).first;
  }
  const store::ModelGeometry& geometry = it->second;
  store::StoredSpan span;
  span.key.tenant = tenant_;
  absl::StatusOr<Hash128> hash = HashFromProto(h.hash(), "header.hash");
  if (!hash.ok()) return Fail(index, hash.status());
  span.key.hash = *hash;
  absl::StatusOr<Hash128> parent = HashFromProto(h.parent_hash(), "header.parent_hash");
  if (!parent.ok()) return Fail(index, parent.status());
  span.meta.parent = *parent;
  if (h.num_tokens() < 1 || h.num_tokens() > geometry.block_tokens) {
    return Fail(index, absl::InvalidArgumentError(absl::StrCat(
                           "header.num_tokens=", h.num_tokens(), " must be in 1..",
                           geometry.block_tokens, " (block_tokens of ", geometry.model_id, ")")));
  }
  span.meta.model_id = geometry.model_id;
  span.meta.num_tokens = h.num_tokens();
  if (h.token_ids_size() > 0) {
    if (h.token_ids_size() != h.num_tokens()) {
      return Fail(index, absl::InvalidArgumentError(absl::StrCat(
                             "header.token_ids has ", h.token_ids_size(), " ids, num_tokens is ",
                             h.num_tokens())));
    }
    span.meta.token_ids.assign(h.token_ids().begin(), h.token_ids().end());
    const Hash128 expected = SpanHash(span.meta.parent, span.meta.token_ids);
    if (expected != span.key.hash) {
      return Fail(index, absl::InvalidArgumentError(absl::StrCat(
                             "header.hash ", span.key.hash.ToHex(),
                             " is not the span hash of its token ids under its parent (",
                             expected.ToHex(), "); see docs/hashing.md")));
    }
  }
  const int64_t expected_bytes = geometry.SpanPayloadBytes(h.num_tokens());
  if (h.payload_bytes() != expected_bytes) {
    return Fail(index, absl::InvalidArgumentError(absl::StrCat(
                           "header.payload_bytes=", h.payload_bytes(),
                           " does not match the geometry of ", geometry.model_id, ": ",
                           geometry.num_layers, " layers x 2 x ", geometry.num_kv_heads,
                           " kv heads x ", h.num_tokens(), " tokens x ", geometry.head_dim, " x ",
                           DTypeSize(geometry.dtype), " bytes = ", expected_bytes)));
  }
  if (h.payload_bytes() > max_span_bytes_) {
    return Fail(index, absl::ResourceExhaustedError(absl::StrCat(
                           "span payload of ", h.payload_bytes(), " bytes exceeds --max_span_bytes=",
                           max_span_bytes_)));
  }
  if (h.token_ids_size() == 0 && require_token_ids_) {
    return Fail(index, absl::InvalidArgumentError(
                           "header.token_ids: required (the daemon checks that they hash to "
                           "header.hash; it runs with --require_token_ids)"));
  }
  // The payload buffer is reserved in full below (one copy per chunk, no
  // regrowth): hold its bytes against the daemon's in-flight budget first.
  if (limiter_ != nullptr) {
    absl::StatusOr<InflightBytes> held = limiter_->AcquireBytes(h.payload_bytes());
    if (!held.ok()) return Fail(index, held.status());
    held_ = *std::move(held);
  }
  span.meta.payload_bytes = h.payload_bytes();
  span.meta.payload_checksum = h.payload_checksum();
  span.meta.durable = h.durable();
  span_ = std::move(span);
  salt_ = h.salt();
  index_ = index;
  received_ = 0;
  in_span_ = true;
  return absl::OkStatus();
}

absl::Status PutStream::AppendPayload(const std::vector<absl::string_view>& pieces,
                                      const Field& chunk) {
  const int64_t size = static_cast<int64_t>(chunk.size);
  if (received_ + size > span_.meta.payload_bytes) {
    return Fail(index_, absl::InvalidArgumentError(absl::StrCat(
                            "payload chunks overrun the declared payload_bytes=",
                            span_.meta.payload_bytes, "; nothing of it is stored")));
  }
  // The one copy of the payload: from the received slices into the span.
  if (received_ == 0) span_.payload.reserve(static_cast<size_t>(span_.meta.payload_bytes));
  PieceReader reader(pieces);
  if (!reader.Take(chunk.offset, nullptr) || !reader.Take(chunk.size, nullptr, &span_.payload)) {
    return Malformed();
  }
  received_ += size;
  response_.set_payload_bytes(response_.payload_bytes() + size);
  return absl::OkStatus();
}

absl::Status PutStream::StoreComplete() {
  if (!complete_) return absl::InternalError("PutStream: no completed span");
  complete_ = false;
  const Hash128 hash = span_.key.hash;
  const bool durable = span_.meta.durable;
  store::PutOptions options;
  options.salt = salt_;
  absl::StatusOr<store::PutOutcome> outcome = store_->Put(std::move(span_), options);
  span_ = store::StoredSpan();
  held_.Release();  // the store owns (or dropped) the payload now
  if (!outcome.ok()) return Fail(index_, outcome.status());
  v1::PutSpanResult* result = response_.add_results();
  result->set_index(index_);
  result->set_hash(hash.ToBytes());
  result->set_already_present(outcome->already_present);
  if (durable) result->set_durable_tier(TierToProto(outcome->durable_tier));
  return absl::OkStatus();
}

absl::Status PutStream::End() const {
  if (in_span_) {
    return Fail(index_, absl::InvalidArgumentError(absl::StrCat(
                            "the stream ended after ", received_, " of ",
                            span_.meta.payload_bytes, " payload bytes; nothing of it is stored")));
  }
  if (num_headers_ == 0) return absl::InvalidArgumentError("empty PutSpans stream: no span header");
  return absl::OkStatus();
}

absl::Status PutStream::Cancelled() const {
  return absl::CancelledError(absl::StrCat("the stream was cancelled; ", response_.results_size(),
                                           " complete spans are stored, nothing of an "
                                           "unfinished one"));
}

}  // namespace kvrecall::rpc
