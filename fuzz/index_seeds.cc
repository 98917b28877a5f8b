// Writes the seed corpus of index_load_fuzz: one small index of every kind
// (random f32 keys, 64 x 16) in the target's structured form (kind byte, dim,
// size, payload), into the directory given as the only argument.
//
//   build-fuzz/fuzz/index_seeds fuzz/corpus/index_load
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "index/index_factory.h"
#include "index/index_format.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: index_seeds <dir>\n");
    return 2;
  }
  constexpr int64_t kKeys = 64;
  constexpr int32_t kDim = 16;
  std::mt19937 rng(7);
  std::normal_distribution<float> dist;
  std::vector<float> keys(kKeys * kDim), queries(kKeys * kDim);
  for (float& x : keys) x = dist(rng);
  for (float& x : queries) x = dist(rng);
  int written = 0;
  for (const std::string& kind : kvrecall::index::IndexKinds()) {
    kvrecall::index::BuildOptions options;
    options.num_threads = 1;
    auto built = kvrecall::index::BuildIndex(
        kind, kvrecall::index::VectorView::F32(keys.data(), kKeys, kDim),
        kvrecall::index::VectorView::F32(queries.data(), kKeys, kDim), options);
    if (!built.ok()) {
      std::fprintf(stderr, "%s: %s\n", kind.c_str(), std::string(built.status().message()).c_str());
      continue;
    }
    auto bytes = (*built)->Serialize();
    if (!bytes.ok()) continue;
    auto decoded = kvrecall::index::DecodeIndex(*bytes);
    if (!decoded.ok()) continue;
    const auto kinds = kvrecall::index::IndexKinds();
    std::string seed(1, 0);
    for (size_t i = 0; i < kinds.size(); ++i) {
      if (kinds[i] == kind) seed[0] = static_cast<char>(i);
    }
    seed.append(reinterpret_cast<const char*>(&decoded->first.dim), 4);
    seed.append(reinterpret_cast<const char*>(&decoded->first.size), 8);
    seed.append(decoded->second.data(), decoded->second.size());
    std::ofstream(std::string(argv[1]) + "/" + kind, std::ios::binary) << seed;
    ++written;
  }
  std::printf("wrote %d seeds\n", written);
  return written > 0 ? 0 : 1;
}
