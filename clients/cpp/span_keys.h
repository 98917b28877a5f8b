#pragma once

// Span keys and layouts on the client side: the chained span hash of
// docs/hashing.md (implemented once, in common/span_hash.h) and conversions
// between a sequence's K/V and per-span payloads.
//
// Layouts (element type and size from the model's dtype):
//   sequence: [num_layers][2 (K, V)][num_kv_heads][num_tokens][head_dim]
//   span:     [num_layers][2 (K, V)][num_kv_heads][span_tokens][head_dim]
// i.e. a span is the token range [first, first + span_tokens) of a sequence.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/span_hash.h"
#include "common/types.h"
#include "kvrecall/v1/kv_store.pb.h"

namespace kvrecall::client {

// Hashes of consecutive spans of `block_tokens` over `token_ids`
// (ChainSpanHashes of common/span_hash.h).
inline std::vector<Hash128> ChainHashes(absl::string_view model_id, absl::string_view salt,
                                        absl::Span<const uint32_t> token_ids,
                                        uint32_t block_tokens, bool include_partial_tail) {
  return ChainSpanHashes(model_id, salt, token_ids, block_tokens, include_partial_tail);
}

// Bytes per element of a proto dtype; 0 for DTYPE_UNSPECIFIED.
int64_t DTypeBytes(v1::DType dtype);
// Payload bytes of a span of `num_tokens` tokens of `model`.
int64_t SpanPayloadBytes(const v1::ModelGeometry& model, int64_t num_tokens);

// A span with its own payload, ready for KvStoreClient::PutSpans.
struct OwnedSpan {
  Hash128 hash;
  Hash128 parent;
  std::vector<uint32_t> token_ids;  // [num_tokens]
  std::string payload;              // span layout
};

// Cuts a sequence into spans of model.block_tokens() tokens (the last one
// partial when include_partial_tail, else dropped) with their chained hashes.
// `sequence` is in the sequence layout for token_ids.size() tokens.
// INVALID_ARGUMENT when its size does not match.
absl::StatusOr<std::vector<OwnedSpan>> SequenceToSpans(const v1::ModelGeometry& model,
                                                       absl::string_view salt,
                                                       absl::Span<const uint32_t> token_ids,
                                                       absl::string_view sequence,
                                                       bool include_partial_tail);

// Concatenates span payloads (span layout, `tokens[i]` tokens each, covering
// `num_layers` layers) into one sequence-layout buffer. INVALID_ARGUMENT when
// a payload's size does not match.
absl::StatusOr<std::string> SpansToSequence(const v1::ModelGeometry& model, int32_t num_layers,
                                            absl::Span<const absl::string_view> payloads,
                                            absl::Span<const int32_t> tokens);

}  // namespace kvrecall::client
