#include "gpu/kernels/loki_score.h"

#include <cmath>
#include <cstdint>

#include "gpu/kernels/cuda_check.h"
#include "gpu/kernels/dispatch.cuh"
#include "gpu/kernels/scoring_kernels.cuh"
#include "gpu/kernels/top_k_internal.h"

namespace kvrecall::gpu {
namespace {

// 16-byte key loads in flight per lane for 16-bit scores (f32 scores keep kScoreSteps).
constexpr int kLokiWideSteps = 8;

struct LokiWorkspace {
  size_t scores_bytes = 0;
  size_t topk_bytes = 0;
  size_t Total() const { return scores_bytes + topk_bytes; }
};

LokiWorkspace PlanLoki(const LokiScoreArgs& a) {
  LokiWorkspace w;
  const int64_t rows = static_cast<int64_t>(a.batch_size) * a.num_q_heads;
  if (a.k > 0) {
    if (a.scores == nullptr) w.scores_bytes = kernels::AlignUp256(static_cast<size_t>(rows) * a.max_seq_len * sizeof(float));
    w.topk_bytes = kernels::AlignUp256(kernels::TopKRowWorkspaceBytes(rows));
  }
  return w;
}

}  // namespace

size_t LokiScoreWorkspaceBytes(const LokiScoreArgs& args) {
  if (ValidateLokiScoreArgs(args) != nullptr) return 0;
  return PlanLoki(args).Total();
}

cudaError_t LokiScore(const LokiScoreArgs& args, void* workspace, cudaStream_t stream) {
  if (ValidateLokiScoreArgs(args) != nullptr) return cudaErrorInvalidValue;
  const LokiWorkspace w = PlanLoki(args);
  if (w.Total() > 0 && (workspace == nullptr || (reinterpret_cast<uintptr_t>(workspace) & 15u) != 0)) {
    return cudaErrorInvalidValue;
  }
  int32_t num_sms = 0;
  KVR_CUDA_RETURN_IF_ERROR(kernels::CurrentDeviceSmCount(&num_sms));
  unsigned char* ws = static_cast<unsigned char*>(workspace);

  kernels::ScoreParams p{};
  p.q = args.q;
  p.rows_a = args.keys;
  p.rows_b = nullptr;
  p.seq_stride = args.seq_stride;
  p.head_stride = args.head_stride;
  p.num_q_heads = args.num_q_heads;
  p.num_kv_heads = args.num_kv_heads;
  p.group_size = args.num_q_heads / args.num_kv_heads;
  p.lens = args.seq_lens;
  p.num_cols = args.max_seq_len;
  p.scale = args.sm_scale > 0.0f ? args.sm_scale : 1.0f / std::sqrt(static_cast<float>(args.head_dim));
  p.chunk_cols =
      kernels::PlanScoreChunk(static_cast<int64_t>(args.batch_size) * args.num_kv_heads, args.max_seq_len, num_sms);
  p.scores = args.scores != nullptr ? args.scores : static_cast<void*>(ws);
  p.topk_ws = args.k > 0 ? reinterpret_cast<uint32_t*>(ws + w.scores_bytes) : nullptr;
  if (p.topk_ws != nullptr) {
    KVR_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(p.topk_ws, 0, kernels::TopKRowWorkspaceBytes(static_cast<int64_t>(args.batch_size) * args.num_q_heads), stream));
  }
  if (args.scores_dtype == DType::kF32) {
    KVR_DISPATCH_KV_DTYPE(args.dtype, T, {
      KVR_DISPATCH_RANK(args.rank, kRank, {
        KVR_DISPATCH_GROUP(p.group_size, kGroup, {
          KVR_CUDA_RETURN_IF_ERROR((kernels::LaunchScoreKernel<T, kRank, kGroup, false>(p, args.batch_size, stream)));
        });
      });
    });
  } else {
    // 16-bit scores (k == 0): half the bytes written, and twice the key
    // loads in flight per lane (kLokiWideSteps).
    KVR_DISPATCH_KV_DTYPE(args.dtype, T, {
      KVR_DISPATCH_KV_DTYPE(args.scores_dtype, OutT, {
        KVR_DISPATCH_RANK(args.rank, kRank, {
          KVR_DISPATCH_GROUP(p.group_size, kGroup, {
            KVR_CUDA_RETURN_IF_ERROR((kernels::LaunchScoreKernel<T, kRank, kGroup, false, OutT, kLokiWideSteps>(
                p, args.batch_size, stream)));
          });
        });
      });
    });
  }
  if (args.k == 0) return cudaSuccess;
  TopKArgs t;
  t.scores = static_cast<const float*>(p.scores);
  t.num_rows = args.batch_size * args.num_q_heads;
  t.num_cols = args.max_seq_len;
  t.row_stride = args.max_seq_len;
  t.k = args.k;
  t.indices = args.top_k_positions;
  t.values = nullptr;
  return kernels::LaunchTopKPasses(t, p.topk_ws, /*zero_workspace=*/false, /*hist0_done=*/true, num_sms, stream);
}

}  // namespace kvrecall::gpu
