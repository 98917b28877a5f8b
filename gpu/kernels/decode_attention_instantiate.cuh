#pragma once

// Definition of LaunchDecodeAttention<T>: head_dim, math, group and
// dense/sparse dispatch over DecodeAttentionKernel / DecodeAttentionMmaKernel. Included by the per-dtype .cu files only.

#include "gpu/kernels/decode_attention_internal.h"
#include "gpu/kernels/decode_attention_kernels.cuh"
#include "gpu/kernels/decode_attention_mma.cuh"
#include "gpu/kernels/dispatch.cuh"

namespace kvrecall::gpu::kernels {

template <typename T>
cudaError_t LaunchDecodeAttention(const DecodeParams& p, int32_t head_dim, bool dense, DecodeMath math,
                                  cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_chunks), static_cast<unsigned>(p.batch_size * p.num_lists));
  KVR_DISPATCH_HEAD_DIM(head_dim, kHeadDim, {
    if (math == DecodeMath::kMma) {
      if (p.heads_per_list < 1 || p.heads_per_list > MmaShape<kHeadDim>::kGroup) return cudaErrorInvalidValue;
      if (dense) {
        return DecodeMmaKernelHost<T, kHeadDim, true>::Launch(p, grid, stream);
      }
      return DecodeMmaKernelHost<T, kHeadDim, false>::Launch(p, grid, stream);
    }
    KVR_DISPATCH_GROUP(p.heads_per_list, kGroup, {
      if (dense) {
        return DecodeKernelHost<T, kHeadDim, kGroup, true>::Launch(p, grid, stream);
      }
      return DecodeKernelHost<T, kHeadDim, kGroup, false>::Launch(p, grid, stream);
    });
  });
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t GetDecodeKernelInfo(int32_t head_dim, int32_t heads_per_list, bool dense, DecodeMath math,
                                DecodeKernelInfo* info) {
  KVR_DISPATCH_HEAD_DIM(head_dim, kHeadDim, {
    if (math == DecodeMath::kMma) {
      if (dense) {
        return DecodeMmaKernelHost<T, kHeadDim, true>::GetInfo(info);
      }
      return DecodeMmaKernelHost<T, kHeadDim, false>::GetInfo(info);
    }
    KVR_DISPATCH_GROUP(heads_per_list, kGroup, {
      if (dense) {
        return DecodeKernelHost<T, kHeadDim, kGroup, true>::GetInfo(info);
      }
      return DecodeKernelHost<T, kHeadDim, kGroup, false>::GetInfo(info);
    });
  });
  return cudaErrorInvalidValue;
}

}  // namespace kvrecall::gpu::kernels
