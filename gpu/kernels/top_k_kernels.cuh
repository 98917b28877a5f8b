#pragma once

// Radix top-k kernels. A row of n scores is split into column slices of
// cols_per_block; block (slice, row) of pass P (0, 1, 2):
//   - recomputes, from the histograms of passes < P in the workspace, the
//     key prefix of the k-th largest element and how many of the k are still
//     to be found below that prefix (k_rem) -- every block of the row gets the
//     same answer, so no inter-block signalling is needed;
//   - histograms digit P of the keys in its slice that match the prefix
//     (shared-memory atomics), then adds its nonzero bins to the row's global
//     histogram P.
// The output pass resolves the full 32-bit key T of the k-th largest element
// and k_rem; elements with key > T take slots [0, k - k_rem), elements equal
// to T take the first k_rem tickets of [k - k_rem, k). Slots come from
// warp-aggregated atomics. Device code, included by .cu files only.

#include <cub/block/block_scan.cuh>

#include <cuda_runtime.h>

#include <cstdint>

#include "gpu/kernels/device_utils.cuh"
#include "gpu/kernels/top_k_internal.h"

namespace kvrecall::gpu::kernels {

constexpr int kTopKThreads = 256;
constexpr int kTopKColumnAlign = 4 * kTopKThreads;  // cols_per_block is a multiple of this

struct TopKParams {
  const float* scores;  // [num_rows, row_stride]
  int64_t row_stride;
  int32_t num_cols;
  int32_t k;
  int32_t cols_per_block;
  int32_t vec4;  // 1: rows are 16-byte aligned, float4 loads
  uint32_t* ws;  // [num_rows, kTopKRowWords]
  int32_t* indices;  // [num_rows, k]
  float* values;     // [num_rows, k] or nullptr
};

__host__ __device__ constexpr int DigitShift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
__host__ __device__ constexpr uint32_t DigitBits(int pass) { return pass == 2 ? 0x3ffu : 0x7ffu; }

// Block-wide: the prefix (bits fixed by passes < kPasses), its mask, and
// k_rem. Every thread of the block must call it; all get the result.
template <int kPasses>
__device__ void ResolvePrefix(const uint32_t* ws_row, int32_t k, uint32_t* prefix, uint32_t* mask, int32_t* k_rem) {
  using BlockScan = cub::BlockScan<uint32_t, kTopKThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ uint32_t s_digit;
  __shared__ uint32_t s_above;
  constexpr int kBinsPerThread = kRadixBins / kTopKThreads;
  uint32_t pre = 0;
  uint32_t msk = 0;
  uint32_t kr = static_cast<uint32_t>(k);
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const uint32_t* hist = ws_row + pass * kRadixBins;
    if (threadIdx.x == 0) {
      s_digit = 0;
      s_above = 0;
    }
    uint32_t c[kBinsPerThread];
    uint32_t total = 0;
#pragma unroll
    for (int i = 0; i < kBinsPerThread; ++i) {
      c[i] = hist[kRadixBins - 1 - (threadIdx.x * kBinsPerThread + i)];
      total += c[i];
    }
    uint32_t before;
    BlockScan(scan_storage).ExclusiveSum(total, before);
    __syncthreads();
    uint32_t run = before;
#pragma unroll
    for (int i = 0; i < kBinsPerThread; ++i) {
      if (run < kr && run + c[i] >= kr) {
        s_digit = kRadixBins - 1 - (threadIdx.x * kBinsPerThread + i);
        s_above = run;
      }
      run += c[i];
    }
    __syncthreads();
    pre |= s_digit << DigitShift(pass);
    msk |= DigitBits(pass) << DigitShift(pass);
    kr -= s_above;
    __syncthreads();  // s_digit / s_above / scan_storage are reused by the next pass
  }
  *prefix = pre;
  *mask = msk;
  *k_rem = static_cast<int32_t>(kr);
}

