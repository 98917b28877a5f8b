#pragma once

// Device code of the decode-step bookkeeping launchers (step_kernels.h).
// All kernels use grid-stride loops over a grid sized from the arguments
// alone, and read sequence lengths and start positions from device memory,
// so their launches replay correctly from a CUDA graph as those values
// change. Included by step_kernels.cu only.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gpu/kernels/device_utils.cuh"
#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu::kernels {

constexpr int kStepThreads = 128;
// Grid cap of the element-wise kernels (each thread loops past it).
constexpr int64_t kStepMaxBlocks = 8192;
// Tokens per ProjectRows tile (the tile's x rows are staged as f32 in shared memory).
constexpr int kProjectTileTokens = 8;

template <typename T>
__device__ __forceinline__ float ToFloat(T x);
template <>
__device__ __forceinline__ float ToFloat<float>(float x) { return x; }
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float ToFloat<__half>(__half x) { return __half2float(x); }

__device__ __forceinline__ int64_t GlobalThread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t GridThreads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Element offset of slot `pos` of sequence b (KV head 0) in the pool, or -1
// when the position has no valid page (negative, past the page table's row,
// or a page id outside the pool). Not checked against seq_lens.
__device__ __forceinline__ int64_t ResolveSlot(const PagedKvCache& kv, int32_t b, int64_t pos) {
  if (pos < 0) return -1;
  const int64_t page_index = pos / kv.page_size;
  if (page_index >= kv.max_pages_per_seq) return -1;
  const int32_t page = __ldg(kv.page_table + static_cast<int64_t>(b) * kv.max_pages_per_seq + page_index);
  if (page < 0 || page >= kv.num_pages) return -1;
  return page * kv.page_stride + (pos - page_index * kv.page_size) * kv.token_stride;
}

// One thread per sequence.
__global__ void AdvanceSeqLensKernel(const AdvanceSeqLensArgs a) {
  for (int64_t b = GlobalThread(); b < a.batch_size; b += GridThreads()) {
    const int32_t len = a.seq_lens[b] + a.num_tokens;
    a.seq_lens[b] = len;
    if (a.pages != nullptr) {
      a.pages[b] = len <= 0 ? 0 : static_cast<int32_t>((static_cast<int64_t>(len) + a.page_size - 1) / a.page_size);
    }
  }
}

// One thread per 16-byte chunk of a (sequence, token, KV head) row, K and V.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kStepThreads) AppendKvKernel(const AppendKvArgs a) {
  static_assert(sizeof(T) == 2, "K/V elements are 16-bit");
  constexpr int kChunks = kHeadDim / 8;
  const PagedKvCache& kv = a.kv;
  const int64_t total = static_cast<int64_t>(a.batch_size) * a.num_tokens * kv.num_kv_heads * kChunks;
  T* k = static_cast<T*>(const_cast<void*>(kv.k));
  T* v = static_cast<T*>(const_cast<void*>(kv.v));
  const T* ks = static_cast<const T*>(a.k_src);
  const T* vs = static_cast<const T*>(a.v_src);
  for (int64_t i = GlobalThread(); i < total; i += GridThreads()) {
    const int chunk = static_cast<int>(i % kChunks);
    int64_t r = i / kChunks;
    const int32_t h = static_cast<int32_t>(r % kv.num_kv_heads);
    r /= kv.num_kv_heads;
    const int32_t t = static_cast<int32_t>(r % a.num_tokens);
    const int32_t b = static_cast<int32_t>(r / a.num_tokens);
    const int64_t start = a.start_positions != nullptr ? static_cast<int64_t>(a.start_positions[b])
                                                       : static_cast<int64_t>(kv.seq_lens[b]) - a.num_tokens;
    const int64_t slot = ResolveSlot(kv, b, start + t);
    if (slot < 0) continue;
    const int64_t dst = slot + h * kv.head_stride + chunk * 8;
    const int64_t src = b * a.src_batch_stride + h * a.src_head_stride + t * a.src_token_stride + chunk * 8;
    *reinterpret_cast<uint4*>(k + dst) = Load16(ks + src);
    *reinterpret_cast<uint4*>(v + dst) = Load16(vs + src);
  }
}

