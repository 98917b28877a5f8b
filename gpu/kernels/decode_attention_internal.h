#pragma once

// Internal interface between the decode-attention launchers
// (decode_attention.cu) and the per-dtype kernel instantiations
// (decode_attention_{bf16,f16}.cu). Host-safe; not part of the public API.

#include <cuda_runtime.h>

#include <cstdint>

#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu::kernels {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kMaxChunkTokens = 1024;  // tokens of one list handled by one block at most

// Flat kernel parameters of DecodeAttentionKernel (sparse and dense).
struct DecodeParams {
  const void* k;  // KV pool, see PagedKvCache
  const void* v;
  int64_t page_stride;
  int64_t token_stride;
  int64_t head_stride;
  int32_t page_size;
  int32_t num_pages;
  int32_t max_pages_per_seq;
  const int32_t* page_table;  // [batch, max_pages_per_seq]
  const int32_t* seq_lens;    // [batch]
  const float* q;             // [batch, num_q_heads, head_dim]
  int32_t batch_size;
  int32_t num_q_heads;
  int32_t group_size;      // query heads per KV head
  int32_t heads_per_list;  // query heads sharing one list (<= kGroup)
  int32_t num_lists;       // lists per sequence
  const int32_t* positions;  // sparse: [batch, num_lists, max_list_len]
  const int32_t* list_lens;  // sparse: [batch, num_lists] or nullptr
  int32_t max_list_len;
  int32_t max_seq_len;     // dense: score columns
  float scale_log2;        // sm_scale * log2(e)
  int32_t chunk_tokens;    // multiple of 32, <= kMaxChunkTokens
  int32_t num_chunks;
  // true: the num_chunks (a power of two <= kMaxClusterChunks) blocks of a
  // list form one thread-block cluster and merge their states through
  // distributed shared memory, writing o and lse directly. Trailing blocks
  // past the list's tokens hold empty states.
  bool cluster_merge;
  // num_chunks == 1 or cluster_merge: o [batch * num_q_heads, head_dim], lse [batch * num_q_heads] (may be null);
  // else partial states o [batch * num_q_heads, num_chunks, head_dim], lse [batch * num_q_heads, num_chunks].
  float* o;
  float* lse;
  float* scores;  // dense: [batch * num_q_heads, scores_stride] or nullptr
  int64_t scores_stride;
  int32_t* num_invalid;
};

// Launches DecodeAttentionKernel<T, head_dim, group rounded up, dense>
// (math kFma) or DecodeAttentionMmaKernel<T, head_dim, dense> (kMma) on grid
// (num_chunks, batch * num_lists), as clusters of (num_chunks, 1, 1) blocks
// when p.cluster_merge. `math` is kFma or kMma (resolved by the caller).
// Defined per T in decode_attention_{bf16,f16}.cu. cudaErrorInvalidValue for
// an unsupported head_dim or group.
template <typename T>
cudaError_t LaunchDecodeAttention(const DecodeParams& p, int32_t head_dim, bool dense, DecodeMath math,
                                  cudaStream_t stream);

// What the planner needs to know of the kernel LaunchDecodeAttention<T>
// runs for these sizes on the current device (cached per device).
struct DecodeKernelInfo {
  int32_t blocks_per_sm = 1;  // resident blocks per SM (occupancy API)
  int32_t max_cluster = 1;    // largest cluster it can launch (cudaOccupancyMaxPotentialClusterSize), <= 16
};
template <typename T>
cudaError_t GetDecodeKernelInfo(int32_t head_dim, int32_t heads_per_list, bool dense, DecodeMath math,
                                DecodeKernelInfo* info);

// kAuto resolved by the head count alone: tensor cores when 5..8 query heads
// share a list (the launchers also pick them for small grids whose split
// merges in a cluster, decode_attention.cu PlanDecode).
inline DecodeMath ResolveDecodeMath(DecodeMath math, int32_t heads_per_list) {
  if (math != DecodeMath::kAuto) return math;
  return heads_per_list >= 5 ? DecodeMath::kMma : DecodeMath::kFma;
}

// The split of each list into chunks.
struct DecodeSplit {
  int32_t num_chunks;
  int32_t chunk_tokens;
};

constexpr int32_t kMinChunkTokens = 192;  // shorter chunks cost more (prologue, merge) than they gain

