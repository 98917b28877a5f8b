#include "gpu/kernels/quest_score.h"

#include <cmath>
#include <cstdint>

#include "gpu/kernels/cuda_check.h"
#include "gpu/kernels/dispatch.cuh"
#include "gpu/kernels/scoring_kernels.cuh"
#include "gpu/kernels/top_k_internal.h"

namespace kvrecall::gpu {

size_t QuestScoreWorkspaceBytes(const QuestScoreArgs& args) {
  if (ValidateQuestScoreArgs(args) != nullptr) return 0;
  return kernels::PlanScoreWorkspace(static_cast<int64_t>(args.batch_size) * args.num_q_heads, args.max_pages,
                                     args.scores != nullptr, args.k)
      .Total();
}

cudaError_t QuestScore(const QuestScoreArgs& args, void* workspace, cudaStream_t stream) {
  if (ValidateQuestScoreArgs(args) != nullptr) return cudaErrorInvalidValue;
  kernels::ScoreParams p{};
  p.q = args.q;
  p.rows_a = args.page_max;
  p.rows_b = args.page_min;
  p.seq_stride = args.seq_stride;
  p.head_stride = args.head_stride;
  p.num_q_heads = args.num_q_heads;
  p.num_kv_heads = args.num_kv_heads;
  p.group_size = args.num_q_heads / args.num_kv_heads;
  p.lens = args.num_pages;
  p.num_cols = args.max_pages;
  p.scale = args.sm_scale > 0.0f ? args.sm_scale : 1.0f / std::sqrt(static_cast<float>(args.head_dim));
  auto launch = [&](const kernels::ScoreParams& kp) -> cudaError_t {
    KVR_DISPATCH_KV_DTYPE(args.dtype, T, {
      KVR_DISPATCH_HEAD_DIM(args.head_dim, kHeadDim, {
        KVR_DISPATCH_GROUP(kp.group_size, kGroup, {
          return kernels::LaunchScoreKernel<T, kHeadDim, kGroup, true>(kp, args.batch_size, stream);
        });
      });
    });
    return cudaErrorInvalidValue;
  };
  return kernels::RunScoring(p, args.batch_size, args.scores, args.k, args.top_k_pages, workspace, launch, stream);
}

}  // namespace kvrecall::gpu
