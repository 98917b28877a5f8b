#pragma once

// Backend: where a DecodeSession keeps its tensors and runs its kernels. The
// session's logic (roles, lists, merges, transfers) is written once against
// this interface; two implementations exist:
//   - the CUDA backend (CreateCudaBackend): device memory and the
//     gpu/kernels launchers on a cudaStream_t;
//   - the CPU backend (CreateCpuBackend): host memory and the float64
//     references of gpu/reference, so the whole executor runs, and is
//     tested, on machines without a GPU.
// "Backend memory" below means device memory for CUDA and host memory for the
// CPU backend. Streams are passed as `void*` (a cudaStream_t for CUDA,
// ignored by the CPU backend). Every kernel call validates its arguments
// with the kernels' Validate*Args() and returns INVALID_ARGUMENT naming the
// problem, or INTERNAL with the CUDA error.
//
// Thread-compatible: one session (one thread) per backend at a time.

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "gpu/kernels/kernel_args.h"

namespace kvrecall::worker {

class Backend {
 public:
  virtual ~Backend() = default;

  // "cpu" or "cuda".
  virtual absl::string_view name() const = 0;
  // True when backend memory is device memory (not host-addressable).
  virtual bool is_device() const = 0;

  // Backend memory, 256-byte aligned. RESOURCE_EXHAUSTED when none is left.
  virtual absl::StatusOr<void*> Allocate(size_t bytes) = 0;
  virtual void Free(void* p) = 0;
  // Copies between host and backend memory (asynchronous on `stream` for
  // CUDA: the host buffer must stay valid until the stream passes it; host
  // sources are staged by the caller in pinned memory when it matters).
  virtual absl::Status CopyToBackend(void* dst, const void* host_src, size_t bytes,
                                     void* stream) = 0;
  virtual absl::Status CopyToHost(void* host_dst, const void* src, size_t bytes,
                                  void* stream) = 0;
  virtual absl::Status Copy(void* dst, const void* src, size_t bytes, void* stream) = 0;
  virtual absl::Status Memset(void* dst, int value, size_t bytes, void* stream) = 0;
  // Waits for everything queued on `stream`.
  virtual absl::Status Synchronize(void* stream) = 0;
  // Host memory suited to transfers (pinned for CUDA; plain for CPU).
  virtual absl::StatusOr<void*> AllocateHost(size_t bytes) = 0;
  virtual void FreeHost(void* p) = 0;

  // Workspace bytes the kernels need (0 on the CPU backend).
  virtual size_t SparseDecodeWorkspaceBytes(const gpu::SparseDecodeArgs& args) = 0;
  virtual size_t DenseDecodeWorkspaceBytes(const gpu::DenseDecodeArgs& args) = 0;
  virtual size_t TopKWorkspaceBytes(const gpu::TopKArgs& args) = 0;
  virtual size_t LokiScoreWorkspaceBytes(const gpu::LokiScoreArgs& args) = 0;
  virtual size_t QuestScoreWorkspaceBytes(const gpu::QuestScoreArgs& args) = 0;

  // The kernels (gpu/kernels/kernel_args.h has their contracts).
  virtual absl::Status SparseDecodeAttention(const gpu::SparseDecodeArgs& args, void* workspace,
                                             void* stream) = 0;
  virtual absl::Status DenseDecodeAttention(const gpu::DenseDecodeArgs& args, void* workspace,
                                            void* stream) = 0;
  virtual absl::Status MergeStates(const gpu::MergeStatesArgs& args, void* stream) = 0;
  virtual absl::Status TopK(const gpu::TopKArgs& args, void* workspace, void* stream) = 0;
  virtual absl::Status LokiScore(const gpu::LokiScoreArgs& args, void* workspace,
                                 void* stream) = 0;
  virtual absl::Status QuestScore(const gpu::QuestScoreArgs& args, void* workspace,
                                  void* stream) = 0;
  virtual absl::Status AdvanceSeqLens(const gpu::AdvanceSeqLensArgs& args, void* stream) = 0;
  virtual absl::Status AppendKv(const gpu::AppendKvArgs& args, void* stream) = 0;
  virtual absl::Status ProjectRows(const gpu::ProjectRowsArgs& args, void* stream) = 0;
  virtual absl::Status ComputePageBounds(const gpu::PageBoundsArgs& args, void* stream) = 0;
  virtual absl::Status MaskScores(const gpu::MaskScoresArgs& args, void* stream) = 0;
  virtual absl::Status ComposeLists(const gpu::ComposeListsArgs& args, void* stream) = 0;
};

// The CPU backend (always available).
std::unique_ptr<Backend> CreateCpuBackend();

// The CUDA backend on the current device. UNAVAILABLE when kvrecall was
// built without CUDA or no device is present.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend();

// "cpu" or "cuda".
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(absl::string_view name);

}  // namespace kvrecall::worker
