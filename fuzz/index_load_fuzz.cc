// libFuzzer target: every index payload loader (index/index_factory.h
// LoadIndex dispatches on the header's kind: flat, roar, loki, quest,
// inverted, faiss_hnsw, faiss_ivf) on untrusted bytes.
//
// Index files carry a checksum of their payload, which random mutations
// would almost never keep valid, so the input is structured to reach the
// payload decoders: byte 0 picks the kind, bytes 1..4 the dim (i32), 5..12
// the size (i64), the rest is the payload; the target wraps it in a valid
// header (index::EncodeIndex) and loads it. An input starting with the index
// magic is loaded as it is. A loaded index must answer a search.
//
// FAISS sizes vectors by counts in the payload: a single allocation above
// 4 MiB (the seeds need well under 1 MiB) throws std::bad_alloc here, which the
// loader must report as an error (throwing_new.cc).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz/throwing_new.h"
#include "index/index_factory.h"
#include "index/index_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace idx = kvrecall::index;
  const absl::string_view in(reinterpret_cast<const char*>(data), size);
  std::string bytes;
  if (in.size() >= 8 && std::memcmp(in.data(), idx::kIndexMagic, 8) == 0) {
    bytes = std::string(in);
  } else {
    if (in.size() < 13) return 0;
    static const std::vector<std::string> kinds = idx::IndexKinds();
    idx::IndexHeader header;
    header.kind = kinds[static_cast<uint8_t>(in[0]) % kinds.size()];
    std::memcpy(&header.dim, in.data() + 1, 4);
    std::memcpy(&header.size, in.data() + 5, 8);
    bytes = idx::EncodeIndex(header, in.substr(13));
  }
  const kvrecall::fuzz::NewLimit limit(size_t{4} << 20);
  auto index = idx::LoadIndex(bytes);
  if (index.ok() && (*index)->size() > 0 && (*index)->size() < (1 << 16)) {
    const int32_t d = (*index)->dim();
    if (d > 0 && d <= 1024) {
      std::vector<float> q(static_cast<size_t>(d), 0.5f);
      idx::SearchParams params;
      params.num_threads = 1;
      (void)(*index)->Search(idx::VectorView::F32(q.data(), 1, d), 1, params).ok();
    }
  }
  return 0;
}
