// The CPU backend: host memory and the float64 references of gpu/reference.

#include <cstdlib>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "gpu/reference/reference.h"
#include "gpu/worker/backend.h"

namespace kvrecall::worker {
namespace {

// The reference returns false for arguments the kernel would reject; the
// launcher's validation names the problem.
absl::Status Checked(bool ok, const char* kernel, const char* problem) {
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(kernel, ": ", problem != nullptr ? problem : "arguments rejected"));
}

class CpuBackend final : public Backend {
 public:
  absl::string_view name() const override { return "cpu"; }
  bool is_device() const override { return false; }

  absl::StatusOr<void*> Allocate(size_t bytes) override {
    void* p = std::aligned_alloc(256, RoundUp(bytes));
    if (p == nullptr) return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", bytes, " bytes"));
    return p;
  }
  void Free(void* p) override { std::free(p); }
  absl::Status CopyToBackend(void* dst, const void* src, size_t bytes, void*) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes, void*) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status Copy(void* dst, const void* src, size_t bytes, void*) override {
    if (bytes > 0) std::memmove(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status Memset(void* dst, int value, size_t bytes, void*) override {
    if (bytes > 0) std::memset(dst, value, bytes);
    return absl::OkStatus();
  }
  absl::Status Synchronize(void*) override { return absl::OkStatus(); }
  absl::StatusOr<void*> AllocateHost(size_t bytes) override { return Allocate(bytes); }
  void FreeHost(void* p) override { Free(p); }

  size_t SparseDecodeWorkspaceBytes(const gpu::SparseDecodeArgs&) override { return 0; }
  size_t DenseDecodeWorkspaceBytes(const gpu::DenseDecodeArgs&) override { return 0; }
  size_t TopKWorkspaceBytes(const gpu::TopKArgs&) override { return 0; }
  size_t LokiScoreWorkspaceBytes(const gpu::LokiScoreArgs&) override { return 0; }
  size_t QuestScoreWorkspaceBytes(const gpu::QuestScoreArgs&) override { return 0; }

  absl::Status SparseDecodeAttention(const gpu::SparseDecodeArgs& a, void*, void*) override {
    return Checked(gpu::reference::SparseDecodeAttention(a), "SparseDecodeAttention",
                   gpu::ValidateSparseDecodeArgs(a));
  }
  absl::Status DenseDecodeAttention(const gpu::DenseDecodeArgs& a, void*, void*) override {
    return Checked(gpu::reference::DenseDecodeAttention(a), "DenseDecodeAttention",
                   gpu::ValidateDenseDecodeArgs(a));
  }
  absl::Status MergeStates(const gpu::MergeStatesArgs& a, void*) override {
    return Checked(gpu::reference::MergeStates(a), "MergeStates", gpu::ValidateMergeStatesArgs(a));
  }
  absl::Status TopK(const gpu::TopKArgs& a, void*, void*) override {
    return Checked(gpu::reference::TopK(a), "TopK", gpu::ValidateTopKArgs(a));
  }
  absl::Status LokiScore(const gpu::LokiScoreArgs& a, void*, void*) override {
    return Checked(gpu::reference::LokiScore(a), "LokiScore", gpu::ValidateLokiScoreArgs(a));
  }
  absl::Status QuestScore(const gpu::QuestScoreArgs& a, void*, void*) override {
    return Checked(gpu::reference::QuestScore(a), "QuestScore", gpu::ValidateQuestScoreArgs(a));
  }
  absl::Status AdvanceSeqLens(const gpu::AdvanceSeqLensArgs& a, void*) override {
    return Checked(gpu::reference::AdvanceSeqLens(a), "AdvanceSeqLens",
                   gpu::ValidateAdvanceSeqLensArgs(a));
  }
  absl::Status AppendKv(const gpu::AppendKvArgs& a, void*) override {
    return Checked(gpu::reference::AppendKv(a), "AppendKv", gpu::ValidateAppendKvArgs(a));
  }
  absl::Status ProjectRows(const gpu::ProjectRowsArgs& a, void*) override {
    return Checked(gpu::reference::ProjectRows(a), "ProjectRows", gpu::ValidateProjectRowsArgs(a));
  }
  absl::Status ComputePageBounds(const gpu::PageBoundsArgs& a, void*) override {
    return Checked(gpu::reference::ComputePageBounds(a), "ComputePageBounds",
                   gpu::ValidatePageBoundsArgs(a));
  }
  absl::Status MaskScores(const gpu::MaskScoresArgs& a, void*) override {
    return Checked(gpu::reference::MaskScores(a), "MaskScores", gpu::ValidateMaskScoresArgs(a));
  }
  absl::Status ComposeLists(const gpu::ComposeListsArgs& a, void*) override {
    return Checked(gpu::reference::ComposeLists(a), "ComposeLists",
                   gpu::ValidateComposeListsArgs(a));
  }

 private:
  static size_t RoundUp(size_t bytes) { return bytes == 0 ? 256 : (bytes + 255) / 256 * 256; }
};

}  // namespace

std::unique_ptr<Backend> CreateCpuBackend() { return std::make_unique<CpuBackend>(); }

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(absl::string_view name) {
  if (name == "cpu") return CreateCpuBackend();
  if (name == "cuda") return CreateCudaBackend();
  return absl::InvalidArgumentError(absl::StrCat("unknown backend \"", name, "\" (cpu or cuda)"));
}

}  // namespace kvrecall::worker
