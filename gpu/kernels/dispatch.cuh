#pragma once

// The one place where runtime sizes become template constants (STYLE.md
// rule 8). Each macro runs its body with the named compile-time constant or
// type in scope, or returns cudaErrorInvalidValue from the enclosing
// launcher for an unsupported value. Only these combinations are
// instantiated: dtype {bf16, f16} x head_dim {64, 128} x group {1, 2, 4, 8}
// (group sizes 3, 5, 6, 7 run the next larger template with the extra heads
// masked) x Loki rank {16, 32, 64}.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "gpu/kernels/kernel_args.h"

#define KVR_DISPATCH_KV_DTYPE(dtype, T, ...)                          \
  switch (dtype) {                                                    \
    case ::kvrecall::gpu::DType::kBf16: {                             \
      using T = __nv_bfloat16;                                        \
      __VA_ARGS__                                                     \
    } break;                                                          \
    case ::kvrecall::gpu::DType::kF16: {                              \
      using T = __half;                                               \
      __VA_ARGS__                                                     \
    } break;                                                          \
    default:                                                          \
      return cudaErrorInvalidValue;                                   \
  }

#define KVR_DISPATCH_OUT_DTYPE(dtype, T, ...)                         \
  switch (dtype) {                                                    \
    case ::kvrecall::gpu::DType::kF32: {                              \
      using T = float;                                                \
      __VA_ARGS__                                                     \
    } break;                                                          \
    case ::kvrecall::gpu::DType::kBf16: {                             \
      using T = __nv_bfloat16;                                        \
      __VA_ARGS__                                                     \
    } break;                                                          \
    case ::kvrecall::gpu::DType::kF16: {                              \
      using T = __half;                                               \
      __VA_ARGS__                                                     \
    } break;                                                          \
    default:                                                          \
      return cudaErrorInvalidValue;                                   \
  }

#define KVR_DISPATCH_HEAD_DIM(head_dim, kHeadDim, ...)                \
  switch (head_dim) {                                                 \
    case 64: {                                                        \
      constexpr int kHeadDim = 64;                                    \
      __VA_ARGS__                                                     \
    } break;                                                          \
    case 128: {                                                       \
      constexpr int kHeadDim = 128;                                   \
      __VA_ARGS__                                                     \
    } break;                                                          \
    default:                                                          \
      return cudaErrorInvalidValue;                                   \
  }

// Heads handled per thread block: the group size rounded up to 1, 2, 4 or 8.
#define KVR_DISPATCH_GROUP(group, kGroup, ...)                        \
  if ((group) == 1) {                                                 \
    constexpr int kGroup = 1;                                         \
    __VA_ARGS__                                                       \
  } else if ((group) == 2) {                                          \
    constexpr int kGroup = 2;                                         \
    __VA_ARGS__                                                       \
  } else if ((group) >= 3 && (group) <= 4) {                          \
    constexpr int kGroup = 4;                                         \
    __VA_ARGS__                                                       \
  } else if ((group) >= 5 && (group) <= 8) {                          \
    constexpr int kGroup = 8;                                         \
    __VA_ARGS__                                                       \
  } else {                                                            \
    return cudaErrorInvalidValue;                                     \
  }

#define KVR_DISPATCH_RANK(rank, kRank, ...)                           \
  switch (rank) {                                                     \
    case 16: {                                                        \
      constexpr int kRank = 16;                                       \
      __VA_ARGS__                                                     \
    } break;                                                          \
    case 32: {                                                        \
      constexpr int kRank = 32;                                       \
      __VA_ARGS__                                                     \
    } break;                                                          \
    case 64: {                                                        \
      constexpr int kRank = 64;                                       \
      __VA_ARGS__                                                     \
    } break;                                                          \
    default:                                                          \
      return cudaErrorInvalidValue;                                   \
  }
