#pragma once

// KVR_CUDA_RETURN_IF_ERROR(expr): evaluates a cudaError_t expression and
// returns it from the enclosing function when it is not cudaSuccess.
// Host-safe (no device code).

#include <cuda_runtime.h>

#define KVR_CUDA_RETURN_IF_ERROR(expr)        \
  do {                                        \
    const cudaError_t kvr_cuda_err_ = (expr); \
    if (kvr_cuda_err_ != cudaSuccess) {       \
      return kvr_cuda_err_;                   \
    }                                         \
  } while (0)
