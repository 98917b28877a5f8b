// libFuzzer target: every index payload loader (index/index_factory.h
// LoadIndex dispatches on the header's kind: flat, roar, loki, quest,
// inverted, faiss_hnsw, faiss_ivf) on untrusted bytes. A loaded index must
// answer a search without crashing.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "index/index_factory.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto index = kvrecall::index::LoadIndex(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  if (index.ok() && (*index)->size() > 0 && (*index)->size() < (1 << 16)) {
    const int32_t d = (*index)->dim();
    if (d > 0 && d <= 1024) {
      std::vector<float> q(static_cast<size_t>(d), 0.5f);
      kvrecall::index::SearchParams params;
      params.num_threads = 1;
      (void)(*index)->Search(kvrecall::index::VectorView::F32(q.data(), 1, d), 1, params).ok();
    }
  }
  return 0;
}
