#include "tests/integration/random_spans.h"

#include <cstring>

#include "common/span_hash.h"

namespace kvrecall::testing {

client::OwnedSpan RandomSpan(const Hash128& parent, int32_t num_tokens, int64_t payload_bytes,
                             std::mt19937_64& rng, RandomPayload payload) {
  client::OwnedSpan s;
  s.parent = parent;
  s.token_ids.resize(static_cast<size_t>(num_tokens));
  for (auto& t : s.token_ids) t = static_cast<uint32_t>(rng() % 128000);
  s.hash = SpanHash(parent, s.token_ids);
  s.payload.resize(static_cast<size_t>(payload_bytes));
  if (payload == RandomPayload::kFiniteBf16) {
    std::uniform_real_distribution<float> value(-1.0f, 1.0f);
    for (size_t b = 0; b + 2 <= s.payload.size(); b += 2) {
      const float f = value(rng);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      const uint16_t bf16 = static_cast<uint16_t>(bits >> 16);  // a float's top half
      std::memcpy(s.payload.data() + b, &bf16, 2);
    }
    return s;
  }
  for (size_t b = 0; b + 8 <= s.payload.size(); b += 8) {
    const uint64_t v = rng();
    std::memcpy(s.payload.data() + b, &v, 8);
  }
  return s;
}

std::vector<client::OwnedSpan> RandomChain(const std::string& model_id, int n, int32_t num_tokens,
                                           int64_t payload_bytes, std::mt19937_64& rng,
                                           RandomPayload payload) {
  std::vector<client::OwnedSpan> spans;
  Hash128 parent = SpanRootHash(model_id);
  for (int i = 0; i < n; ++i) {
    spans.push_back(RandomSpan(parent, num_tokens, payload_bytes, rng, payload));
    parent = spans.back().hash;
  }
  return spans;
}

std::vector<Hash128> SpanHashes(const std::vector<client::OwnedSpan>& spans) {
  std::vector<Hash128> out;
  out.reserve(spans.size());
  for (const auto& s : spans) out.push_back(s.hash);
  return out;
}

v1::ModelGeometry SmallModel(const std::string& model_id, v1::DType dtype, int32_t num_layers,
                             int32_t num_q_heads, int32_t num_kv_heads, int32_t block_tokens) {
  v1::ModelGeometry g;
  g.set_model_id(model_id);
  g.set_num_layers(num_layers);
  g.set_num_q_heads(num_q_heads);
  g.set_num_kv_heads(num_kv_heads);
  g.set_head_dim(16);
  g.set_dtype(dtype);
  g.set_block_tokens(block_tokens);
  return g;
}

}  // namespace kvrecall::testing
