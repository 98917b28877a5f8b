#include "gpu/kernels/merge_states.h"

#include "gpu/kernels/cuda_check.h"
#include "gpu/kernels/dispatch.cuh"
#include "gpu/kernels/top_k_internal.h"
#include "gpu/kernels/merge_states_kernels.cuh"

namespace kvrecall::gpu {

size_t MergeStatesWorkspaceBytes(const MergeStatesArgs& /*args*/) { return 0; }

cudaError_t MergeStates(const MergeStatesArgs& args, void* /*workspace*/, cudaStream_t stream) {
  if (ValidateMergeStatesArgs(args) != nullptr) return cudaErrorInvalidValue;
  int32_t num_sms = 0;
  KVR_CUDA_RETURN_IF_ERROR(kernels::CurrentDeviceSmCount(&num_sms));
  const dim3 grid(static_cast<unsigned>(args.num_heads));  // one block per head
  KVR_DISPATCH_HEAD_DIM(args.head_dim, kHeadDim, {
    KVR_DISPATCH_OUT_DTYPE(args.out_dtype, OutT, {
      // 1024 threads per head only when the heads alone cannot fill the GPU.
      if (args.num_states >= kernels::kMergeManyStates && args.num_heads < 4 * num_sms) {
        kernels::MergeStatesKernel<kHeadDim, kernels::kMergeThreadsMany, OutT>
            <<<grid, kernels::kMergeThreadsMany, 0, stream>>>(args);
      } else {
        kernels::MergeStatesKernel<kHeadDim, kernels::kMergeThreads, OutT><<<grid, kernels::kMergeThreads, 0, stream>>>(args);
      }
      return cudaGetLastError();
    });
  });
  return cudaErrorInvalidValue;
}

}  // namespace kvrecall::gpu
