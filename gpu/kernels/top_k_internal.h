#pragma once

// Internal interface of the radix top-k, shared with the fused scoring
// launchers (Loki computes the pass-0 histogram while it writes its scores).
// Host-safe; not part of the public API.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu::kernels {

constexpr int kRadixBins = 2048;
// Per row: 3 digit histograms, then the output counters (greater, equal).
constexpr int kTopKRowWords = 3 * kRadixBins + 32;
constexpr int kTopKCounterOffset = 3 * kRadixBins;

inline size_t TopKRowWorkspaceBytes(int64_t num_rows) {
  return static_cast<size_t>(num_rows) * kTopKRowWords * sizeof(uint32_t);
}

// Runs the passes of the radix top-k on validated `args` with `ws` =
// TopKRowWorkspaceBytes(num_rows) bytes. With zero_workspace it first
// zeroes ws; with hist0_done the pass-0 histograms are already in ws (and ws
// was zeroed before they were accumulated).
cudaError_t LaunchTopKPasses(const TopKArgs& args, uint32_t* ws, bool zero_workspace, bool hist0_done,
                             int32_t num_sms, cudaStream_t stream);

// Multiprocessor count of the current device.
cudaError_t CurrentDeviceSmCount(int32_t* num_sms);

inline size_t AlignUp256(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace kvrecall::gpu::kernels