// One block per tile of kProjectTileTokens rows of one (sequence, head):
// the tile's x rows are staged in shared memory as f32, then each thread
// computes (token, column) outputs with the basis column read through L1.
template <typename XT, typename YT, int kHeadDim>
__global__ void __launch_bounds__(kStepThreads) ProjectRowsKernel(const ProjectRowsArgs a) {
  __shared__ float xs[kProjectTileTokens][kHeadDim];
  const int64_t tiles = (a.num_tokens + kProjectTileTokens - 1) / kProjectTileTokens;
  const int64_t total = tiles * a.num_heads * a.batch_size;
  const XT* x = static_cast<const XT*>(a.x);
  YT* y = static_cast<YT*>(a.y);
  for (int64_t w = blockIdx.x; w < total; w += gridDim.x) {
    const int32_t tile = static_cast<int32_t>(w % tiles);
    const int64_t bh = w / tiles;
    const int32_t h = static_cast<int32_t>(bh % a.num_heads);
    const int32_t b = static_cast<int32_t>(bh / a.num_heads);
    const int32_t t0 = tile * kProjectTileTokens;
    const int32_t nt = min(kProjectTileTokens, a.num_tokens - t0);
    const int64_t xb = b * a.x_batch_stride + h * a.x_head_stride;
    __syncthreads();  // the previous tile's readers are done with xs
    for (int e = threadIdx.x; e < nt * kHeadDim; e += kStepThreads) {
      const int tt = e / kHeadDim;
      const int i = e - tt * kHeadDim;
      xs[tt][i] = ToFloat<XT>(x[xb + static_cast<int64_t>(t0 + tt) * a.x_token_stride + i]);
    }
    __syncthreads();
    const int64_t offset = a.offset_from_seq_lens ? static_cast<int64_t>(a.seq_lens[b]) - a.num_tokens : 0;
    const float* mat = a.matrices + static_cast<int64_t>(h / a.heads_per_matrix) * kHeadDim * a.matrix_cols;
    const int64_t yb = b * a.y_batch_stride + h * a.y_head_stride;
    for (int e = threadIdx.x; e < nt * a.rank; e += kStepThreads) {
      const int tt = e / a.rank;
      const int j = e - tt * a.rank;
      const int64_t pos = t0 + tt + offset;
      if (pos < 0 || (a.max_positions > 0 && pos >= a.max_positions)) continue;
      float acc = 0.0f;
#pragma unroll 8
      for (int i = 0; i < kHeadDim; ++i) acc = fmaf(xs[tt][i], __ldg(mat + static_cast<int64_t>(i) * a.matrix_cols + j), acc);
      y[yb + pos * a.y_token_stride + j] = FromFloat<YT>(acc);
    }
  }
}

