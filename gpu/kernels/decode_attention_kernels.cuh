#pragma once

// Decode attention over a paged KV cache: one query per head, a list of
// tokens (sparse) or all tokens of the sequence (dense), flash-decoding
// splits. Device code, included by decode_attention_{bf16,f16}.cu only.
//
// Work decomposition. Block (chunk c, list L) handles tokens
// [c * chunk_tokens, (c + 1) * chunk_tokens) of list L = (sequence b, list l)
// for the kGroup query heads that share list l (the GQA group when lists are
// per KV head, one head otherwise). 128 threads = 4 warps:
//   1. all threads resolve the chunk's positions through the page table into
//      element offsets in shared memory (-1: skipped);
//   2. each warp takes 32-token sub-blocks round-robin. A token row of
//      head_dim 16-bit values is read by head_dim / 8 lanes, 16 bytes each,
//      so one warp instruction reads 2 (d = 128) or 4 (d = 64) rows of K and
//      of V. Rows are copied with cp.async into a per-lane ring of kStages
//      batches (each lane only ever reads back what it copied itself, so the
//      ring needs no barrier), keeping kStages - 1 batches in flight per warp;
//   3. logits come from 8-element partial dots reduced across the row's
//      lanes; each row-lane group keeps its own online-softmax state (m, l,
//      acc in log2 units), merged across the warp by shuffles and across the
//      warps in shared memory;
//   4. the block writes o and lse (natural log) directly when the list has
//      one chunk, else a partial state that MergeStates combines, or (cluster
//      merge) the chunks of a list, one thread-block cluster, merge their
//      states through distributed shared memory and write o and lse.

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "gpu/kernels/decode_attention_internal.h"
#include "gpu/kernels/device_utils.cuh"

