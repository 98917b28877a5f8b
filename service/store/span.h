#pragma once

// The vocabulary of the span store: keys, metadata, stored records, model
// geometry and miss reasons. Plain value types (no protobuf, no RocksDB).

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/types.h"

namespace kvrecall::store {

// Geometry of a registered model. Span payload layout (ARCHITECTURE.md):
// [layer][K|V][kv_head][token][head_dim], little-endian, `dtype`.
struct ModelGeometry {
  std::string model_id;
  int32_t num_layers = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kBf16;
  bool keys_post_rope = true;    // keys stored after rotary embedding
  int32_t block_tokens = 256;    // tokens per full span

  // Payload bytes of a span of `num_tokens` tokens (all layers, K and V).
  int64_t SpanPayloadBytes(int64_t num_tokens) const {
    return static_cast<int64_t>(num_layers) * 2 * num_kv_heads * num_tokens * head_dim *
           static_cast<int64_t>(DTypeSize(dtype));
  }
  // Byte offset, inside a span payload of `num_tokens` tokens, of the first
  // element of (layer, kv = 0 for K / 1 for V, kv_head, token).
  int64_t PayloadOffset(int64_t num_tokens, int32_t layer, int32_t kv, int32_t kv_head,
                        int64_t token) const {
    const int64_t elem = static_cast<int64_t>(DTypeSize(dtype));
    return ((((static_cast<int64_t>(layer) * 2 + kv) * num_kv_heads + kv_head) * num_tokens +
             token) *
            head_dim) *
           elem;
  }
};

// Identifies a span: the tenant's namespace and the chained span hash
// (docs/hashing.md). The same hash under two tenants names two spans.
struct SpanKey {
  std::string tenant;  // "" is the default tenant
  Hash128 hash;

  friend bool operator==(const SpanKey& a, const SpanKey& b) {
    return a.hash == b.hash && a.tenant == b.tenant;
  }
  template <typename H>
  friend H AbslHashValue(H h, const SpanKey& k) {
    return H::combine(std::move(h), k.tenant, k.hash);
  }
};

// Everything about a span except its payload.
struct SpanMeta {
  std::string model_id;
  Hash128 parent;                  // previous span's hash, or the model's root hash
  int32_t num_tokens = 0;
  std::vector<uint32_t> token_ids;  // optional: empty when the client did not send them
  int64_t payload_bytes = 0;
  uint64_t payload_checksum = 0;   // XXH3-64 of the payload (common/checksum.h)
  bool durable = false;            // written through to a persistent tier before the ack
  absl::Time created = absl::InfinitePast();
};

// A complete stored span. Immutable once built; shared by readers (a reader
// holding the pointer keeps the bytes alive even after eviction).
struct StoredSpan {
  SpanKey key;
  SpanMeta meta;
  std::string payload;  // meta.payload_bytes bytes, layout of ModelGeometry
};
using StoredSpanPtr = std::shared_ptr<const StoredSpan>;

// Why a span was not returned. Every miss carries one, and Stats counts them.
enum class MissReason : uint8_t {
  kNone = 0,            // not a miss
  kNeverStored = 1,     // no span with this hash was ever acknowledged in this namespace
  kEvicted = 2,         // it was stored, then evicted from every tier for capacity
  kDeleted = 3,         // it was stored, then deleted by DeleteSpans
  kModelMismatch = 4,   // a span with this hash exists, under another model id
  kChecksumFailure = 5, // its stored record failed verification; dropped, never served
  kOtherNamespace = 6,  // the hash exists only in another tenant's namespace (not visible)
  kParentMissing = 7,   // Lookup: an earlier span of the chain is missing, so the prefix ends before
  kOwnerUnavailable = 8,  // cluster: no live node holds it, and a node placed to hold it is down
};
absl::string_view MissReasonName(MissReason reason);  // "never_stored", "evicted", ...

// Which tier answered a read.
enum class TierId : uint8_t { kMemory = 0, kDisk = 1, kRocksDb = 2 };
absl::string_view TierName(TierId tier);  // "memory", "disk", "rocksdb"

}  // namespace kvrecall::store
