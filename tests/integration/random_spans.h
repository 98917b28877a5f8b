#pragma once

// Spans with random token ids and random payload bytes, chained to a parent,
// and the small models they are stored under, for the process-level tests
// that store and fetch them through kvrecalld (the bytes are never read as
// numbers there).

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "clients/cpp/span_keys.h"
#include "common/types.h"
#include "kvrecall/v1/kv_store.pb.h"

namespace kvrecall::testing {

// What a random span's payload holds: random bytes, or finite bf16 values
// in [-1, 1) (for spans an index build reads as keys).
enum class RandomPayload { kBytes, kFiniteBf16 };

// A span of `num_tokens` random token ids under `parent` (its hash is the
// chained span hash) with `payload_bytes` of payload (a multiple of 8), all
// drawn from `rng`.
client::OwnedSpan RandomSpan(const Hash128& parent, int32_t num_tokens, int64_t payload_bytes,
                             std::mt19937_64& rng, RandomPayload payload = RandomPayload::kBytes);

// A chain of `n` RandomSpans from the root of `model_id`, each under the one
// before.
std::vector<client::OwnedSpan> RandomChain(const std::string& model_id, int n, int32_t num_tokens,
                                           int64_t payload_bytes, std::mt19937_64& rng,
                                           RandomPayload payload = RandomPayload::kBytes);

// The hashes of `spans`, in order.
std::vector<Hash128> SpanHashes(const std::vector<client::OwnedSpan>& spans);

// A small model of head dimension 16 and `block_tokens` tokens per span: a
// span's payload is num_layers x 2 x num_kv_heads x block_tokens x 16 x 2
// bytes (bf16 or f16).
v1::ModelGeometry SmallModel(const std::string& model_id, v1::DType dtype, int32_t num_layers,
                             int32_t num_q_heads, int32_t num_kv_heads, int32_t block_tokens);

}  // namespace kvrecall::testing
