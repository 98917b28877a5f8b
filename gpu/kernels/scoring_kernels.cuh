#pragma once

// Loki and Quest scoring kernels. Both stream rows of 16-bit values (Loki:
// the rank-r key plane, r * 2 bytes per token; Quest: the max and min rows
// of a page, head_dim * 2 bytes each) with row_bytes / 16 lanes per row and
// kSteps 16-byte loads in flight per lane, and score the kGroup query heads
// of one KV head from each row. Block = (column chunk, sequence x KV head),
// 128 threads. Device code, included by loki_score.cu / quest_score.cu only.

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "gpu/kernels/device_utils.cuh"
#include "gpu/kernels/top_k_internal.h"

namespace kvrecall::gpu::kernels {

constexpr int kScoreThreads = 128;
constexpr int kScoreWarps = kScoreThreads / 32;
constexpr int kScoreSteps = 4;

struct ScoreParams {
  const float* q;       // [batch, num_q_heads, q_dim] f32
  const void* rows_a;   // Loki: keys; Quest: page_max
  const void* rows_b;   // Quest: page_min
  int64_t seq_stride;   // elements
  int64_t head_stride;  // elements
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t group_size;
  const int32_t* lens;  // [batch] valid columns per sequence
  int32_t num_cols;     // columns per row of scores
  float scale;
  int32_t chunk_cols;   // columns per block
  void* scores;         // [batch * num_q_heads, num_cols] of the kernel's OutT
  uint32_t* topk_ws;    // Loki only: accumulate pass-0 histograms when not null
};

// kRowElems: 16-bit elements per row (Loki rank or Quest head_dim).
// kQuest: score = Σ max(q*a, q*b) instead of Σ q*a.
// OutT: score type written (float; bf16 / half for Loki without top-k).
// kSteps: 16-byte loads in flight per lane (rows per lane per iteration).
template <typename T, int kRowElems, int kGroup, bool kQuest, typename OutT = float, int kSteps = kScoreSteps>
__global__ void __launch_bounds__(kScoreThreads) ScoreKernel(const ScoreParams p) {
  constexpr int kLanesPerRow = kRowElems / 8;
  constexpr int kRowsPerStep = 32 / kLanesPerRow;
  constexpr int kRowsPerWarpIter = kRowsPerStep * kSteps;
  extern __shared__ uint32_t s_hist[];  // [kGroup][kRadixBins] when topk_ws is set

  const int bh = blockIdx.y;
  const int b = bh / p.num_kv_heads;
  const int kv_head = bh - b * p.num_kv_heads;
  const int q_head0 = kv_head * p.group_size;
  const int heads = p.group_size;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int sub = lane % kLanesPerRow;
  const int slot = lane / kLanesPerRow;
  const bool hist = p.topk_ws != nullptr;

  if (hist) {
    for (int i = threadIdx.x; i < kGroup * kRadixBins; i += kScoreThreads) s_hist[i] = 0;
    __syncthreads();
  }

  float qr[kGroup][8];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    const bool active = g < heads;
    const float* qp =
        p.q + (static_cast<int64_t>(b) * p.num_q_heads + q_head0 + (active ? g : 0)) * kRowElems + sub * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) qr[g][i] = active ? __ldg(qp + i) * p.scale : 0.0f;
  }

  const int len = min(max(p.lens[b], 0), p.num_cols);
  const int64_t base = static_cast<int64_t>(b) * p.seq_stride + static_cast<int64_t>(kv_head) * p.head_stride;
  const T* ra = static_cast<const T*>(p.rows_a) + base;
  const T* rb = kQuest ? static_cast<const T*>(p.rows_b) + base : nullptr;
  const int col_begin = blockIdx.x * p.chunk_cols;
  const int col_end = min(col_begin + p.chunk_cols, p.num_cols);

  for (int c0 = col_begin + warp * kRowsPerWarpIter; c0 < col_end; c0 += kScoreWarps * kRowsPerWarpIter) {
    uint4 xa[kSteps];
    uint4 xb[kSteps];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int c = c0 + s * kRowsPerStep + slot;
      const bool valid = c < len && c < col_end;
      const int64_t off = static_cast<int64_t>(c) * kRowElems + sub * 8;
      xa[s] = valid ? Load16(ra + off) : make_uint4(0, 0, 0, 0);
      if constexpr (kQuest) xb[s] = valid ? Load16(rb + off) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int c = c0 + s * kRowsPerStep + slot;
      float fa[8];
      ToFloat8<T>(xa[s], fa);
      float fb[8];
      if constexpr (kQuest) ToFloat8<T>(xb[s], fb);
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float d = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if constexpr (kQuest) {
            d += fmaxf(qr[g][i] * fa[i], qr[g][i] * fb[i]);
          } else {
            d = fmaf(qr[g][i], fa[i], d);
          }
        }
        d = GroupSum<kLanesPerRow>(d);
        if (c < col_end && g < heads && sub == g % kLanesPerRow) {
          const float score = c < len ? d : NegInf();
          static_cast<OutT*>(p.scores)[(static_cast<int64_t>(b) * p.num_q_heads + q_head0 + g) * p.num_cols + c] =
              FromFloat<OutT>(score);
          if (hist) atomicAdd(&s_hist[g * kRadixBins + (OrderKey(score) >> 21)], 1u);
        }
      }
    }
  }

  if (hist) {
    __syncthreads();
    for (int g = 0; g < heads; ++g) {
      uint32_t* g_hist = p.topk_ws + (static_cast<int64_t>(b) * p.num_q_heads + q_head0 + g) * kTopKRowWords;
      for (int i = threadIdx.x; i < kRadixBins; i += kScoreThreads) {
        const uint32_t v = s_hist[g * kRadixBins + i];
        if (v != 0) atomicAdd(&g_hist[i], v);
      }
    }
  }
}

