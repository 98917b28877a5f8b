#include "gpu/kernels/step_kernels.h"

#include <algorithm>
#include <cstdint>

#include "gpu/kernels/dispatch.cuh"
#include "gpu/kernels/step_kernels.cuh"

namespace kvrecall::gpu {
namespace {

// Blocks of kStepThreads for `work` items, at least 1, at most kStepMaxBlocks.
unsigned StepBlocks(int64_t work) {
  const int64_t blocks = (work + kernels::kStepThreads - 1) / kernels::kStepThreads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kernels::kStepMaxBlocks));
}

}  // namespace

cudaError_t AdvanceSeqLens(const AdvanceSeqLensArgs& args, cudaStream_t stream) {
  if (ValidateAdvanceSeqLensArgs(args) != nullptr) return cudaErrorInvalidValue;
  kernels::AdvanceSeqLensKernel<<<StepBlocks(args.batch_size), kernels::kStepThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t AppendKv(const AppendKvArgs& args, cudaStream_t stream) {
  if (ValidateAppendKvArgs(args) != nullptr) return cudaErrorInvalidValue;
  const int64_t chunks =
      static_cast<int64_t>(args.batch_size) * args.num_tokens * args.kv.num_kv_heads * (args.kv.head_dim / 8);
  KVR_DISPATCH_KV_DTYPE(args.kv.dtype, T, {
    KVR_DISPATCH_HEAD_DIM(args.kv.head_dim, kHeadDim, {
      kernels::AppendKvKernel<T, kHeadDim><<<StepBlocks(chunks), kernels::kStepThreads, 0, stream>>>(args);
      return cudaGetLastError();
    });
  });
  return cudaErrorInvalidValue;
}

cudaError_t ProjectRows(const ProjectRowsArgs& args, cudaStream_t stream) {
  if (ValidateProjectRowsArgs(args) != nullptr) return cudaErrorInvalidValue;
  const int64_t tiles = (static_cast<int64_t>(args.num_tokens) + kernels::kProjectTileTokens - 1) /
                        kernels::kProjectTileTokens * args.num_heads * args.batch_size;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tiles, int64_t{1} << 20));
  KVR_DISPATCH_OUT_DTYPE(args.x_dtype, XT, {
    KVR_DISPATCH_OUT_DTYPE(args.y_dtype, YT, {
      KVR_DISPATCH_HEAD_DIM(args.head_dim, kHeadDim, {
        kernels::ProjectRowsKernel<XT, YT, kHeadDim><<<blocks, kernels::kStepThreads, 0, stream>>>(args);
        return cudaGetLastError();
      });
    });
  });
  return cudaErrorInvalidValue;
}

cudaError_t ComputePageBounds(const PageBoundsArgs& args, cudaStream_t stream) {
  if (ValidatePageBoundsArgs(args) != nullptr) return cudaErrorInvalidValue;
  // Page slots per (KV head, sequence): every page, or the last `last_pages`.
  const int32_t slots = args.last_pages == 0 ? args.max_pages : std::min(args.last_pages, args.max_pages);
  const dim3 grid(static_cast<unsigned>(slots), static_cast<unsigned>(args.kv.num_kv_heads),
                  static_cast<unsigned>(args.batch_size));
  KVR_DISPATCH_KV_DTYPE(args.kv.dtype, T, {
    KVR_DISPATCH_HEAD_DIM(args.kv.head_dim, kHeadDim, {
      kernels::PageBoundsKernel<T, kHeadDim><<<grid, kernels::kStepThreads, 0, stream>>>(args);
      return cudaGetLastError();
    });
  });
  return cudaErrorInvalidValue;
}

cudaError_t MaskScores(const MaskScoresArgs& args, cudaStream_t stream) {
  if (ValidateMaskScoresArgs(args) != nullptr) return cudaErrorInvalidValue;
  const int64_t total = static_cast<int64_t>(args.num_rows) * args.num_cols;
  kernels::MaskScoresKernel<<<StepBlocks(total), kernels::kStepThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t ComposeLists(const ComposeListsArgs& args, cudaStream_t stream) {
  if (ValidateComposeListsArgs(args) != nullptr) return cudaErrorInvalidValue;
  const int64_t lists = static_cast<int64_t>(args.batch_size) * args.num_lists;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(lists, int64_t{1} << 20));
  kernels::ComposeListsKernel<<<blocks, kernels::kStepThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace kvrecall::gpu
