#include "gpu/kernels/top_k.h"

#include <cstdint>

#include "gpu/kernels/cuda_check.h"
#include "gpu/kernels/top_k_internal.h"
#include "gpu/kernels/top_k_kernels.cuh"

namespace kvrecall::gpu {
namespace kernels {

cudaError_t CurrentDeviceSmCount(int32_t* num_sms) {
  int device = 0;
  KVR_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  int count = 0;
  KVR_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  *num_sms = count > 0 ? count : 1;
  return cudaSuccess;
}

cudaError_t LaunchTopKPasses(const TopKArgs& args, uint32_t* ws, bool zero_workspace, bool hist0_done,
                             int32_t num_sms, cudaStream_t stream) {
  const int64_t rows = args.num_rows;
  const int64_t n = args.num_cols;
  // Enough blocks to cover the SMs about four times, slices of >= 1024 columns.
  const int64_t max_blocks_per_row = (n + kTopKColumnAlign - 1) / kTopKColumnAlign;
  int64_t blocks_per_row = (static_cast<int64_t>(num_sms) * 4 + rows - 1) / rows;
  if (blocks_per_row > max_blocks_per_row) blocks_per_row = max_blocks_per_row;
  if (blocks_per_row < 1) blocks_per_row = 1;
  int64_t cols_per_block = (n + blocks_per_row - 1) / blocks_per_row;
  cols_per_block = (cols_per_block + kTopKColumnAlign - 1) / kTopKColumnAlign * kTopKColumnAlign;
  blocks_per_row = (n + cols_per_block - 1) / cols_per_block;

  TopKParams p;
  p.scores = args.scores;
  p.row_stride = args.row_stride != 0 ? args.row_stride : args.num_cols;
  p.num_cols = args.num_cols;
  p.k = args.k;
  p.cols_per_block = static_cast<int32_t>(cols_per_block);
  p.vec4 = (p.row_stride % 4 == 0 && (reinterpret_cast<uintptr_t>(args.scores) & 15u) == 0) ? 1 : 0;
  p.ws = ws;
  p.indices = args.indices;
  p.values = args.values;

  if (zero_workspace) {
    KVR_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws, 0, TopKRowWorkspaceBytes(rows), stream));
  }
  const dim3 grid(static_cast<unsigned>(blocks_per_row), static_cast<unsigned>(rows));
  if (!hist0_done) {
    RadixHistogramKernel<0><<<grid, kTopKThreads, 0, stream>>>(p);
    KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  RadixHistogramKernel<1><<<grid, kTopKThreads, 0, stream>>>(p);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  RadixHistogramKernel<2><<<grid, kTopKThreads, 0, stream>>>(p);
  KVR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  RadixOutputKernel<<<grid, kTopKThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kernels

size_t TopKWorkspaceBytes(const TopKArgs& args) {
  return args.num_rows > 0 ? kernels::TopKRowWorkspaceBytes(args.num_rows) : 0;
}

cudaError_t TopK(const TopKArgs& args, void* workspace, cudaStream_t stream) {
  if (ValidateTopKArgs(args) != nullptr) return cudaErrorInvalidValue;
  if (workspace == nullptr || (reinterpret_cast<uintptr_t>(workspace) & 15u) != 0) return cudaErrorInvalidValue;
  int32_t num_sms = 0;
  KVR_CUDA_RETURN_IF_ERROR(kernels::CurrentDeviceSmCount(&num_sms));
  return kernels::LaunchTopKPasses(args, static_cast<uint32_t*>(workspace), /*zero_workspace=*/true,
                                   /*hist0_done=*/false, num_sms, stream);
}

}  // namespace kvrecall::gpu
