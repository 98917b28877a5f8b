// DecodeAttentionKernel instantiations for bf16 K/V (one file per dtype keeps
// the compile parallel).
#include <cuda_bf16.h>

#include "gpu/kernels/decode_attention_instantiate.cuh"

namespace kvrecall::gpu::kernels {
template cudaError_t LaunchDecodeAttention<__nv_bfloat16>(const DecodeParams&, int32_t, bool, cudaStream_t);
}  // namespace kvrecall::gpu::kernels
