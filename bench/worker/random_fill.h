#pragma once

// Random fill for the worker benchmark (random_fill.cu): a counter-based hash
// of each element's index, so buffers of many GiB are filled in milliseconds
// and reproducibly, with the same values on the GPU and on the CPU.

#include <cuda_runtime.h>

#include <cstdint>

namespace kvrecall::bench {

// The 64-bit finalizer of MurmurHash3.
__host__ __device__ inline uint64_t RandomFillMix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

// Element i of the fill of `seed`: N(0, 1)-like (Irwin-Hall of 4 uniforms,
// mean 0, variance 1).
__host__ __device__ inline float RandomFillValue(uint64_t i, uint64_t seed) {
  const uint64_t a = RandomFillMix(i * 2 + seed * 0x9e3779b97f4a7c15ULL);
  const uint64_t b = RandomFillMix(i * 2 + 1 + seed * 0x9e3779b97f4a7c15ULL);
  const float u = ((a & 0xffff) + ((a >> 16) & 0xffff) + (b & 0xffff) + ((b >> 16) & 0xffff)) / 65536.0f;
  return (u - 2.0f) * 1.7320508f;
}

// Fills `n` bf16 values (uint16 bit patterns) with N(0, 1)-like values
// (Irwin-Hall of 4 uniforms) times `scale`, from `seed`.
cudaError_t FillRandomBf16(uint16_t* data, int64_t n, uint64_t seed, float scale, cudaStream_t stream);

// Fills `n` f32 values likewise.
cudaError_t FillRandomF32(float* data, int64_t n, uint64_t seed, float scale, cudaStream_t stream);

// The same fills of host memory (the CPU backend).
void FillRandomBf16Host(uint16_t* data, int64_t n, uint64_t seed, float scale);
void FillRandomF32Host(float* data, int64_t n, uint64_t seed, float scale);

}  // namespace kvrecall::bench
