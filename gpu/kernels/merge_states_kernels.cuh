#pragma once

// MergeStatesKernel: one block per head (256 threads, or 1024 when there
// are many states and too few heads to fill the GPU), parallel over the states.
//   1. M = max_j lse_j (threads stride over j, block reduction);
//   2. per tile of up to kMergeTile states: the weights w_j = exp(lse_j - M)
//      go to shared memory (0 for empty states), then thread (group, d)
//      accumulates w_j * o_j[d] over the states j = group (mod kGroups) of
//      the tile -- independent loads, unrolled, so many are in flight;
//   3. the groups' partial sums are added in shared memory and scaled by
//      1 / Σ_j w_j; lse = M + ln Σ_j w_j.
// The o of an empty state is read but masked (never multiplied), so NaN or
// garbage there cannot leak into the result. Device code, included by
// merge_states.cu only.

#include <cuda_runtime.h>

#include <cstdint>

#include "gpu/kernels/device_utils.cuh"
#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu::kernels {

constexpr int kMergeThreads = 256;       // block size for few states
constexpr int kMergeThreadsMany = 1024;  // block size from kMergeManyStates states
constexpr int kMergeManyStates = 24;
constexpr int kMergeTile = 1024;

// Block-wide reduction of one float per thread (op: max or sum); all threads get the result.
template <bool kMax>
__device__ __forceinline__ float BlockReduce(float x, float* scratch /* [blockDim.x / 32] */) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float y = __shfl_xor_sync(kFullMask, x, offset);
    x = kMax ? fmaxf(x, y) : x + y;
  }
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) scratch[warp] = x;
  __syncthreads();
  float r = scratch[0];
  const int warps = static_cast<int>(blockDim.x / 32);
  for (int w = 1; w < warps; ++w) r = kMax ? fmaxf(r, scratch[w]) : r + scratch[w];
  __syncthreads();  // scratch is reused
  return r;
}

// Launched with kThreads threads (kMergeThreads or kMergeThreadsMany).
template <int kHeadDim, int kThreads, typename OutT>
__global__ void __launch_bounds__(kThreads) MergeStatesKernel(const MergeStatesArgs a) {
  constexpr int kGroups = kThreads / kHeadDim;  // the states are split over kGroups thread groups
  __shared__ float s_w[kMergeTile];
  __shared__ float s_scratch[kThreads / 32];
  __shared__ float s_acc[kGroups][kHeadDim];

  const int64_t head = blockIdx.x;
  const float* lse_h = a.lse_states + head * a.lse_head_stride;
  const float* o_h = a.o_states + head * a.o_head_stride;
  const int group = threadIdx.x / kHeadDim;
  const int d = threadIdx.x - group * kHeadDim;

  float mx = NegInf();
  for (int j = threadIdx.x; j < a.num_states; j += kThreads) mx = fmaxf(mx, lse_h[j * a.lse_state_stride]);
  mx = BlockReduce<true>(mx, s_scratch);

  OutT* out = static_cast<OutT*>(a.o) + head * kHeadDim;
  if (mx == NegInf()) {  // block-uniform: every state is empty
    if (group == 0) out[d] = FromFloat<OutT>(0.0f);
    if (threadIdx.x == 0 && a.lse != nullptr) a.lse[head] = NegInf();
    return;
  }

  float wsum = 0.0f;
  float acc = 0.0f;
  for (int tile = 0; tile < a.num_states; tile += kMergeTile) {
    const int n = min(kMergeTile, a.num_states - tile);
    for (int j = threadIdx.x; j < n; j += kThreads) {
      const float lj = lse_h[(tile + j) * a.lse_state_stride];
      const float w = lj == NegInf() ? 0.0f : expf(lj - mx);
      s_w[j] = w;
      wsum += w;
    }
    __syncthreads();
    const float* o_tile = o_h + static_cast<int64_t>(tile) * a.o_state_stride + d;
#pragma unroll 8
    for (int j = group; j < n; j += kGroups) {
      const float w = s_w[j];
      const float ov = o_tile[j * a.o_state_stride];
      acc += w != 0.0f ? w * ov : 0.0f;
    }
    __syncthreads();  // s_w is rewritten by the next tile
  }
  wsum = BlockReduce<false>(wsum, s_scratch);
  s_acc[group][d] = acc;
  __syncthreads();
  if (group == 0) {
    float total = 0.0f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) total += s_acc[g][d];
    out[d] = FromFloat<OutT>(total / wsum);
    if (d == 0 && a.lse != nullptr) a.lse[head] = mx + logf(wsum);
  }
}

}  // namespace kvrecall::gpu::kernels