// Chooses the chunks for `num_lists_total` lists of up to `tokens` tokens,
// given the resident capacity `wave_blocks` = blocks per SM x SMs:
//   - num_splits > 0: that many (at least ceil(tokens / kMaxChunkTokens));
//   - else the smallest chunk count that makes the grid k whole waves,
//     floor(k * wave_blocks / lists) for k = 1..4, that is at least
//     ceil(tokens / kMaxChunkTokens) -- equal blocks then start and end
//     together (a partial last wave idles most of the GPU) -- capped so that
//     chunks keep >= kMinChunkTokens tokens, or >= 128 tokens when the
//     longer chunks would fill less than a third of a wave (there latency,
//     not the merge, dominates); with more work than 4 waves, the fewest
//     chunks allowed.
// The plan measured on an H100 (docs/gpu.md): one exact wave was 10-25%
// faster than 1.5-2.6 waves of smaller blocks.
inline DecodeSplit PlanDecodeSplit(int64_t num_lists_total, int32_t tokens, int32_t num_splits,
                                   int64_t wave_blocks) {
  const int64_t t = tokens > 0 ? tokens : 1;
  const int64_t lists = num_lists_total > 0 ? num_lists_total : 1;
  const int64_t min_chunks = (t + kMaxChunkTokens - 1) / kMaxChunkTokens;
  int64_t chunks = min_chunks;
  if (num_splits > 0) {
    chunks = num_splits;
  } else {
    int64_t max_chunks = t / kMinChunkTokens > 1 ? t / kMinChunkTokens : 1;
    if (lists * max_chunks * 3 < wave_blocks) max_chunks = (t + 127) / 128;
    for (int64_t k = 1; k <= 4; ++k) {
      const int64_t c = k * wave_blocks / lists;
      if (c >= min_chunks) {
        chunks = c < max_chunks ? c : max_chunks;
        break;
      }
    }
  }
  if (chunks < min_chunks) chunks = min_chunks;
  if (chunks > (t + 31) / 32) chunks = (t + 31) / 32;
  if (chunks < 1) chunks = 1;
  int64_t chunk_tokens = (t + chunks - 1) / chunks;
  chunk_tokens = (chunk_tokens + 31) / 32 * 32;
  chunks = (t + chunk_tokens - 1) / chunk_tokens;
  return DecodeSplit{static_cast<int32_t>(chunks), static_cast<int32_t>(chunk_tokens)};
}

// Cluster sizes used: powers of two up to 16 (8 is the portable size; 16 on
// devices that launch it, e.g. H100 and H200).
constexpr int32_t kMaxClusterChunks = 16;
constexpr int32_t kClusterAutoMaxChunkTokens = 256;  // kAuto: longer chunks keep the wave planner

// The split for DecodeMerge::kCluster, or num_chunks = 0 when the merge stays
// a MergeStates kernel: the list needs more chunks than the largest power of
// two <= max_cluster, the plan has a single chunk (nothing to merge), or,
// with auto_choice, the grid would exceed one wave (`wave_blocks`) or the
// chunks exceed kClusterAutoMaxChunkTokens. Chunks of chunk_tokens: as many
// as num_splits when > 0 (clamped to [ceil(tokens / kMaxChunkTokens),
// cluster size]), else chunks of about 128 tokens, as the wave planner makes
// them for small grids. num_chunks (the cluster size) is that count rounded
// up to a power of two; the trailing blocks hold empty states. Small grids
// are latency bound: the second kernel's launch and its reads cost more than
// the few idle blocks.
inline DecodeSplit PlanClusterSplit(int64_t num_lists_total, int32_t tokens, int32_t num_splits, int64_t wave_blocks,
                                    bool auto_choice, int32_t max_cluster) {
  int64_t cluster_cap = 1;
  while (cluster_cap * 2 <= max_cluster && cluster_cap * 2 <= kMaxClusterChunks) cluster_cap *= 2;
  const int64_t t = tokens > 0 ? tokens : 1;
  const int64_t lists = num_lists_total > 0 ? num_lists_total : 1;
  const int64_t min_chunks = (t + kMaxChunkTokens - 1) / kMaxChunkTokens;
  if (cluster_cap < 2 || min_chunks > cluster_cap) return DecodeSplit{0, 0};
  int64_t chunks = num_splits > 0 ? num_splits : (t + 127) / 128;
  if (chunks > cluster_cap) chunks = cluster_cap;
  if (chunks < min_chunks) chunks = min_chunks;
  if (chunks > (t + 31) / 32) chunks = (t + 31) / 32;
  int64_t chunk_tokens = (t + chunks - 1) / chunks;
  chunk_tokens = (chunk_tokens + 31) / 32 * 32;
  chunks = (t + chunk_tokens - 1) / chunk_tokens;
  if (chunks < 2) return DecodeSplit{0, 0};
  int64_t cluster = 2;
  while (cluster < chunks) cluster *= 2;
  if (auto_choice && (lists * cluster > wave_blocks || chunk_tokens > kClusterAutoMaxChunkTokens)) {
    return DecodeSplit{0, 0};
  }
  return DecodeSplit{static_cast<int32_t>(cluster), static_cast<int32_t>(chunk_tokens)};
}

}  // namespace kvrecall::gpu::kernels
