#pragma once

// LayerKvView: zero-copy access to the keys and values of one layer of a
// context, whose tokens live in blocks: first the stored spans of its prefix
// (every one full, i.e. block_tokens tokens, but possibly the last), then
// blocks of decode-time tokens appended after the prefix.
//
// Inside a block the layout is the span layout of ARCHITECTURE.md restricted
// to one layer: [K|V][kv_head][token][head_dim], so the key row of
// (kv_head, token) is at keys + (kv_head * head_stride + token) * head_dim
// elements, with head_stride = the block's token capacity.

#include <cstdint>
#include <vector>

#include "common/types.h"

namespace kvrecall::retrieval {

struct KvBlock {
  const void* keys = nullptr;    // [num_kv_heads, head_stride, head_dim] elements of dtype
  const void* values = nullptr;  // [num_kv_heads, head_stride, head_dim] elements of dtype
  int32_t num_tokens = 0;        // tokens in this block
  int32_t head_stride = 0;       // tokens between consecutive kv heads (>= num_tokens)
};

// Borrowed view; the owner of the blocks (a Context holding StoredSpanPtrs)
// must outlive it. Value type; thread-compatible.
struct LayerKvView {
  DType dtype = DType::kF16;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_tokens = 0;
  int64_t num_tokens = 0;         // positions 0..num_tokens-1 are readable
  int64_t prefix_tokens = 0;      // tokens in the prefix blocks
  int32_t num_prefix_blocks = 0;  // blocks[0, num_prefix_blocks) hold the prefix
  std::vector<KvBlock> blocks;

  const void* KeyRow(int32_t kv_head, int64_t pos) const { return Row(true, kv_head, pos); }
  const void* ValueRow(int32_t kv_head, int64_t pos) const { return Row(false, kv_head, pos); }

 private:
  const void* Row(bool key, int32_t kv_head, int64_t pos) const {
    int64_t block, t;
    if (pos < prefix_tokens || num_prefix_blocks == 0) {
      block = pos / block_tokens;
      t = pos % block_tokens;
    } else {
      const int64_t rel = pos - prefix_tokens;
      block = num_prefix_blocks + rel / block_tokens;
      t = rel % block_tokens;
    }
    const KvBlock& b = blocks[static_cast<size_t>(block)];
    const int64_t elem = static_cast<int64_t>(DTypeSize(dtype));
    return static_cast<const char*>(key ? b.keys : b.values) +
           ((static_cast<int64_t>(kv_head) * b.head_stride + t) * head_dim) * elem;
  }
};

}  // namespace kvrecall::retrieval
