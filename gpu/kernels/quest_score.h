#pragma once

// Quest page scoring (methods.md §6.1): per page the upper bound
// Σ_j max(q_j * max_j, q_j * min_j) of its logits, and optionally the
// top-k pages per (sequence, query head). Host-safe header.

#include <cuda_runtime.h>

#include <cstddef>

#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu {

// Thread-safe: the launcher keeps no state but a per-device record of a
// kernel attribute it sets on its first launch on a device: make that first
// launch outside CUDA stream capture; later launches capture into graphs.

// Device workspace bytes QuestScore needs (scores when args.scores is null,
// top-k histograms when k > 0; 0 otherwise or for invalid args).
size_t QuestScoreWorkspaceBytes(const QuestScoreArgs& args);

// cudaErrorInvalidValue (nothing launched) when ValidateQuestScoreArgs
// fails, or a workspace is needed and is null or not 16-byte aligned.
// Asynchronous on `stream`; never allocates or synchronizes.
cudaError_t QuestScore(const QuestScoreArgs& args, void* workspace, cudaStream_t stream);

}  // namespace kvrecall::gpu
