// DecodeAttentionKernel instantiations for bf16 K/V (one file per dtype keeps
// the compile parallel).
#include <cuda_bf16.h>

#include "gpu/kernels/decode_attention_instantiate.cuh"

namespace kvrecall::gpu::kernels {
template cudaError_t LaunchDecodeAttention<__nv_bfloat16>(const DecodeParams&, int32_t, bool, DecodeMath, cudaStream_t);
template cudaError_t GetDecodeKernelInfo<__nv_bfloat16>(int32_t, int32_t, bool, DecodeMath, DecodeKernelInfo*);
}  // namespace kvrecall::gpu::kernels