namespace kvrecall::gpu::kernels {

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: zero-fill, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

template <int kHeadDim, int kGroup>
struct DecodeShape {
  static constexpr int kLanesPerToken = kHeadDim / 8;            // 16-byte pieces of a row
  static constexpr int kTokensPerStep = 32 / kLanesPerToken;     // rows per warp instruction
  static constexpr int kSteps = 4;                                // instructions per batch
  static constexpr int kTokensPerBatch = kTokensPerStep * kSteps;  // 8 (d=128) or 16 (d=64)
  static constexpr int kBatchesPerSub = 32 / kTokensPerBatch;
  // Ring depth: 3 keeps 2 batches in flight per warp and lets 4 blocks
  // (16 warps) share an SM (48 KiB ring + 8 KiB offsets per block).
  static constexpr int kStages = 3;
  // Per warp: kStages x kSteps x {K, V} x 32 lanes x 16 bytes.
  static constexpr int kRingBytesPerWarp = kStages * kSteps * 2 * 32 * 16;
  // Per-warp states, then the block's state for a cluster merge (WriteMergedStates).
  static constexpr int kMergeBytes = (kDecodeWarps + 1) * kGroup * (kHeadDim + 2) * 4;
  static constexpr int kDynamicSmemBytes =
      kDecodeWarps * kRingBytesPerWarp > kMergeBytes ? kDecodeWarps * kRingBytesPerWarp : kMergeBytes;
};

// The tokens of block (chunk, list): [chunk_begin, chunk_begin + n_tok) of
// the list (sparse) or of the positions (dense).
struct ChunkRange {
  int chunk_begin;
  int n_tok;
};

// Resolves the chunk's positions through the page table into element
// offsets of (position, kv_head) in s_off[0, chunk_tokens) (-1: skipped or
// past the chunk) and counts skipped entries. Called by every thread of the
// block; the caller synchronizes before reading s_off.
template <bool kDense>
__device__ __forceinline__ ChunkRange ResolveChunk(const DecodeParams& p, int list, int chunk, int b, int kv_head,
                                                   int64_t* s_off) {
  const int seq_len = p.seq_lens[b];
  int len;        // sparse: list entries; dense: attended positions [0, len)
  int range_end;  // columns this list covers
  if constexpr (kDense) {
    len = min(max(seq_len, 0), p.max_seq_len);
    range_end = p.max_seq_len;
    if (chunk == 0 && threadIdx.x == 0 && (seq_len < 0 || seq_len > p.max_seq_len) && p.num_invalid != nullptr) {
      atomicAdd(p.num_invalid, 1);
    }
  } else {
    int n = p.list_lens != nullptr ? p.list_lens[list] : p.max_list_len;
    if (n < 0 || n > p.max_list_len) {
      if (chunk == 0 && threadIdx.x == 0 && p.num_invalid != nullptr) atomicAdd(p.num_invalid, 1);
      n = min(max(n, 0), p.max_list_len);
    }
    len = n;
    range_end = n;
  }
  const int chunk_begin = chunk * p.chunk_tokens;
  const int chunk_end = min(chunk_begin + p.chunk_tokens, range_end);
  const int n_tok = max(chunk_end - chunk_begin, 0);

  const int32_t* page_row = p.page_table + static_cast<int64_t>(b) * p.max_pages_per_seq;
  const int32_t* pos_row = kDense ? nullptr : p.positions + static_cast<int64_t>(list) * p.max_list_len;
  for (int i = threadIdx.x; i < p.chunk_tokens; i += blockDim.x) {
    int64_t off = -1;
    if (i < n_tok) {
      const int idx = chunk_begin + i;
      const int pos = kDense ? idx : __ldg(pos_row + idx);
      const bool counted = kDense ? idx < len : true;
      if (counted && pos >= 0 && pos < seq_len) {
        const int page_index = pos / p.page_size;
        if (page_index < p.max_pages_per_seq) {
          const int page = __ldg(page_row + page_index);
          if (page >= 0 && page < p.num_pages) {
            off = page * p.page_stride + static_cast<int64_t>(pos - page_index * p.page_size) * p.token_stride +
                  kv_head * p.head_stride;
          }
        }
      }
      if (off < 0 && counted && p.num_invalid != nullptr) atomicAdd(p.num_invalid, 1);
    }
    s_off[i] = off;
  }
  return ChunkRange{chunk_begin, n_tok};
}

// The block's last step: merges the per-warp states (s_m, s_l [kDecodeWarps][kGroup],
// s_acc [kDecodeWarps][kGroup][kHeadDim], log2 units, in s_dyn) of the
// list's heads and writes o and lse (one chunk), a partial state (chunks
// merged by MergeStates), or, with p.cluster_merge, merges the chunks'
// states across the cluster through distributed shared memory and writes o
// and lse. Called by every thread of the block after the states are written
// and the block synchronized.
template <int kHeadDim, int kGroup>
__device__ __forceinline__ void WriteMergedStates(const DecodeParams& p, unsigned char* s_dyn, int b, int q_head0,
                                                  int chunk) {
  const float* s_m = reinterpret_cast<const float*>(s_dyn);  // [kDecodeWarps][kGroup]
  const float* s_l = s_m + kDecodeWarps * kGroup;            // [kDecodeWarps][kGroup]
  const float* s_acc = s_l + kDecodeWarps * kGroup;          // [kDecodeWarps][kGroup][kHeadDim]
  // The block's merged state for the cluster: m, l [kGroup], o [kGroup][kHeadDim] (unnormalized).
  float* c_m = const_cast<float*>(s_acc) + kDecodeWarps * kGroup * kHeadDim;
  float* c_l = c_m + kGroup;
  float* c_o = c_l + kGroup;
  for (int e = threadIdx.x; e < kGroup * kHeadDim; e += blockDim.x) {
    const int g = e / kHeadDim;
    const int dd = e - g * kHeadDim;
    if (g >= p.heads_per_list) continue;
    float mm = NegInf();
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mm = fmaxf(mm, s_m[w * kGroup + g]);
    float ll = 0.0f;
    float oo = 0.0f;
    if (mm != NegInf()) {
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float mw = s_m[w * kGroup + g];
        if (mw != NegInf()) {
          const float c = exp2f(mw - mm);
          ll += s_l[w * kGroup + g] * c;
          oo += s_acc[(w * kGroup + g) * kHeadDim + dd] * c;
        }
      }
    }
    if (p.cluster_merge) {
      c_o[e] = oo;
      if (dd == 0) {
        c_m[g] = mm;
        c_l[g] = ll;
      }
      continue;
    }
    const float o_val = ll > 0.0f ? oo / ll : 0.0f;
    const float lse_val = ll > 0.0f ? (mm + log2f(ll)) * kLn2 : NegInf();
    const int64_t row = static_cast<int64_t>(b) * p.num_q_heads + q_head0 + g;
    if (p.num_chunks == 1) {
      p.o[row * kHeadDim + dd] = o_val;
      if (dd == 0 && p.lse != nullptr) p.lse[row] = lse_val;
    } else {
      p.o[(row * p.num_chunks + chunk) * kHeadDim + dd] = o_val;
      if (dd == 0) p.lse[row * p.num_chunks + chunk] = lse_val;
    }
  }
  if (!p.cluster_merge) return;  // uniform over the grid

