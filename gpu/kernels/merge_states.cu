#include "gpu/kernels/merge_states.h"

#include "gpu/kernels/dispatch.cuh"
#include "gpu/kernels/merge_states_kernels.cuh"

namespace kvrecall::gpu {

size_t MergeStatesWorkspaceBytes(const MergeStatesArgs& /*args*/) { return 0; }

cudaError_t MergeStates(const MergeStatesArgs& args, void* /*workspace*/, cudaStream_t stream) {
  if (ValidateMergeStatesArgs(args) != nullptr) return cudaErrorInvalidValue;
  constexpr int kHeadsPerBlock = kernels::kMergeThreads / 32;
  const dim3 grid(static_cast<unsigned>((args.num_heads + kHeadsPerBlock - 1) / kHeadsPerBlock));
  KVR_DISPATCH_HEAD_DIM(args.head_dim, kHeadDim, {
    KVR_DISPATCH_OUT_DTYPE(args.out_dtype, OutT, {
      kernels::MergeStatesKernel<kHeadDim, OutT><<<grid, kernels::kMergeThreads, 0, stream>>>(args);
      return cudaGetLastError();
    });
  });
  return cudaErrorInvalidValue;
}

}  // namespace kvrecall::gpu
