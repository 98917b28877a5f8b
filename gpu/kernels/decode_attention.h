#pragma once

// Decode attention launchers over a paged KV cache (gpu/kernels/kernel_args.h
// has the argument structs and their contracts):
//   - SparseDecodeAttention: attention over a list of positions per
//     (sequence, KV head) or (sequence, query head), returning o and lse;
//   - DenseDecodeAttention: attention over all positions that also writes the
//     logits and optionally the top-k positions (TidalDecode's selection layer).
// Long lists are split across thread blocks (flash-decoding) and the partial
// states merged exactly, by MergeStates or inside a thread-block cluster
// (DecodeMerge); q·k and p·v run on CUDA cores or tensor cores (DecodeMath).
// Host-safe header.

#include <cuda_runtime.h>

#include <cstddef>

#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu {

// Thread-safe: the launchers keep no state but per-device caches of kernel
// attributes and occupancy. The first call on a device (WorkspaceBytes or the
// launcher) sets a kernel attribute and queries occupancy: make it outside
// CUDA stream capture; later calls, and the launches themselves, capture.

// Device workspace bytes SparseDecodeAttention needs for `args` on the
// current device (0 when every list fits one block or its chunks merge in a
// thread-block cluster, see DecodeMerge). 0 for invalid args.
size_t SparseDecodeAttentionWorkspaceBytes(const SparseDecodeArgs& args);

// cudaErrorInvalidValue (nothing launched) when ValidateSparseDecodeArgs
// fails, or a workspace is needed and `workspace` is null or not 16-byte
// aligned. Asynchronous on `stream`; never allocates or synchronizes.
cudaError_t SparseDecodeAttention(const SparseDecodeArgs& args, void* workspace, cudaStream_t stream);

// Device workspace bytes DenseDecodeAttention needs (partial states, the
// logits when top_k > 0 and scores is null, the top-k histograms).
size_t DenseDecodeAttentionWorkspaceBytes(const DenseDecodeArgs& args);

// As SparseDecodeAttention, for DenseDecodeArgs.
cudaError_t DenseDecodeAttention(const DenseDecodeArgs& args, void* workspace, cudaStream_t stream);

}  // namespace kvrecall::gpu