  // Cluster merge: block `chunk` (its rank) writes every num_chunks-th
  // element of the list's heads from the chunks' states.
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every block's c_* written
  const int chunks = p.num_chunks;
  for (int e = chunk * blockDim.x + threadIdx.x; e < kGroup * kHeadDim; e += chunks * blockDim.x) {
    const int g = e / kHeadDim;
    const int dd = e - g * kHeadDim;
    if (g >= p.heads_per_list) continue;
    float mm = NegInf();
    for (int r = 0; r < chunks; ++r) mm = fmaxf(mm, *cluster.map_shared_rank(c_m + g, r));
    float ll = 0.0f;
    float oo = 0.0f;
    if (mm != NegInf()) {
      for (int r = 0; r < chunks; ++r) {
        const float mr = *cluster.map_shared_rank(c_m + g, r);
        if (mr != NegInf()) {
          const float c = exp2f(mr - mm);
          ll += *cluster.map_shared_rank(c_l + g, r) * c;
          oo += *cluster.map_shared_rank(c_o + e, r) * c;
        }
      }
    }
    const int64_t row = static_cast<int64_t>(b) * p.num_q_heads + q_head0 + g;
    p.o[row * kHeadDim + dd] = ll > 0.0f ? oo / ll : 0.0f;
    if (dd == 0 && p.lse != nullptr) p.lse[row] = ll > 0.0f ? (mm + log2f(ll)) * kLn2 : NegInf();
  }
  cluster.sync();  // no block leaves while another still reads its shared memory
}

