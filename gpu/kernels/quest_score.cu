#include "gpu/kernels/quest_score.h"

#include <cmath>
#include <cstdint>

#include "gpu/kernels/cuda_check.h"
#include "gpu/kernels/dispatch.cuh"
#include "gpu/kernels/scoring_kernels.cuh"
#include "gpu/kernels/top_k_internal.h"

namespace kvrecall::gpu {
namespace {

struct QuestWorkspace {
  size_t scores_bytes = 0;
  size_t topk_bytes = 0;
  size_t Total() const { return scores_bytes + topk_bytes; }
};

QuestWorkspace PlanQuest(const QuestScoreArgs& a) {
  QuestWorkspace w;
  const int64_t rows = static_cast<int64_t>(a.batch_size) * a.num_q_heads;
  if (a.k > 0) {
    if (a.scores == nullptr) w.scores_bytes = kernels::AlignUp256(static_cast<size_t>(rows) * a.max_pages * sizeof(float));
    w.topk_bytes = kernels::AlignUp256(kernels::TopKRowWorkspaceBytes(rows));
  }
  return w;
}

}  // namespace

size_t QuestScoreWorkspaceBytes(const QuestScoreArgs& args) {
  if (ValidateQuestScoreArgs(args) != nullptr) return 0;
  return PlanQuest(args).Total();
}

cudaError_t QuestScore(const QuestScoreArgs& args, void* workspace, cudaStream_t stream) {
  if (ValidateQuestScoreArgs(args) != nullptr) return cudaErrorInvalidValue;
  const QuestWorkspace w = PlanQuest(args);
  if (w.Total() > 0 && (workspace == nullptr || (reinterpret_cast<uintptr_t>(workspace) & 15u) != 0)) {
    return cudaErrorInvalidValue;
  }
  int32_t num_sms = 0;
  KVR_CUDA_RETURN_IF_ERROR(kernels::CurrentDeviceSmCount(&num_sms));
  unsigned char* ws = static_cast<unsigned char*>(workspace);

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
  p.chunk_cols =
      kernels::PlanScoreChunk(static_cast<int64_t>(args.batch_size) * args.num_kv_heads, args.max_pages, num_sms);
  p.scores = args.scores != nullptr ? static_cast<void*>(args.scores) : static_cast<void*>(ws);
  p.topk_ws = args.k > 0 ? reinterpret_cast<uint32_t*>(ws + w.scores_bytes) : nullptr;
  if (p.topk_ws != nullptr) {
    KVR_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(p.topk_ws, 0, kernels::TopKRowWorkspaceBytes(static_cast<int64_t>(args.batch_size) * args.num_q_heads), stream));
  }
  KVR_DISPATCH_KV_DTYPE(args.dtype, T, {
    KVR_DISPATCH_HEAD_DIM(args.head_dim, kHeadDim, {
      KVR_DISPATCH_GROUP(p.group_size, kGroup, {
        KVR_CUDA_RETURN_IF_ERROR((kernels::LaunchScoreKernel<T, kHeadDim, kGroup, true>(p, args.batch_size, stream)));
      });
    });
  });
  if (args.k == 0) return cudaSuccess;
  TopKArgs t;
  t.scores = static_cast<const float*>(p.scores);
  t.num_rows = args.batch_size * args.num_q_heads;
  t.num_cols = args.max_pages;
  t.row_stride = args.max_pages;
  t.k = args.k;
  t.indices = args.top_k_pages;
  t.values = nullptr;
  return kernels::LaunchTopKPasses(t, p.topk_ws, /*zero_workspace=*/false, /*hist0_done=*/true, num_sms, stream);
}

}  // namespace kvrecall::gpu
