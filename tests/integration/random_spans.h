#pragma once

// Spans with random token ids and random payload bytes, chained to a parent,
// for the process-level tests that store and fetch them through kvrecalld
// (the bytes are never read as numbers there).

#include <cstdint>
#include <random>

#include "clients/cpp/span_keys.h"
#include "common/types.h"

namespace kvrecall::testing {

// A span of `num_tokens` random token ids under `parent` (its hash is the
// chained span hash) with `payload_bytes` random bytes (a multiple of 8),
// all drawn from `rng`.
client::OwnedSpan RandomSpan(const Hash128& parent, int32_t num_tokens, int64_t payload_bytes,
                             std::mt19937_64& rng);

}  // namespace kvrecall::testing
