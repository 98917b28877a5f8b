#pragma once

// MergeStatesKernel: one warp per head; lane i holds dims i, i + 32, ...
// Pass 1 finds M = max_j lse_j, pass 2 accumulates exp(lse_j - M) * o_j.
// Device code, included by merge_states.cu only.

#include <cuda_runtime.h>

#include <cstdint>

#include "gpu/kernels/device_utils.cuh"
#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu::kernels {

constexpr int kMergeThreads = 128;

template <int kHeadDim, typename OutT>
__global__ void __launch_bounds__(kMergeThreads) MergeStatesKernel(const MergeStatesArgs a) {
  constexpr int kPer = kHeadDim / 32;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t head = static_cast<int64_t>(blockIdx.x) * (kMergeThreads / 32) + warp;
  if (head >= a.num_heads) return;  // warp-uniform

  const float* lse_h = a.lse_states + head * a.lse_head_stride;
  float mx = NegInf();
  for (int j = lane; j < a.num_states; j += 32) mx = fmaxf(mx, lse_h[j * a.lse_state_stride]);
  mx = WarpMax(mx);

  float acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.0f;
  float sum = 0.0f;
  if (mx != NegInf()) {
    const float* o_h = a.o_states + head * a.o_head_stride + lane;
#pragma unroll 4
    for (int j = 0; j < a.num_states; ++j) {
      const float lj = lse_h[j * a.lse_state_stride];
      const float w = lj == NegInf() ? 0.0f : expf(lj - mx);
      sum += w;
      if (w != 0.0f) {
#pragma unroll
        for (int i = 0; i < kPer; ++i) acc[i] = fmaf(w, o_h[j * a.o_state_stride + 32 * i], acc[i]);
      }
    }
  }
  const bool any = mx != NegInf();
  const float inv = any ? 1.0f / sum : 0.0f;
  OutT* out = static_cast<OutT*>(a.o) + head * kHeadDim + lane;
#pragma unroll
  for (int i = 0; i < kPer; ++i) out[32 * i] = FromFloat<OutT>(acc[i] * inv);
  if (lane == 0 && a.lse != nullptr) a.lse[head] = any ? mx + logf(sum) : NegInf();
}

}  // namespace kvrecall::gpu::kernels
