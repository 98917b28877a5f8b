#pragma once

// Decode attention on tensor cores (DecodeMath::kMma). Same blocks, chunks,
// position resolution and final merge as DecodeAttentionKernel
// (decode_attention_kernels.cuh); the inner loop differs. Device code,
// included by decode_attention_instantiate.cuh only.
//
// Each warp takes 16-token tiles of its block's chunk round-robin. For a
// tile, with g = lane / 4 and t = lane % 4 (the mma.sync fragment indices):
//   S' = Q' K^T   m16n8k16, twice (tokens 0-7 and 8-15 of the tile), head_dim / 16 k-steps:
//                 A = Q': row g is query head g of the list, scaled to log2
//                 units and rounded to 16 bits (high part); row g + 8 is the
//                 rounding error of the same query (low part), so
//                 S = S'[g] + S'[g + 8] carries the f32 query exactly to ~2^-16;
//                 B = K^T: thread (g, t) reads the head_dim / 4 dims
//                 [t * head_dim / 4, (t + 1) * head_dim / 4) of token g's key
//                 row (16-byte pieces, no shuffles); the dims are matched to
//                 the k index the same way in Q' (a permutation of the sum).
//   online softmax per head: one max/exp2 per (head, token), reduced over
//                 the 4 threads of a quad.
//   O' += P' V    m16n8k16, head_dim / 8 n-tiles: A = P' (row g: p rounded
//                 to 16 bits, row g + 8: its rounding error -- the C layout
//                 of S' is the A layout of P'), B = V: thread (g, t) reads
//                 dims [g * head_dim / 8, (g + 1) * head_dim / 8) of the
//                 tile's tokens 2t, 2t + 1, 2t + 8, 2t + 9 (n-tile nt holds
//                 dim n * head_dim / 8 + nt of column n), paired by byte_perm.
// The 16-byte pieces each thread needs are copied with cp.async into a
// per-warp ring of kStages tiles ([stage][piece][lane]: each lane reads back
// only what it copied, conflict-free, no barrier), kStages - 1 tiles in flight.
// Per 16 tokens a warp issues 4 * head_dim / 16 mma instead of
// 16 * (group-many 8-element dots + a 4-level shuffle reduction + exp2).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "gpu/kernels/decode_attention_internal.h"
#include "gpu/kernels/decode_attention_kernels.cuh"
#include "gpu/kernels/device_utils.cuh"

