#include "bench/worker/random_fill.h"

#include <cuda_bf16.h>

namespace kvrecall::bench {
namespace {

__device__ __forceinline__ uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

__device__ __forceinline__ float Normalish(uint64_t i, uint64_t seed) {
  const uint64_t a = Mix(i * 2 + seed * 0x9e3779b97f4a7c15ULL);
  const uint64_t b = Mix(i * 2 + 1 + seed * 0x9e3779b97f4a7c15ULL);
  const float u = ((a & 0xffff) + ((a >> 16) & 0xffff) + (b & 0xffff) + ((b >> 16) & 0xffff)) / 65536.0f;
  return (u - 2.0f) * 1.7320508f;  // mean 0, variance 1
}

__global__ void FillBf16Kernel(uint16_t* data, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const __nv_bfloat16 v = __float2bfloat16(scale * Normalish(i, seed));
    data[i] = *reinterpret_cast<const uint16_t*>(&v);
  }
}

__global__ void FillF32Kernel(float* data, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    data[i] = scale * Normalish(i, seed);
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

}  // namespace kvrecall::bench
