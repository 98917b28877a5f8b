#pragma once

// Merge of partial attention states (o, lse) per head: the exact,
// max-subtracted combination of methods.md §0.2. Host-safe header.

#include <cuda_runtime.h>

#include <cstddef>

#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu {

// Thread-safe: the launcher keeps no state; it captures into CUDA graphs.

// Device workspace MergeStates needs (none).
size_t MergeStatesWorkspaceBytes(const MergeStatesArgs& args);

// Combines args.num_states partial states of each head into args.o / args.lse.
// cudaErrorInvalidValue (nothing launched) when ValidateMergeStatesArgs fails.
// Asynchronous on `stream`; never allocates or synchronizes.
cudaError_t MergeStates(const MergeStatesArgs& args, void* workspace, cudaStream_t stream);

}  // namespace kvrecall::gpu
