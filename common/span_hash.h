#pragma once

// The chained span hash: the published key contract of kvrecall
// (docs/hashing.md). Engines compute it client-side from token ids; the same
// prefix under the same model id and salt gives the same hashes in every
// client language, on every node.
//
//   root     = XXH3-128(seed, "kvrecall.span.v1" 0x00 || u32le(len(model_id)) || model_id
//                                                  || u32le(len(salt)) || salt)
//   h_i      = XXH3-128(seed, canonical(h_{i-1}) || u32le(n_i) || u32le(t_0) ... u32le(t_{n_i-1}))
//   h_{-1}   = root,  seed = kSpanHashSeed,  canonical() = the 16 big-endian bytes of XXH128.
//
// Pinned by tests/vectors/span_hash_vectors.json, which the C++ and Python
// clients both pass.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/types.h"

namespace kvrecall {

// "kvrecall" in ASCII read as a big-endian 64-bit integer.
inline constexpr uint64_t kSpanHashSeed = 0x6b76726563616c6cULL;

// The parent hash of a model's first span. `salt` is optional isolation
// (like vLLM's cache_salt); empty by default.
Hash128 SpanRootHash(absl::string_view model_id, absl::string_view salt = "");

// The hash of a span holding `token_ids` whose parent (previous span, or the
// root) hashes to `parent`.
Hash128 SpanHash(const Hash128& parent, absl::Span<const uint32_t> token_ids);

// Hashes of consecutive spans of `block_tokens` tokens over `token_ids`.
// A final partial block is hashed only when `include_partial_tail` is true.
// REQUIRES: block_tokens > 0.
std::vector<Hash128> ChainSpanHashes(absl::string_view model_id, absl::string_view salt,
                                     absl::Span<const uint32_t> token_ids, uint32_t block_tokens,
                                     bool include_partial_tail);

}  // namespace kvrecall