// Columns per block: enough blocks for ~8 per SM, chunks of >= 512 columns.
inline int32_t PlanScoreChunk(int64_t num_seq_heads, int32_t num_cols, int32_t num_sms) {
  const int64_t target_blocks = static_cast<int64_t>(num_sms) * 8;
  int64_t chunks = (target_blocks + num_seq_heads - 1) / num_seq_heads;
  const int64_t cap = (static_cast<int64_t>(num_cols) + 511) / 512;
  if (chunks > cap) chunks = cap;
  if (chunks < 1) chunks = 1;
  int64_t chunk = (num_cols + chunks - 1) / chunks;
  chunk = (chunk + 63) / 64 * 64;
  return static_cast<int32_t>(chunk);
}

template <typename T, int kRowElems, int kGroup, bool kQuest, typename OutT = float, int kSteps = kScoreSteps>
cudaError_t LaunchScoreKernel(const ScoreParams& p, int32_t batch_size, cudaStream_t stream) {
  const int smem = p.topk_ws != nullptr ? kGroup * kRadixBins * static_cast<int>(sizeof(uint32_t)) : 0;
  auto* kernel = &ScoreKernel<T, kRowElems, kGroup, kQuest, OutT, kSteps>;
  static std::atomic<uint64_t> smem_done{0};
  const cudaError_t err = EnsureDynamicSmem(kernel, smem, &smem_done);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.num_cols + p.chunk_cols - 1) / p.chunk_cols),
                  static_cast<unsigned>(batch_size * p.num_kv_heads));
  kernel<<<grid, kScoreThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Host side shared by LokiScore and QuestScore.

// Workspace of a scoring launcher: the f32 scores when the caller passes no
// output (only with a top-k), then the top-k histograms (with a top-k).
struct ScoreWorkspace {
  size_t scores_bytes = 0;
  size_t topk_bytes = 0;
  size_t Total() const { return scores_bytes + topk_bytes; }
};

inline ScoreWorkspace PlanScoreWorkspace(int64_t rows, int32_t num_cols, bool has_scores, int32_t k) {
  ScoreWorkspace w;
  if (k > 0) {
    if (!has_scores) w.scores_bytes = AlignUp256(static_cast<size_t>(rows) * num_cols * sizeof(float));
    w.topk_bytes = AlignUp256(TopKRowWorkspaceBytes(rows));
  }
  return w;
}

// Runs a scoring launcher after its validation: checks the workspace, points
// p.scores (the caller's `scores` or the workspace) and p.topk_ws into it,
// zeroes the histograms, sizes the column chunks, calls `launch(p)` (the
// dtype dispatch and the ScoreKernel launch), then the remaining top-k passes
// into `top_k` when k > 0. p holds the rest of the kernel parameters.
template <typename LaunchFn>
cudaError_t RunScoring(ScoreParams p, int32_t batch_size, void* scores, int32_t k, int32_t* top_k, void* workspace,
                       LaunchFn launch, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(batch_size) * p.num_q_heads;
  const ScoreWorkspace w = PlanScoreWorkspace(rows, p.num_cols, scores != nullptr, k);
  if (w.Total() > 0 && (workspace == nullptr || (reinterpret_cast<uintptr_t>(workspace) & 15u) != 0)) {
    return cudaErrorInvalidValue;
  }
  int32_t num_sms = 0;
  cudaError_t err = CurrentDeviceSmCount(&num_sms);
  if (err != cudaSuccess) return err;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  p.chunk_cols = PlanScoreChunk(static_cast<int64_t>(batch_size) * p.num_kv_heads, p.num_cols, num_sms);
  p.scores = scores != nullptr ? scores : static_cast<void*>(ws);
  p.topk_ws = k > 0 ? reinterpret_cast<uint32_t*>(ws + w.scores_bytes) : nullptr;
  if (p.topk_ws != nullptr) {
    err = cudaMemsetAsync(p.topk_ws, 0, TopKRowWorkspaceBytes(rows), stream);
    if (err != cudaSuccess) return err;
  }
  err = launch(p);
  if (err != cudaSuccess || k == 0) return err;
  TopKArgs t;
  t.scores = static_cast<const float*>(p.scores);
  t.num_rows = static_cast<int32_t>(rows);
  t.num_cols = p.num_cols;
  t.row_stride = p.num_cols;
  t.k = k;
  t.indices = top_k;
  t.values = nullptr;
  return LaunchTopKPasses(t, p.topk_ws, /*zero_workspace=*/false, /*hist0_done=*/true, num_sms, stream);
}

}  // namespace kvrecall::gpu::kernels