// One block per (Quest page slot, KV head, sequence): kHeadDim / 8 lanes
// read each key row (16 bytes each), 128 / lanes rows in flight, then the
// per-row-group max / min are reduced through shared memory.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kStepThreads) PageBoundsKernel(const PageBoundsArgs a) {
  constexpr int kLanes = kHeadDim / 8;
  constexpr int kRows = kStepThreads / kLanes;
  __shared__ float s_max[kRows][kHeadDim];
  __shared__ float s_min[kRows][kHeadDim];
  const PagedKvCache& kv = a.kv;
  const int32_t b = blockIdx.z;
  const int32_t h = blockIdx.y;
  const int64_t len = max(kv.seq_lens[b], 0);
  const int64_t psz = a.quest_page_size;
  const int64_t pages = (len + psz - 1) / psz;
  const int64_t first = a.last_pages == 0 ? 0 : max(int64_t{0}, pages - a.last_pages);
  const int64_t p = first + blockIdx.x;
  if (p >= pages || p >= a.max_pages) return;  // uniform over the block
  const int sub = threadIdx.x % kLanes;
  const int row = threadIdx.x / kLanes;
  float mx[8], mn[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    mx[i] = NegInf();
    mn[i] = -NegInf();
  }
  const T* k = static_cast<const T*>(kv.k) + static_cast<int64_t>(h) * kv.head_stride + sub * 8;
  const int64_t end = min((p + 1) * psz, len);
  for (int64_t pos = p * psz + row; pos < end; pos += kRows) {
    const int64_t slot = ResolveSlot(kv, b, pos);
    if (slot < 0) continue;
    float f[8];
    ToFloat8<T>(Load16(k + slot), f);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      mx[i] = fmaxf(mx[i], f[i]);
      mn[i] = fminf(mn[i], f[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    s_max[row][sub * 8 + i] = mx[i];
    s_min[row][sub * 8 + i] = mn[i];
  }
  __syncthreads();
  T* out_max = static_cast<T*>(a.page_max) + b * a.seq_stride + h * a.head_stride + p * kHeadDim;
  T* out_min = static_cast<T*>(a.page_min) + b * a.seq_stride + h * a.head_stride + p * kHeadDim;
  for (int j = threadIdx.x; j < kHeadDim; j += kStepThreads) {
    float hi = s_max[0][j], lo = s_min[0][j];
#pragma unroll
    for (int r = 1; r < kRows; ++r) {
      hi = fmaxf(hi, s_max[r][j]);
      lo = fminf(lo, s_min[r][j]);
    }
    out_max[j] = FromFloat<T>(hi);  // exact: a 16-bit value or an infinity
    out_min[j] = FromFloat<T>(lo);
  }
}

// One thread per score.
__global__ void MaskScoresKernel(const MaskScoresArgs a) {
  const int64_t stride = a.row_stride != 0 ? a.row_stride : a.num_cols;
  const int64_t total = static_cast<int64_t>(a.num_rows) * a.num_cols;
  for (int64_t i = GlobalThread(); i < total; i += GridThreads()) {
    const int64_t r = i / a.num_cols;
    const int64_t c = i - r * a.num_cols;
    const int64_t hi = static_cast<int64_t>(__ldg(a.seq_lens + r / a.rows_per_seq)) - a.window;
    const bool keep = c * a.unit < hi && (c + 1) * a.unit > a.sinks;
    if (!keep) a.scores[r * stride + c] = NegInf();
  }
}

// Exclusive prefix sum over the block of one int per thread; *total gets the
// block's sum. Every thread of the block must call it.
__device__ __forceinline__ int BlockExclusiveSum(int x, int* total) {
  __shared__ int s_warp[kStepThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int inclusive = x;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int y = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += y;
  }
  if (lane == 31) s_warp[warp] = inclusive;
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kStepThreads / 32; ++w) {
    before += w < warp ? s_warp[w] : 0;
    sum += s_warp[w];
  }
  __syncthreads();  // s_warp is reused by the next call
  *total = sum;
  return before + inclusive - x;
}

// One block per (sequence, list): sinks and window written in parallel, then
// the selection in chunks of one entry per thread, each entry's positions
// placed after a block-wide prefix sum of the entries' clipped counts.
__global__ void __launch_bounds__(kStepThreads) ComposeListsKernel(const ComposeListsArgs a) {
  const int64_t lists = static_cast<int64_t>(a.batch_size) * a.num_lists;
  for (int64_t list = blockIdx.x; list < lists; list += gridDim.x) {
    const int32_t b = static_cast<int32_t>(list / a.num_lists);
    const int64_t len = max(__ldg(a.seq_lens + b), 0);
    const int64_t hi = len - a.window;  // the selection expands within [sinks, hi)
    int32_t* out = a.positions + list * a.max_list_len;
    const int ns = static_cast<int>(min(static_cast<int64_t>(a.sinks), len));
    const int64_t w0 = max(static_cast<int64_t>(a.sinks), hi);
    const int nw = static_cast<int>(max(int64_t{0}, len - w0));
    for (int i = threadIdx.x; i < ns; i += kStepThreads) out[i] = i;
    for (int i = threadIdx.x; i < nw; i += kStepThreads) out[ns + i] = static_cast<int32_t>(w0 + i);
    int base = ns + nw;
    if (a.selected != nullptr) {
      const int32_t* sel = a.selected + list * a.num_selected;
      for (int c0 = 0; c0 < a.num_selected; c0 += kStepThreads) {
        const int i = c0 + threadIdx.x;
        const int64_t e = i < a.num_selected ? __ldg(sel + i) : -1;
        int64_t lo = 0;
        int count = 0;
        if (e >= 0) {
          lo = max(e * a.unit, static_cast<int64_t>(a.sinks));
          count = static_cast<int>(max(int64_t{0}, min((e + 1) * a.unit, hi) - lo));
        }
        int total = 0;
        const int at = base + BlockExclusiveSum(count, &total);
        for (int j = 0; j < count; ++j) out[at + j] = static_cast<int32_t>(lo + j);
        base += total;
      }
    }
    if (threadIdx.x == 0) a.list_lens[list] = base;
  }
}

}  // namespace kvrecall::gpu::kernels
