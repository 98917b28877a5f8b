// The CUDA backend: device memory and the gpu/kernels launchers. Linked
// into the worker when kvrecall is built with CUDA (cuda_backend_none.cc
// otherwise).

#include <cuda_runtime.h>

#include <memory>

#include "absl/strings/str_cat.h"
#include "gpu/kernels/decode_attention.h"
#include "gpu/kernels/loki_score.h"
#include "gpu/kernels/merge_states.h"
#include "gpu/kernels/quest_score.h"
#include "gpu/kernels/step_kernels.h"
#include "gpu/kernels/top_k.h"
#include "gpu/worker/backend.h"

namespace kvrecall::worker {
namespace {

// One converter for CUDA errors (STYLE: one per foreign error type).
absl::Status FromCuda(cudaError_t e, absl::string_view what, const char* invalid = nullptr) {
  if (e == cudaSuccess) return absl::OkStatus();
  if (e == cudaErrorInvalidValue && invalid != nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", invalid));
  }
  if (e == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
  }
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

cudaStream_t S(void* stream) { return static_cast<cudaStream_t>(stream); }

class CudaBackend final : public Backend {
 public:
  absl::string_view name() const override { return "cuda"; }
  bool is_device() const override { return true; }

  absl::StatusOr<void*> Allocate(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes == 0 ? 256 : bytes);
    if (e != cudaSuccess) return FromCuda(e, absl::StrCat("cudaMalloc of ", bytes, " bytes"));
    return p;
  }
  void Free(void* p) override {
    if (p != nullptr) cudaFree(p);
  }
  absl::Status CopyToBackend(void* dst, const void* src, size_t bytes, void* stream) override {
    if (bytes == 0) return absl::OkStatus();
    return FromCuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, S(stream)), "copy to device");
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes, void* stream) override {
    if (bytes == 0) return absl::OkStatus();
    return FromCuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, S(stream)), "copy to host");
  }
  absl::Status Copy(void* dst, const void* src, size_t bytes, void* stream) override {
    if (bytes == 0) return absl::OkStatus();
    return FromCuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, S(stream)), "device copy");
  }
  absl::Status Memset(void* dst, int value, size_t bytes, void* stream) override {
    if (bytes == 0) return absl::OkStatus();
    return FromCuda(cudaMemsetAsync(dst, value, bytes, S(stream)), "memset");
  }
  absl::Status Synchronize(void* stream) override {
    return FromCuda(cudaStreamSynchronize(S(stream)), "stream synchronize");
  }
  absl::StatusOr<void*> AllocateHost(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t e = cudaMallocHost(&p, bytes == 0 ? 256 : bytes);
    if (e != cudaSuccess) return FromCuda(e, absl::StrCat("cudaMallocHost of ", bytes, " bytes"));
    return p;
  }
  void FreeHost(void* p) override {
    if (p != nullptr) cudaFreeHost(p);
  }

  size_t SparseDecodeWorkspaceBytes(const gpu::SparseDecodeArgs& a) override {
    return gpu::SparseDecodeAttentionWorkspaceBytes(a);
  }
  size_t DenseDecodeWorkspaceBytes(const gpu::DenseDecodeArgs& a) override {
    return gpu::DenseDecodeAttentionWorkspaceBytes(a);
  }
  size_t TopKWorkspaceBytes(const gpu::TopKArgs& a) override { return gpu::TopKWorkspaceBytes(a); }
  size_t LokiScoreWorkspaceBytes(const gpu::LokiScoreArgs& a) override {
    return gpu::LokiScoreWorkspaceBytes(a);
  }
  size_t QuestScoreWorkspaceBytes(const gpu::QuestScoreArgs& a) override {
    return gpu::QuestScoreWorkspaceBytes(a);
  }

  absl::Status SparseDecodeAttention(const gpu::SparseDecodeArgs& a, void* ws, void* s) override {
    return FromCuda(gpu::SparseDecodeAttention(a, ws, S(s)), "SparseDecodeAttention",
                    gpu::ValidateSparseDecodeArgs(a));
  }
  absl::Status DenseDecodeAttention(const gpu::DenseDecodeArgs& a, void* ws, void* s) override {
    return FromCuda(gpu::DenseDecodeAttention(a, ws, S(s)), "DenseDecodeAttention",
                    gpu::ValidateDenseDecodeArgs(a));
  }
  absl::Status MergeStates(const gpu::MergeStatesArgs& a, void* s) override {
    return FromCuda(gpu::MergeStates(a, nullptr, S(s)), "MergeStates", gpu::ValidateMergeStatesArgs(a));
  }
  absl::Status TopK(const gpu::TopKArgs& a, void* ws, void* s) override {
    return FromCuda(gpu::TopK(a, ws, S(s)), "TopK", gpu::ValidateTopKArgs(a));
  }
  absl::Status LokiScore(const gpu::LokiScoreArgs& a, void* ws, void* s) override {
    return FromCuda(gpu::LokiScore(a, ws, S(s)), "LokiScore", gpu::ValidateLokiScoreArgs(a));
  }
  absl::Status QuestScore(const gpu::QuestScoreArgs& a, void* ws, void* s) override {
    return FromCuda(gpu::QuestScore(a, ws, S(s)), "QuestScore", gpu::ValidateQuestScoreArgs(a));
  }
  absl::Status AdvanceSeqLens(const gpu::AdvanceSeqLensArgs& a, void* s) override {
    return FromCuda(gpu::AdvanceSeqLens(a, S(s)), "AdvanceSeqLens", gpu::ValidateAdvanceSeqLensArgs(a));
  }
  absl::Status AppendKv(const gpu::AppendKvArgs& a, void* s) override {
    return FromCuda(gpu::AppendKv(a, S(s)), "AppendKv", gpu::ValidateAppendKvArgs(a));
  }
  absl::Status ProjectRows(const gpu::ProjectRowsArgs& a, void* s) override {
    return FromCuda(gpu::ProjectRows(a, S(s)), "ProjectRows", gpu::ValidateProjectRowsArgs(a));
  }
  absl::Status ComputePageBounds(const gpu::PageBoundsArgs& a, void* s) override {
    return FromCuda(gpu::ComputePageBounds(a, S(s)), "ComputePageBounds", gpu::ValidatePageBoundsArgs(a));
  }
  absl::Status MaskScores(const gpu::MaskScoresArgs& a, void* s) override {
    return FromCuda(gpu::MaskScores(a, S(s)), "MaskScores", gpu::ValidateMaskScoresArgs(a));
  }
  absl::Status ComposeLists(const gpu::ComposeListsArgs& a, void* s) override {
    return FromCuda(gpu::ComposeLists(a, S(s)), "ComposeLists", gpu::ValidateComposeListsArgs(a));
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    return absl::UnavailableError(absl::StrCat(
        "no CUDA device: ", e != cudaSuccess ? cudaGetErrorString(e) : "the device count is 0"));
  }
  return std::unique_ptr<Backend>(std::make_unique<CudaBackend>());
}

}  // namespace kvrecall::worker
