#include "gpu/kernels/decode_attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "gpu/kernels/cuda_check.h"
#include "gpu/kernels/decode_attention_internal.h"
#include "gpu/kernels/device_utils.cuh"
#include "gpu/kernels/dispatch.cuh"
#include "gpu/kernels/merge_states.h"
#include "gpu/kernels/top_k_internal.h"

namespace kvrecall::gpu {
namespace {

using kernels::AlignUp256;
using kernels::DecodeParams;
using kernels::DecodeSplit;

// Workspace layout shared by WorkspaceBytes and the launchers.
struct DecodeWorkspace {
  DecodeSplit split;
  bool cluster_merge = false;  // the chunks merge in their cluster: no partial states
  size_t o_bytes = 0;       // partial o: [rows, num_chunks, head_dim] f32
  size_t lse_bytes = 0;     // partial lse: [rows, num_chunks] f32
  size_t scores_bytes = 0;  // dense logits kept in the workspace
  size_t topk_bytes = 0;    // top-k histograms
  size_t Total() const { return o_bytes + lse_bytes + scores_bytes + topk_bytes; }
};

// The planner's view of the kernel on this device.
struct KernelFit {
  int64_t wave_blocks = 0;   // resident blocks x SMs: one wave
  int32_t max_cluster = 1;   // largest launchable cluster
};

DecodeWorkspace PlanWorkspace(int64_t rows, int64_t lists, int32_t tokens, int32_t num_splits, int32_t head_dim,
                              const KernelFit& fit, DecodeMerge merge) {
  const int64_t wave_blocks = fit.wave_blocks;
  DecodeWorkspace w;
  if (merge == DecodeMerge::kCluster) {  // kAuto merges with the kernel (kernel_args.h)
    const DecodeSplit c = kernels::PlanClusterSplit(lists, tokens, num_splits, wave_blocks,
                                                    /*auto_choice=*/false, fit.max_cluster);
    if (c.num_chunks > 0) {
      w.split = c;
      w.cluster_merge = true;
      return w;
    }
  }
  w.split = kernels::PlanDecodeSplit(lists, tokens, num_splits, wave_blocks);
  if (w.split.num_chunks > 1) {
    w.o_bytes = AlignUp256(static_cast<size_t>(rows) * w.split.num_chunks * head_dim * sizeof(float));
    w.lse_bytes = AlignUp256(static_cast<size_t>(rows) * w.split.num_chunks * sizeof(float));
  }
  return w;
}

DecodeWorkspace PlanSparse(const SparseDecodeArgs& a, const KernelFit& fit) {
  const int32_t num_lists = a.lists_per_kv_head ? a.kv.num_kv_heads : a.num_q_heads;
  return PlanWorkspace(static_cast<int64_t>(a.batch_size) * a.num_q_heads,
                       static_cast<int64_t>(a.batch_size) * num_lists, a.max_list_len, a.num_splits, a.kv.head_dim,
                       fit, a.merge);
}

DecodeWorkspace PlanDense(const DenseDecodeArgs& a, const KernelFit& fit) {
  const int64_t rows = static_cast<int64_t>(a.batch_size) * a.num_q_heads;
  DecodeWorkspace w = PlanWorkspace(rows, static_cast<int64_t>(a.batch_size) * a.kv.num_kv_heads, a.max_seq_len,
                                    a.num_splits, a.kv.head_dim, fit, a.merge);
  if (a.top_k > 0) {
    if (a.scores == nullptr) w.scores_bytes = AlignUp256(static_cast<size_t>(rows) * a.max_seq_len * sizeof(float));
    w.topk_bytes = AlignUp256(kernels::TopKRowWorkspaceBytes(rows));
  }
  return w;
}

DecodeParams BaseParams(const PagedKvCache& kv, int32_t batch_size, int32_t num_q_heads, const float* q,
                        float sm_scale) {
  DecodeParams p{};
  p.k = kv.k;
  p.v = kv.v;
  p.page_stride = kv.page_stride;
  p.token_stride = kv.token_stride;
  p.head_stride = kv.head_stride;
  p.page_size = kv.page_size;
  p.num_pages = kv.num_pages;
  p.max_pages_per_seq = kv.max_pages_per_seq;
  p.page_table = kv.page_table;
  p.seq_lens = kv.seq_lens;
  p.q = q;
  p.batch_size = batch_size;
  p.num_q_heads = num_q_heads;
  p.group_size = num_q_heads / kv.num_kv_heads;
  const float scale = sm_scale > 0.0f ? sm_scale : 1.0f / std::sqrt(static_cast<float>(kv.head_dim));
  p.scale_log2 = scale * kernels::kLog2e;
  return p;
}

// One wave of the decode kernel for these sizes on the current device
// (resident blocks per SM x SMs) and its largest cluster.
cudaError_t FitKernel(DType dtype, int32_t head_dim, int32_t heads_per_list, bool dense, DecodeMath math,
                      int32_t num_sms, KernelFit* fit) {
  kernels::DecodeKernelInfo info;
  KVR_DISPATCH_KV_DTYPE(dtype, T, {
    KVR_CUDA_RETURN_IF_ERROR(kernels::GetDecodeKernelInfo<T>(head_dim, heads_per_list, dense, math, &info));
  });
  fit->wave_blocks = static_cast<int64_t>(info.blocks_per_sm) * num_sms;
  fit->max_cluster = info.max_cluster;
  return cudaSuccess;
}

int32_t SparseHeadsPerList(const SparseDecodeArgs& a) {
  return a.lists_per_kv_head ? a.num_q_heads / a.kv.num_kv_heads : 1;
}

int32_t DenseHeadsPerList(const DenseDecodeArgs& a) { return a.num_q_heads / a.kv.num_kv_heads; }

cudaError_t LaunchTyped(DType dtype, const DecodeParams& p, int32_t head_dim, bool dense, DecodeMath math,
                        cudaStream_t stream) {
  KVR_DISPATCH_KV_DTYPE(dtype, T, { return kernels::LaunchDecodeAttention<T>(p, head_dim, dense, math, stream); });
  return cudaErrorInvalidValue;
}

// Runs the kernel into the partial states of `w` (or straight into o/lse
// with one chunk or a cluster merge) and merges them.
cudaError_t RunDecode(DecodeParams p, DType dtype, int32_t head_dim, bool dense, DecodeMath math,
                      const DecodeWorkspace& w, unsigned char* ws, float* o, float* lse, cudaStream_t stream) {
  p.num_chunks = w.split.num_chunks;
  p.chunk_tokens = w.split.chunk_tokens;
  p.cluster_merge = w.cluster_merge;
  const int64_t rows = static_cast<int64_t>(p.batch_size) * p.num_q_heads;
  if (p.num_chunks == 1 || p.cluster_merge) {
    p.o = o;
    p.lse = lse;
    return LaunchTyped(dtype, p, head_dim, dense, math, stream);
  }
  p.o = reinterpret_cast<float*>(ws);
  p.lse = reinterpret_cast<float*>(ws + w.o_bytes);
  KVR_CUDA_RETURN_IF_ERROR(LaunchTyped(dtype, p, head_dim, dense, math, stream));
  MergeStatesArgs m;
  m.o_states = p.o;
  m.lse_states = p.lse;
  m.num_states = p.num_chunks;
  m.num_heads = static_cast<int32_t>(rows);
  m.head_dim = head_dim;
  m.o_state_stride = head_dim;
  m.o_head_stride = static_cast<int64_t>(p.num_chunks) * head_dim;
  m.lse_state_stride = 1;
  m.lse_head_stride = p.num_chunks;
  m.o = o;
  m.out_dtype = DType::kF32;
  m.lse = lse;
  return MergeStates(m, nullptr, stream);
}

// The kernel and split of one call.
struct DecodePlan {
  DecodeMath math = DecodeMath::kFma;
  DecodeWorkspace w;
};

// Resolves DecodeMath::kAuto and plans the split: tensor cores for 5..8 heads
// per list; for fewer heads, tensor cores only when the split merges in a
// cluster with them too (small grids, where each warp's 16-token tiles are
// all in flight at once, against 2 of the 4 batches of 8 tokens of the FMA
// kernel), else CUDA cores. `plan` is PlanSparse or PlanDense.
template <typename Args, typename PlanFn>
cudaError_t PlanDecode(const Args& a, int32_t heads_per_list, bool dense, PlanFn plan, DecodePlan* out) {
  int32_t num_sms = 0;
  KVR_CUDA_RETURN_IF_ERROR(kernels::CurrentDeviceSmCount(&num_sms));
  const DecodeMath first = kernels::ResolveDecodeMath(a.math, heads_per_list);
  KernelFit fit;
  KVR_CUDA_RETURN_IF_ERROR(FitKernel(a.kv.dtype, a.kv.head_dim, heads_per_list, dense, first, num_sms, &fit));
  out->math = first;
  out->w = plan(a, fit);
  if (a.math == DecodeMath::kAuto && first == DecodeMath::kFma && out->w.cluster_merge) {
    KernelFit mma_fit;
    KVR_CUDA_RETURN_IF_ERROR(
        FitKernel(a.kv.dtype, a.kv.head_dim, heads_per_list, dense, DecodeMath::kMma, num_sms, &mma_fit));
    const DecodeWorkspace w = plan(a, mma_fit);
    if (w.cluster_merge) {
      out->math = DecodeMath::kMma;
      out->w = w;
    }
  }
  return cudaSuccess;
}

bool WorkspaceOk(const void* workspace, size_t needed) {
  return needed == 0 || (workspace != nullptr && (reinterpret_cast<uintptr_t>(workspace) & 15u) == 0);
}

}  // namespace

size_t SparseDecodeAttentionWorkspaceBytes(const SparseDecodeArgs& args) {
  if (ValidateSparseDecodeArgs(args) != nullptr) return 0;
  DecodePlan plan;
  if (PlanDecode(args, SparseHeadsPerList(args), /*dense=*/false, PlanSparse, &plan) != cudaSuccess) return 0;
  return plan.w.Total();
}

cudaError_t SparseDecodeAttention(const SparseDecodeArgs& args, void* workspace, cudaStream_t stream) {
  if (ValidateSparseDecodeArgs(args) != nullptr) return cudaErrorInvalidValue;
  DecodePlan plan;
  KVR_CUDA_RETURN_IF_ERROR(PlanDecode(args, SparseHeadsPerList(args), /*dense=*/false, PlanSparse, &plan));
  const DecodeMath math = plan.math;
  const DecodeWorkspace& w = plan.w;
  if (!WorkspaceOk(workspace, w.Total())) return cudaErrorInvalidValue;
  DecodeParams p = BaseParams(args.kv, args.batch_size, args.num_q_heads, args.q, args.sm_scale);
  p.heads_per_list = SparseHeadsPerList(args);
  p.num_lists = args.lists_per_kv_head ? args.kv.num_kv_heads : args.num_q_heads;
  p.positions = args.positions;
  p.list_lens = args.list_lens;
  p.max_list_len = args.max_list_len;
  p.num_invalid = args.num_invalid;
  return RunDecode(p, args.kv.dtype, args.kv.head_dim, /*dense=*/false, math, w,
                   static_cast<unsigned char*>(workspace), args.o, args.lse, stream);
}

size_t DenseDecodeAttentionWorkspaceBytes(const DenseDecodeArgs& args) {
  if (ValidateDenseDecodeArgs(args) != nullptr) return 0;
  DecodePlan plan;
  if (PlanDecode(args, DenseHeadsPerList(args), /*dense=*/true, PlanDense, &plan) != cudaSuccess) return 0;
  return plan.w.Total();
}

cudaError_t DenseDecodeAttention(const DenseDecodeArgs& args, void* workspace, cudaStream_t stream) {
  if (ValidateDenseDecodeArgs(args) != nullptr) return cudaErrorInvalidValue;
  DecodePlan plan;
  KVR_CUDA_RETURN_IF_ERROR(PlanDecode(args, DenseHeadsPerList(args), /*dense=*/true, PlanDense, &plan));
  const DecodeMath math = plan.math;
  const DecodeWorkspace& w = plan.w;
  if (!WorkspaceOk(workspace, w.Total())) return cudaErrorInvalidValue;
  int32_t num_sms = 0;
  KVR_CUDA_RETURN_IF_ERROR(kernels::CurrentDeviceSmCount(&num_sms));
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  DecodeParams p = BaseParams(args.kv, args.batch_size, args.num_q_heads, args.q, args.sm_scale);
  p.heads_per_list = p.group_size;
  p.num_lists = args.kv.num_kv_heads;
  p.max_seq_len = args.max_seq_len;
  p.scores = args.scores;
  p.scores_stride = args.scores_stride != 0 ? args.scores_stride : args.max_seq_len;
  if (args.top_k > 0 && args.scores == nullptr) {
    p.scores = reinterpret_cast<float*>(ws + w.o_bytes + w.lse_bytes);
    p.scores_stride = args.max_seq_len;
  }
  p.num_invalid = args.num_invalid;
  KVR_CUDA_RETURN_IF_ERROR(
      RunDecode(p, args.kv.dtype, args.kv.head_dim, /*dense=*/true, math, w, ws, args.o, args.lse, stream));
  if (args.top_k == 0) return cudaSuccess;
  TopKArgs t;
  t.scores = p.scores;
  t.num_rows = args.batch_size * args.num_q_heads;
  t.num_cols = args.max_seq_len;
  t.row_stride = p.scores_stride;
  t.k = args.top_k;
  t.indices = args.top_k_positions;
  t.values = nullptr;
  uint32_t* topk_ws = reinterpret_cast<uint32_t*>(ws + w.o_bytes + w.lse_bytes + w.scores_bytes);
  return kernels::LaunchTopKPasses(t, topk_ws, /*zero_workspace=*/true, /*hist0_done=*/false, num_sms, stream);
}

}  // namespace kvrecall::gpu