template <typename T, int kHeadDim, int kGroup, bool kDense>
__global__ void __launch_bounds__(kDecodeThreads) DecodeAttentionKernel(const DecodeParams p) {
  using Shape = DecodeShape<kHeadDim, kGroup>;
  constexpr int kLanesPerToken = Shape::kLanesPerToken;
  constexpr int kTokensPerStep = Shape::kTokensPerStep;
  constexpr int kSteps = Shape::kSteps;
  constexpr int kTokensPerBatch = Shape::kTokensPerBatch;
  constexpr int kBatchesPerSub = Shape::kBatchesPerSub;
  constexpr int kStages = Shape::kStages;

  __shared__ int64_t s_off[kMaxChunkTokens];
  extern __shared__ __align__(16) unsigned char s_dyn[];

  const int list = blockIdx.y;
  const int chunk = blockIdx.x;
  const int b = list / p.num_lists;
  const int l = list - b * p.num_lists;
  const int q_head0 = l * p.heads_per_list;
  const int kv_head = q_head0 / p.group_size;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int sub = lane % kLanesPerToken;
  const int slot = lane / kLanesPerToken;

  const ChunkRange range = ResolveChunk<kDense>(p, list, chunk, b, kv_head, s_off);
  const int n_tok = range.n_tok;
  const int chunk_begin = range.chunk_begin;

  // Queries of the group, pre-scaled so that logits are in log2 units.
  float qr[kGroup][8];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    const bool active = g < p.heads_per_list;
    const float* qp = p.q + (static_cast<int64_t>(b) * p.num_q_heads + q_head0 + (active ? g : 0)) * kHeadDim + sub * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) qr[g][i] = active ? __ldg(qp + i) * p.scale_log2 : 0.0f;
  }
  __syncthreads();

  // 2-3. Streaming online softmax.
  float m[kGroup];
  float lsum[kGroup];
  float acc[kGroup][8];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    m[g] = NegInf();
    lsum[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;
  }

  // Dense: this lane's row of scores (head q_head0 + sub), from the chunk's first column.
  float* score_row = nullptr;
  if constexpr (kDense) {
    if (p.scores != nullptr && sub < p.heads_per_list) {
      score_row = p.scores + (static_cast<int64_t>(b) * p.num_q_heads + q_head0 + sub) * p.scores_stride + chunk_begin;
    }
  }
  static_assert(kGroup <= kLanesPerToken, "a lane stores the logits of at most one head");

  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  uint4* ring = reinterpret_cast<uint4*>(s_dyn) + warp * (Shape::kRingBytesPerWarp / 16);
  // ring[((stage * kSteps + step) * 2 + kv) * 32 + lane]
  const int num_sub = (n_tok + 31) / 32;
  const int my_subs = num_sub > warp ? (num_sub - 1 - warp) / kDecodeWarps + 1 : 0;
  const int num_batches = my_subs * kBatchesPerSub;
  auto token_of = [&](int bi, int step) {
    const int sb = warp + (bi / kBatchesPerSub) * kDecodeWarps;
    return sb * 32 + (bi % kBatchesPerSub) * kTokensPerBatch + step * kTokensPerStep + slot;
  };
  auto issue = [&](int bi) {
    const int stage = bi % kStages;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int64_t off = s_off[token_of(bi, s)];
      const bool valid = off >= 0;
      const int64_t src = valid ? off + sub * 8 : 0;
      CpAsync16(ring + ((stage * kSteps + s) * 2 + 0) * 32 + lane, kbase + src, valid);
      CpAsync16(ring + ((stage * kSteps + s) * 2 + 1) * 32 + lane, vbase + src, valid);
    }
  };

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < num_batches) issue(st);
    CpAsyncCommit();
  }
  for (int bi = 0; bi < num_batches; ++bi) {
    if (bi + kStages - 1 < num_batches) issue(bi + kStages - 1);
    CpAsyncCommit();
    CpAsyncWait<kStages - 1>();
    const int stage = bi % kStages;

    float sv[kSteps][kGroup];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int t = token_of(bi, s);
      const bool valid = s_off[t] >= 0;
      float kf[8];
      ToFloat8<T>(ring[((stage * kSteps + s) * 2 + 0) * 32 + lane], kf);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float d = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d = fmaf(qr[g][i], kf[i], d);
        d = GroupSum<kLanesPerToken>(d);
        sv[s][g] = valid ? d : NegInf();
      }
      if constexpr (kDense) {
        // Lane `sub` < heads_per_list stores head `sub`'s logit (kGroup <= kLanesPerToken).
        if (score_row != nullptr && t < n_tok) {
          float own = sv[s][0];
#pragma unroll
          for (int g = 1; g < kGroup; ++g) own = sub == g ? sv[s][g] : own;
          score_row[t] = own * kLn2;  // -inf stays -inf
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      float mx = sv[0][g];
#pragma unroll
      for (int s = 1; s < kSteps; ++s) mx = fmaxf(mx, sv[s][g]);
      if (mx > m[g]) {  // rescale only when the running max grows
        const float alpha = exp2f(m[g] - mx);  // 0 while m[g] is -inf
        lsum[g] *= alpha;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] *= alpha;
        m[g] = mx;
      }
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      float vf[8];
      ToFloat8<T>(ring[((stage * kSteps + s) * 2 + 1) * 32 + lane], vf);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const float pr = sv[s][g] == NegInf() ? 0.0f : exp2f(sv[s][g] - m[g]);
        lsum[g] += pr;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(pr, vf[i], acc[g][i]);
      }
    }
  }
  CpAsyncWait<0>();

  // Merge the row-lane groups of the warp (lanes that differ in `slot`).
#pragma unroll
  for (int offset = kLanesPerToken; offset < 32; offset <<= 1) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const float mo = __shfl_xor_sync(kFullMask, m[g], offset);
      const float lo = __shfl_xor_sync(kFullMask, lsum[g], offset);
      const float mn = fmaxf(m[g], mo);
      const float ca = m[g] == NegInf() ? 0.0f : exp2f(m[g] - mn);
      const float cb = mo == NegInf() ? 0.0f : exp2f(mo - mn);
      lsum[g] = lsum[g] * ca + lo * cb;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float ao = __shfl_xor_sync(kFullMask, acc[g][i], offset);
        acc[g][i] = acc[g][i] * ca + ao * cb;
      }
      m[g] = mn;
    }
  }

  // Merge the warps (the ring is reused once every warp is done with it).
  __syncthreads();
  float* s_m = reinterpret_cast<float*>(s_dyn);          // [kDecodeWarps][kGroup]
  float* s_l = s_m + kDecodeWarps * kGroup;              // [kDecodeWarps][kGroup]
  float* s_acc = s_l + kDecodeWarps * kGroup;            // [kDecodeWarps][kGroup][kHeadDim]
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
#pragma unroll
      for (int i = 0; i < 8; ++i) s_acc[(warp * kGroup + g) * kHeadDim + sub * 8 + i] = acc[g][i];
      if (sub == 0) {
        s_m[warp * kGroup + g] = m[g];
        s_l[warp * kGroup + g] = lsum[g];
      }
    }
  }
  __syncthreads();
  WriteMergedStates<kHeadDim, kGroup>(p, s_dyn, b, q_head0, chunk);
}