namespace kvrecall::gpu::kernels {

// Operand packing and the mma.sync instruction per 16-bit element type.
template <typename T>
struct MmaOps;

template <>
struct MmaOps<__nv_bfloat16> {
  // f32 rounded to the nearest bf16, back in f32.
  static __device__ __forceinline__ float Round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
  // Two values as one register of two bf16, `lo` in the low half (the lower k or n index).
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  // c += A (16x16, row) * B (16x8, col), f32 accumulators.
  static __device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct MmaOps<__half> {
  static __device__ __forceinline__ float Round(float x) { return __half2float(__float2half_rn(x)); }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <int kHeadDim>
struct MmaShape {
  static constexpr int kGroup = 8;                   // query heads per tile (rows 0-7; 8-15 their low parts)
  static constexpr int kKSteps = kHeadDim / 16;      // k-steps of Q'K^T
  static constexpr int kQuarter = kHeadDim / 4;      // dims of a key row per thread
  static constexpr int kKPieces = kQuarter / 8;      // 16-byte pieces of those: 4 (d = 128) or 2
  static constexpr int kNTiles = kHeadDim / 8;       // n-tiles of P'V
  static constexpr int kVPieces = kNTiles / 8;       // 16-byte pieces per value row per thread: 2 or 1
  static constexpr int kPieces = 2 * kKPieces + 4 * kVPieces;  // per thread and tile: 16 or 8
  static constexpr int kStages = 3;                  // ring depth: 2 tiles in flight per warp
  static constexpr int kRingBytesPerWarp = kStages * kPieces * 32 * 16;  // 24 KiB (d = 128) or 12 KiB
  static constexpr int kMergeBytes = (kDecodeWarps + 1) * kGroup * (kHeadDim + 2) * 4;
  static constexpr int kDynamicSmemBytes =
      kDecodeWarps * kRingBytesPerWarp > kMergeBytes ? kDecodeWarps * kRingBytesPerWarp : kMergeBytes;
};

template <typename T, int kHeadDim, bool kDense>
__global__ void __launch_bounds__(kDecodeThreads) DecodeAttentionMmaKernel(const DecodeParams p) {
  using Shape = MmaShape<kHeadDim>;
  using Ops = MmaOps<T>;
  constexpr int kGroup = Shape::kGroup;
  constexpr int kStages = Shape::kStages;
  constexpr int kPieces = Shape::kPieces;
  constexpr int kKPieces = Shape::kKPieces;
  constexpr int kVPieces = Shape::kVPieces;
  constexpr int kNTiles = Shape::kNTiles;

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
  const int g = lane >> 2;  // fragment row: query head; key row of the loads
  const int t = lane & 3;   // fragment column pair

  const ChunkRange range = ResolveChunk<kDense>(p, list, chunk, b, kv_head, s_off);
  const int n_tok = range.n_tok;

  // A fragments of Q': k-step ks covers dims t * kQuarter + ks * 4 + {0, 1}
  // (columns 2t, 2t + 1) and + {2, 3} (columns 2t + 8, 2t + 9); registers
  // (row g, high), (row g + 8, low), then the same for the second pair.
  uint32_t qa[Shape::kKSteps][4];
  {
    const bool active = g < p.heads_per_list;
    const float* qp =
        p.q + (static_cast<int64_t>(b) * p.num_q_heads + q_head0 + (active ? g : 0)) * kHeadDim + t * Shape::kQuarter;
#pragma unroll
    for (int ks = 0; ks < Shape::kKSteps; ++ks) {
      float hi[4], lo[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float x = active ? __ldg(qp + ks * 4 + i) * p.scale_log2 : 0.0f;
        hi[i] = Ops::Round(x);
        lo[i] = x - hi[i];
      }
      qa[ks][0] = Ops::Pack(hi[0], hi[1]);
      qa[ks][1] = Ops::Pack(lo[0], lo[1]);
      qa[ks][2] = Ops::Pack(hi[2], hi[3]);
      qa[ks][3] = Ops::Pack(lo[2], lo[3]);
    }
  }
  __syncthreads();

  // Online softmax of head g (m is uniform over the quad; lsum is this
  // thread's share, summed over the quad at the end).
  float m = NegInf();
  float lsum = 0.0f;
  // O' = P'V: acc[nt][0..1] row g (P high part), acc[nt][2..3] row g + 8 (low
  // part), columns 2t and 2t + 1, i.e. dims (2t + j) * kNTiles + nt.
  float acc[kNTiles][4];
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[nt][j] = 0.0f;
  }

  // Dense: head g's row of scores, from the chunk's first column.
  float* score_row = nullptr;
  if constexpr (kDense) {
    if (p.scores != nullptr && g < p.heads_per_list) {
      score_row = p.scores + (static_cast<int64_t>(b) * p.num_q_heads + q_head0 + g) * p.scores_stride +
                  range.chunk_begin;
    }
  }

  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  uint4* ring = reinterpret_cast<uint4*>(s_dyn) + warp * (Shape::kRingBytesPerWarp / 16);
  const int num_tiles = (n_tok + 15) / 16;
  const int my_tiles = num_tiles > warp ? (num_tiles - 1 - warp) / kDecodeWarps + 1 : 0;
  // Token (within the chunk) of this thread's value r of a tile: 2t, 2t + 1, 2t + 8, 2t + 9.
  auto value_token = [&](int base, int r) { return base + (r >> 1) * 8 + 2 * t + (r & 1); };
  auto issue = [&](int i) {
    uint4* slot = ring + (i % kStages) * kPieces * 32 + lane;
    const int base = (warp + i * kDecodeWarps) * 16;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int64_t off = s_off[base + nt * 8 + g];
      const bool valid = off >= 0;
#pragma unroll
      for (int pc = 0; pc < kKPieces; ++pc) {
        CpAsync16(slot + (nt * kKPieces + pc) * 32, kbase + (valid ? off + t * Shape::kQuarter + pc * 8 : 0), valid);
      }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t off = s_off[value_token(base, r)];
      const bool valid = off >= 0;
#pragma unroll
      for (int pc = 0; pc < kVPieces; ++pc) {
        CpAsync16(slot + (2 * kKPieces + r * kVPieces + pc) * 32, vbase + (valid ? off + g * kNTiles + pc * 8 : 0),
                  valid);
      }
    }
  };

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < my_tiles) issue(st);
    CpAsyncCommit();
  }
  for (int i = 0; i < my_tiles; ++i) {
    if (i + kStages - 1 < my_tiles) issue(i + kStages - 1);
    CpAsyncCommit();
    CpAsyncWait<kStages - 1>();
    const uint4* slot = ring + (i % kStages) * kPieces * 32 + lane;
    const int base = (warp + i * kDecodeWarps) * 16;

    // S' = Q'K^T for tokens 0-7 (nt 0) and 8-15 (nt 1) of the tile. Piece pc
    // holds dims 8 pc .. 8 pc + 7 of the thread's quarter: k-steps 2 pc
    // (words x, y) and 2 pc + 1 (words z, w).
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s[nt][j] = 0.0f;
#pragma unroll
      for (int pc = 0; pc < kKPieces; ++pc) {
        const uint4 kw = slot[(nt * kKPieces + pc) * 32];
        Ops::Mma(s[nt], qa[2 * pc], kw.x, kw.y);
        Ops::Mma(s[nt], qa[2 * pc + 1], kw.z, kw.w);
      }
    }
    // Logits (log2 units) of head g for this thread's tokens 2t, 2t + 1, 2t + 8, 2t + 9.
    float sv[4] = {s[0][0] + s[0][2], s[0][1] + s[0][3], s[1][0] + s[1][2], s[1][1] + s[1][3]};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (s_off[value_token(base, r)] < 0) sv[r] = NegInf();
    }
    if constexpr (kDense) {
      if (score_row != nullptr) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int tok = value_token(base, r);
          if (tok < n_tok) score_row[tok] = sv[r] * kLn2;  // -inf stays -inf
        }
      }
    }
    float mx = fmaxf(fmaxf(sv[0], sv[1]), fmaxf(sv[2], sv[3]));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
    if (mx > m) {  // rescale only when the running max grows (uniform over the quad)
      const float alpha = exp2f(m - mx);  // 0 while m is -inf
      lsum *= alpha;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[nt][j] *= alpha;
      }
      m = mx;
    }
    float pr[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) pr[r] = sv[r] == NegInf() ? 0.0f : exp2f(sv[r] - m);
    lsum += (pr[0] + pr[1]) + (pr[2] + pr[3]);
    // A fragments of P': (row g, tokens 2t, 2t + 1) high, (row g + 8) low,
    // then tokens 2t + 8, 2t + 9.
    uint32_t pa[4];
    {
      float hi[4], lo[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        hi[r] = Ops::Round(pr[r]);
        lo[r] = pr[r] - hi[r];
      }
      pa[0] = Ops::Pack(hi[0], hi[1]);
      pa[1] = Ops::Pack(lo[0], lo[1]);
      pa[2] = Ops::Pack(hi[2], hi[3]);
      pa[3] = Ops::Pack(lo[2], lo[3]);
    }
    // O' += P'V. Value piece vp of row r holds dims g * kNTiles + 8 vp .. + 7:
    // element j is column g of n-tile 8 vp + j; B pairs rows (0, 1) and (2, 3).
