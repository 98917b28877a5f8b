#pragma once

// Device-side random fill for the worker benchmark (random_fill.cu): a
// counter-based hash of each element's index, so buffers of many GiB are
// filled in milliseconds and reproducibly.

#include <cuda_runtime.h>

#include <cstdint>

namespace kvrecall::bench {

// Fills `n` bf16 values (uint16 bit patterns) with N(0, 1)-like values
// (Irwin-Hall of 4 uniforms) times `scale`, from `seed`.
cudaError_t FillRandomBf16(uint16_t* data, int64_t n, uint64_t seed, float scale, cudaStream_t stream);

// Fills `n` f32 values likewise.
cudaError_t FillRandomF32(float* data, int64_t n, uint64_t seed, float scale, cudaStream_t stream);

}  // namespace kvrecall::bench
