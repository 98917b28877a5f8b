#pragma once

// Top-k selection per row by radix select (3 digit passes of 11, 11 and 10
// bits over the order-preserving key of each f32, then one output pass),
// each pass spread over many blocks per row. Host-safe header.

#include <cuda_runtime.h>

#include <cstddef>

#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu {

// Thread-safe: the launcher keeps no state; it captures into CUDA graphs.

// Device workspace bytes TopK needs for `args` (about 24.6 KB per row).
size_t TopKWorkspaceBytes(const TopKArgs& args);

// Writes the indices (and values) of the args.k largest scores of each row,
// unordered; NaN ranks above +inf; ties at the k-th value are broken
// arbitrarily. cudaErrorInvalidValue (nothing launched) when
// ValidateTopKArgs fails or workspace is null or not 16-byte aligned.
// Asynchronous on `stream` (a memset and four kernels); never allocates or
// synchronizes.
cudaError_t TopK(const TopKArgs& args, void* workspace, cudaStream_t stream);

}  // namespace kvrecall::gpu
