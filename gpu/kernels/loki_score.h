#pragma once

// Loki scoring (methods.md §2): approximate logits from the first `rank`
// PCA components of rotated keys, and optionally the top-k positions, with
// the first radix-select pass fused into the scoring pass (the scores are
// histogrammed while they are written, saving one read of them).
// Host-safe header.

#include <cuda_runtime.h>

#include <cstddef>

#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu {

// Thread-safe: the launcher keeps no state but a per-device record of a
// kernel attribute it sets on its first launch on a device: make that first
// launch outside CUDA stream capture; later launches capture into graphs.

// Device workspace bytes LokiScore needs (scores when args.scores is null,
// top-k histograms when k > 0; 0 otherwise or for invalid args).
size_t LokiScoreWorkspaceBytes(const LokiScoreArgs& args);

// cudaErrorInvalidValue (nothing launched) when ValidateLokiScoreArgs fails,
// or a workspace is needed and is null or not 16-byte aligned. Asynchronous
// on `stream`; never allocates or synchronizes.
cudaError_t LokiScore(const LokiScoreArgs& args, void* workspace, cudaStream_t stream);

}  // namespace kvrecall::gpu
