#include "common/span_hash.h"

#include <xxhash.h>

#include <algorithm>

namespace kvrecall {
namespace {

void AppendU32Le(uint32_t v, std::string* out) {
  for (int i = 0; i < 4; ++i) {
    out->push_back(static_cast<char>(v & 0xff));
    v >>= 8;
  }
}

Hash128 FromXxh(const XXH128_hash_t& h) {
  Hash128 out;
  out.high = h.high64;
  out.low = h.low64;
  return out;
}

}  // namespace

Hash128 SpanRootHash(absl::string_view model_id, absl::string_view salt) {
  std::string buf("kvrecall.span.v1");
  buf.push_back('\0');
  AppendU32Le(static_cast<uint32_t>(model_id.size()), &buf);
  buf.append(model_id.data(), model_id.size());
  AppendU32Le(static_cast<uint32_t>(salt.size()), &buf);
  buf.append(salt.data(), salt.size());
  return FromXxh(XXH3_128bits_withSeed(buf.data(), buf.size(), kSpanHashSeed));
}

Hash128 SpanHash(const Hash128& parent, absl::Span<const uint32_t> token_ids) {
  std::string buf = parent.ToBytes();
  buf.reserve(16 + 4 + 4 * token_ids.size());
  AppendU32Le(static_cast<uint32_t>(token_ids.size()), &buf);
  for (uint32_t t : token_ids) AppendU32Le(t, &buf);
  return FromXxh(XXH3_128bits_withSeed(buf.data(), buf.size(), kSpanHashSeed));
}

std::vector<Hash128> ChainSpanHashes(absl::string_view model_id, absl::string_view salt,
                                     absl::Span<const uint32_t> token_ids, uint32_t block_tokens,
                                     bool include_partial_tail) {
  std::vector<Hash128> out;
  if (block_tokens == 0) return out;
  Hash128 parent = SpanRootHash(model_id, salt);
  for (size_t begin = 0; begin < token_ids.size(); begin += block_tokens) {
    const size_t n = std::min<size_t>(block_tokens, token_ids.size() - begin);
    if (n < block_tokens && !include_partial_tail) break;
    parent = SpanHash(parent, token_ids.subspan(begin, n));
    out.push_back(parent);
  }
  return out;
}

}  // namespace kvrecall
