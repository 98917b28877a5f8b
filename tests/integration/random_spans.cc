#include "tests/integration/random_spans.h"

#include <cstring>

#include "common/span_hash.h"

namespace kvrecall::testing {

client::OwnedSpan RandomSpan(const Hash128& parent, int32_t num_tokens, int64_t payload_bytes,
                             std::mt19937_64& rng) {
  client::OwnedSpan s;
  s.parent = parent;
  s.token_ids.resize(static_cast<size_t>(num_tokens));
  for (auto& t : s.token_ids) t = static_cast<uint32_t>(rng() % 128000);
  s.hash = SpanHash(parent, s.token_ids);
  s.payload.resize(static_cast<size_t>(payload_bytes));
  for (size_t b = 0; b + 8 <= s.payload.size(); b += 8) {
    const uint64_t v = rng();
    std::memcpy(s.payload.data() + b, &v, 8);
  }
  return s;
}

}  // namespace kvrecall::testing
