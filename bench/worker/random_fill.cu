#include "bench/worker/random_fill.h"

#include <cuda_bf16.h>

#include <cstring>

namespace kvrecall::bench {
namespace {

__global__ void FillBf16Kernel(uint16_t* data, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const __nv_bfloat16 v = __float2bfloat16(scale * RandomFillValue(i, seed));
    data[i] = *reinterpret_cast<const uint16_t*>(&v);
  }
}

__global__ void FillF32Kernel(float* data, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    data[i] = scale * RandomFillValue(i, seed);
  }
}

}  // namespace

cudaError_t FillRandomBf16(uint16_t* data, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  FillBf16Kernel<<<4096, 256, 0, stream>>>(data, n, seed, scale);
  return cudaGetLastError();
}

cudaError_t FillRandomF32(float* data, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  FillF32Kernel<<<4096, 256, 0, stream>>>(data, n, seed, scale);
  return cudaGetLastError();
}

void FillRandomBf16Host(uint16_t* data, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float f = scale * RandomFillValue(static_cast<uint64_t>(i), seed);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    data[i] = static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);  // round to nearest even
  }
}

void FillRandomF32Host(float* data, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = 0; i < n; ++i) data[i] = scale * RandomFillValue(static_cast<uint64_t>(i), seed);
}

}  // namespace kvrecall::bench