// Launches a decode kernel on `grid`, as clusters of (grid.x, 1, 1) blocks
// (the chunks of one list) when p.cluster_merge.
template <typename Kernel>
cudaError_t LaunchDecodeGrid(Kernel* kernel, const DecodeParams& p, dim3 grid, int smem_bytes, cudaStream_t stream) {
  if (!p.cluster_merge) {
    kernel<<<grid, kDecodeThreads, smem_bytes, stream>>>(p);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kDecodeThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = grid.x;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, p);
}

// Host side of one kernel instantiation: the shared-memory attribute (set
// once per device), the resident blocks per SM (queried once per device) and
// the launch.
template <auto kKernel, int kSmem>
struct DecodeLaunchHost {
  // Per device, once: the dynamic shared-memory limit and permission for
  // clusters above the portable 8 blocks.
  static cudaError_t Prepare() {
    static std::atomic<uint64_t> smem_done{0};
    static std::atomic<uint64_t> cluster_done{0};
    const cudaError_t err = EnsureDynamicSmem(kKernel, kSmem, &smem_done);
    if (err != cudaSuccess) return err;
    int device = 0;
    if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
    const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
    if (bit != 0 && (cluster_done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
    if (cudaFuncSetAttribute(kKernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
      cudaGetLastError();  // not supported: clusters stay <= 8 (GetInfo measures what launches)
    }
    cluster_done.fetch_or(bit, std::memory_order_acq_rel);
    return cudaSuccess;
  }
  static cudaError_t GetInfo(DecodeKernelInfo* info) {
    static std::atomic<int32_t> cached_blocks[64] = {};
    static std::atomic<int32_t> cached_cluster[64] = {};
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    if (device < 64 && cached_blocks[device].load(std::memory_order_relaxed) > 0) {
      info->blocks_per_sm = cached_blocks[device].load(std::memory_order_relaxed);
      info->max_cluster = cached_cluster[device].load(std::memory_order_relaxed);
      return cudaSuccess;
    }
    err = Prepare();
    if (err != cudaSuccess) return err;
    int n = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kDecodeThreads, kSmem);
    if (err != cudaSuccess) return err;
    info->blocks_per_sm = n > 0 ? n : 1;
    // Largest cluster of this kernel the device can schedule (>= 8 on sm_90).
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(kMaxClusterChunks, 1, 1);
    config.blockDim = dim3(kDecodeThreads);
    config.dynamicSmemBytes = static_cast<size_t>(kSmem);
    int cluster = 0;
    if (cudaOccupancyMaxPotentialClusterSize(&cluster, kKernel, &config) != cudaSuccess) {
      cudaGetLastError();
      cluster = 1;  // no clusters: DecodeMerge::kCluster falls back to kKernel
    }
    info->max_cluster = cluster < 1 ? 1 : (cluster > kMaxClusterChunks ? kMaxClusterChunks : cluster);
    if (device < 64) {
      cached_cluster[device].store(info->max_cluster, std::memory_order_relaxed);
      cached_blocks[device].store(info->blocks_per_sm, std::memory_order_relaxed);
    }
    return cudaSuccess;
  }
  static cudaError_t Launch(const DecodeParams& p, dim3 grid, cudaStream_t stream) {
    const cudaError_t err = Prepare();
    if (err != cudaSuccess) return err;
    return LaunchDecodeGrid(kKernel, p, grid, kSmem, stream);
  }
};

template <typename T, int kHeadDim, int kGroup, bool kDense>
using DecodeKernelHost = DecodeLaunchHost<&DecodeAttentionKernel<T, kHeadDim, kGroup, kDense>,
                                          DecodeShape<kHeadDim, kGroup>::kDynamicSmemBytes>;

}  // namespace kvrecall::gpu::kernels
