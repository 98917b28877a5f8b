// libFuzzer target: the PutSpans wire-format parser (service/rpc/put_stream.h)
// fed a stream of untrusted messages (the input split at 0xFF 0x00 pairs),
// over a real store with a registered model.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>

#include "service/rpc/put_stream.h"
#include "service/store/tiered_store.h"

namespace {

kvrecall::store::TieredStore* Store() {
  static kvrecall::store::TieredStore* store = [] {
    kvrecall::store::TieredStoreOptions o;
    o.data_dir = (std::filesystem::temp_directory_path() / "kvrecall-put-stream-fuzz").string();
    std::filesystem::remove_all(o.data_dir);
    o.memory_capacity_bytes = 64 << 20;
    o.disk_capacity_bytes = 0;
    o.rocksdb_capacity_bytes = 0;
    auto s = kvrecall::store::TieredStore::Open(o);
    if (!s.ok()) abort();
    kvrecall::store::ModelGeometry g;
    g.model_id = "m";
    g.num_layers = 1;
    g.num_q_heads = 1;
    g.num_kv_heads = 1;
    g.head_dim = 4;
    g.dtype = kvrecall::DType::kF32;
    g.block_tokens = 8;
    if (!(*s)->RegisterModel(g).ok()) abort();
    return s->release();
  }();
  return store;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvrecall::rpc::InflightLimiter limiter(1 << 20, 0);
  kvrecall::rpc::PutStream stream(Store(), "fuzz", 1 << 20, /*require_token_ids=*/false,
                                  &limiter);
  const absl::string_view in(reinterpret_cast<const char*>(data), size);
  size_t start = 0;
  while (start <= in.size()) {
    size_t end = in.find(absl::string_view("\xff\x00", 2), start);
    if (end == absl::string_view::npos) end = in.size();
    bool complete = false;
    if (!stream.ConsumeBytes(in.substr(start, end - start), &complete).ok()) break;
    if (complete && !stream.StoreComplete().ok()) break;
    start = end + 2;
  }
  (void)stream.End().ok();
  return 0;
}