#pragma unroll
    for (int vp = 0; vp < kVPieces; ++vp) {
      uint4 v[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) v[r] = slot[(2 * kKPieces + r * kVPieces + vp) * 32];
      const uint32_t w0[4] = {v[0].x, v[0].y, v[0].z, v[0].w};
      const uint32_t w1[4] = {v[1].x, v[1].y, v[1].z, v[1].w};
      const uint32_t w2[4] = {v[2].x, v[2].y, v[2].z, v[2].w};
      const uint32_t w3[4] = {v[3].x, v[3].y, v[3].z, v[3].w};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const unsigned sel = (j & 1) != 0 ? 0x7632u : 0x5410u;  // high or low halves of the word pair
        const uint32_t b0 = __byte_perm(w0[j >> 1], w1[j >> 1], sel);
        const uint32_t b1 = __byte_perm(w2[j >> 1], w3[j >> 1], sel);
        Ops::Mma(acc[vp * 8 + j], pa, b0, b1);
      }
    }
  }
  CpAsyncWait<0>();
  lsum += __shfl_xor_sync(kFullMask, lsum, 1);
  lsum += __shfl_xor_sync(kFullMask, lsum, 2);

  // Per-warp states for WriteMergedStates (the ring is reused once every warp is done with it).
  __syncthreads();
  float* s_m = reinterpret_cast<float*>(s_dyn);  // [kDecodeWarps][kGroup]
  float* s_l = s_m + kDecodeWarps * kGroup;      // [kDecodeWarps][kGroup]
  float* s_acc = s_l + kDecodeWarps * kGroup;    // [kDecodeWarps][kGroup][kHeadDim]
  if (t == 0) {
    s_m[warp * kGroup + g] = m;
    s_l[warp * kGroup + g] = lsum;
  }
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      s_acc[(warp * kGroup + g) * kHeadDim + (2 * t + j) * kNTiles + nt] = acc[nt][j] + acc[nt][2 + j];
    }
  }
  __syncthreads();
  WriteMergedStates<kHeadDim, kGroup>(p, s_dyn, b, q_head0, chunk);
}

template <typename T, int kHeadDim, bool kDense>
using DecodeMmaKernelHost =
    DecodeLaunchHost<&DecodeAttentionMmaKernel<T, kHeadDim, kDense>, MmaShape<kHeadDim>::kDynamicSmemBytes>;

}  // namespace kvrecall::gpu::kernels
