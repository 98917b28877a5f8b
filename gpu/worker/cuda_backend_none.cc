// CreateCudaBackend for builds without CUDA (the link-time choice of
// gpu/worker/CMakeLists.txt; cuda_backend.cc is the real one).

#include "gpu/worker/backend.h"

namespace kvrecall::worker {

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend() {
  return absl::UnavailableError("kvrecall was built without CUDA: only the cpu backend exists");
}

}  // namespace kvrecall::worker