template <int kPass>
__global__ void __launch_bounds__(kTopKThreads) RadixHistogramKernel(const TopKParams p) {
  __shared__ uint32_t s_hist[kRadixBins];
  const int row = blockIdx.y;
  uint32_t* ws_row = p.ws + static_cast<int64_t>(row) * kTopKRowWords;
  uint32_t prefix;
  uint32_t mask;
  int32_t k_rem;
  ResolvePrefix<kPass>(ws_row, p.k, &prefix, &mask, &k_rem);
  for (int i = threadIdx.x; i < kRadixBins; i += kTopKThreads) s_hist[i] = 0;
  __syncthreads();

  const float* srow = p.scores + static_cast<int64_t>(row) * p.row_stride;
  const int begin = blockIdx.x * p.cols_per_block;
  const int end = min(begin + p.cols_per_block, p.num_cols);
  auto visit = [&](float x) {
    const uint32_t key = OrderKey(x);
    if ((key & mask) == prefix) atomicAdd(&s_hist[(key >> DigitShift(kPass)) & DigitBits(kPass)], 1u);
  };
  if (p.vec4 != 0) {
    const int nvec = max(end - begin, 0) / 4;
    const float4* r4 = reinterpret_cast<const float4*>(srow + begin);
#pragma unroll 4
    for (int i = threadIdx.x; i < nvec; i += kTopKThreads) {
      const float4 x = __ldg(r4 + i);
      visit(x.x);
      visit(x.y);
      visit(x.z);
      visit(x.w);
    }
    for (int c = begin + 4 * nvec + threadIdx.x; c < end; c += kTopKThreads) visit(__ldg(srow + c));
  } else {
#pragma unroll 4
    for (int c = begin + threadIdx.x; c < end; c += kTopKThreads) visit(__ldg(srow + c));
  }
  __syncthreads();
  uint32_t* g_hist = ws_row + kPass * kRadixBins;
  for (int i = threadIdx.x; i < kRadixBins; i += kTopKThreads) {
    const uint32_t v = s_hist[i];
    if (v != 0) atomicAdd(&g_hist[i], v);
  }
}

// Appends the lanes with `take` set to the output range [offset, offset + limit).
__device__ __forceinline__ void EmitSelected(bool take, uint32_t* counter, int32_t offset, uint32_t limit, int32_t col,
                                             float x, int32_t* out_idx, float* out_val) {
  const unsigned m = __ballot_sync(kFullMask, take);
  if (m == 0) return;
  const int lane = threadIdx.x & 31;
  const int leader = __ffs(m) - 1;
  uint32_t base = 0;
  if (lane == leader) base = atomicAdd(counter, static_cast<uint32_t>(__popc(m)));
  base = __shfl_sync(kFullMask, base, leader);
  if (take) {
    const uint32_t slot = base + static_cast<uint32_t>(__popc(m & ((1u << lane) - 1u)));
    if (slot < limit) {
      out_idx[offset + slot] = col;
      if (out_val != nullptr) out_val[offset + slot] = x;
    }
  }
}

__global__ void __launch_bounds__(kTopKThreads) RadixOutputKernel(const TopKParams p) {
  const int row = blockIdx.y;
  uint32_t* ws_row = p.ws + static_cast<int64_t>(row) * kTopKRowWords;
  uint32_t threshold;
  uint32_t mask;
  int32_t k_rem;
  ResolvePrefix<3>(ws_row, p.k, &threshold, &mask, &k_rem);
  uint32_t* gt_counter = ws_row + kTopKCounterOffset;
  uint32_t* eq_counter = gt_counter + 1;
  const int32_t eq_offset = p.k - k_rem;
  int32_t* out_idx = p.indices + static_cast<int64_t>(row) * p.k;
  float* out_val = p.values != nullptr ? p.values + static_cast<int64_t>(row) * p.k : nullptr;

  const float* srow = p.scores + static_cast<int64_t>(row) * p.row_stride;
  const int begin = blockIdx.x * p.cols_per_block;
  const int end = min(begin + p.cols_per_block, p.num_cols);
  auto visit = [&](bool in, int col, float x) {
    const uint32_t key = OrderKey(x);
    EmitSelected(in && key > threshold, gt_counter, 0, static_cast<uint32_t>(eq_offset), col, x, out_idx, out_val);
    EmitSelected(in && key == threshold, eq_counter, eq_offset, static_cast<uint32_t>(k_rem), col, x, out_idx, out_val);
  };
  int tail_begin = begin;
  if (p.vec4 != 0) {
    const int nvec = max(end - begin, 0) / 4;
    const float4* r4 = reinterpret_cast<const float4*>(srow + begin);
    for (int i0 = 0; i0 < nvec; i0 += kTopKThreads) {  // block-uniform trip count
      const int i = i0 + static_cast<int>(threadIdx.x);
      const bool in = i < nvec;
      const float4 x = in ? __ldg(r4 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
      const int c = begin + 4 * i;
      visit(in, c, x.x);
      visit(in, c + 1, x.y);
      visit(in, c + 2, x.z);
      visit(in, c + 3, x.w);
    }
    tail_begin = begin + 4 * nvec;
  }
  for (int c0 = tail_begin; c0 < end; c0 += kTopKThreads) {
    const int c = c0 + static_cast<int>(threadIdx.x);
    const bool in = c < end;
    visit(in, c, in ? __ldg(srow + c) : 0.0f);
  }
}

}  // namespace kvrecall::gpu::kernels
