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

}  // namespace

size_t LokiScoreWorkspaceBytes(const LokiScoreArgs& args) {
  if (ValidateLokiScoreArgs(args) != nullptr) return 0;
  return kernels::PlanScoreWorkspace(static_cast<int64_t>(args.batch_size) * args.num_q_heads, args.max_seq_len,
                                     args.scores != nullptr, args.k)
      .Total();
}

cudaError_t LokiScore(const LokiScoreArgs& args, void* workspace, cudaStream_t stream) {
  if (ValidateLokiScoreArgs(args) != nullptr) return cudaErrorInvalidValue;
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
  auto launch = [&](const kernels::ScoreParams& kp) -> cudaError_t {
    if (args.scores_dtype == DType::kF32) {
      KVR_DISPATCH_KV_DTYPE(args.dtype, T, {
        KVR_DISPATCH_RANK(args.rank, kRank, {
          KVR_DISPATCH_GROUP(kp.group_size, kGroup, {
            return kernels::LaunchScoreKernel<T, kRank, kGroup, false>(kp, args.batch_size, stream);
          });
        });
      });
      return cudaErrorInvalidValue;
    }
    // 16-bit scores (k == 0): half the bytes written, and twice the key
    // loads in flight per lane (kLokiWideSteps).
    KVR_DISPATCH_KV_DTYPE(args.dtype, T, {
      KVR_DISPATCH_KV_DTYPE(args.scores_dtype, OutT, {
        KVR_DISPATCH_RANK(args.rank, kRank, {
          KVR_DISPATCH_GROUP(kp.group_size, kGroup, {
            return kernels::LaunchScoreKernel<T, kRank, kGroup, false, OutT, kLokiWideSteps>(kp, args.batch_size,
                                                                                             stream);
          });
        });
      });
    });
    return cudaErrorInvalidValue;
  };
  return kernels::RunScoring(p, args.batch_size, args.scores, args.k, args.top_k_positions, workspace, launch, stream);
}

}  // namespace kvrecall::gpu
