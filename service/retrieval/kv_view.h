#pragma once

// LayerKvView: zero-copy access to the keys and values of one layer of a
// context, whose tokens live in blocks (stored spans, then blocks of
// decode-time tokens). Position p is token p % block_tokens of block
// p / block_tokens; every block but the last holds block_tokens tokens.
//
// Inside a block the layout is the span layout of ARCHITECTURE.md restricted
// to one layer: [K|V][kv_head][token][head_dim], so the key row of
// (kv_head, token) is at keys + (kv_head * head_stride + token) * head_dim
// elements, with head_stride = the block's token count.

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
  int64_t num_tokens = 0;
  std::vector<KvBlock> blocks;

  const void* KeyRow(int32_t kv_head, int64_t pos) const { return Row(true, kv_head, pos); }
  const void* ValueRow(int32_t kv_head, int64_t pos) const { return Row(false, kv_head, pos); }

 private:
  const void* Row(bool key, int32_t kv_head, int64_t pos) const {
    const KvBlock& b = blocks[static_cast<size_t>(pos / block_tokens)];
    const int64_t t = pos % block_tokens;
    const int64_t elem = static_cast<int64_t>(DTypeSize(dtype));
    return static_cast<const char*>(key ? b.keys : b.values) +
           ((static_cast<int64_t>(kv_head) * b.head_stride + t) * head_dim) * elem;
  }
};

}  // namespace kvrecall::retrieval
