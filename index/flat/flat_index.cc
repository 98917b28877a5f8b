#include "index/flat/flat_index.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/distance.h"
#include "index/flat/streaming_topk.h"
#include "index/tile_scoring.h"

namespace kvrecall::index {
namespace {

// Keys scored per pass of a query group: 64 tiles, 1024 keys (256 KiB of f16
// keys at d = 128), so a chunk stays in L2 while every query group of a work
// unit streams through it.
constexpr int64_t kChunkTiles = 64;
constexpr int64_t kChunkKeys = kChunkTiles * kTileKeys;
// docs/formats/flat.md
constexpr uint32_t kFlatPayloadVersion = 1;
// Queries sharing each key load.
constexpr int32_t kQueryGroup = 4;
// Key ranges smaller than this are not split over threads.
constexpr int64_t kMinTilesPerRange = 64;

}  // namespace

absl::StatusOr<FlatOptions> FlatOptions::FromParams(const ParamMap& params) {
  KVR_RETURN_IF_ERROR(params.CheckKnown("flat build", {"storage"}));
  FlatOptions options;
  const std::string storage = params.GetString("storage", "native");
  if (storage == "f32") {
    options.store_f32 = true;
  } else if (storage != "native") {
    return absl::InvalidArgumentError(
        absl::StrCat("flat: storage=", storage, " is not one of native, f32"));
  }
  return options;
}

ParamMap FlatOptions::ToParams() const {
  ParamMap params;
  params.Set("storage", store_f32 ? "f32" : "native");
  return params;
}

FlatIndex::FlatIndex(int32_t dim, DType key_dtype, const FlatOptions& options)
    : dim_(dim),
      key_dtype_(key_dtype),
      tile_dtype_(options.store_f32 ? DType::kF32 : key_dtype),
      build_params_(options.ToParams()) {}

size_t FlatIndex::TileBytes() const {
  return static_cast<size_t>(dim_) * kTileKeys * DTypeSize(tile_dtype_);
}

absl::StatusOr<std::unique_ptr<FlatIndex>> FlatIndex::Build(const VectorView& keys,
                                                            const FlatOptions& options) {
  KVR_RETURN_IF_ERROR(ValidateVectors("keys", keys, -1));
  std::unique_ptr<FlatIndex> index(new FlatIndex(keys.dim, keys.dtype, options));
  KVR_RETURN_IF_ERROR(index->AppendRows(keys));
  return index;
}

absl::Status FlatIndex::Add(const VectorView& keys) {
  KVR_RETURN_IF_ERROR(ValidateAddedKeys("flat", keys, dim_, key_dtype_));
  return AppendRows(keys);
}

absl::Status FlatIndex::AppendRows(const VectorView& keys) {
  if (keys.rows == 0) return absl::OkStatus();
  const int64_t new_size = size_ + keys.rows;
  const int64_t new_tiles = (new_size + kTileKeys - 1) / kTileKeys;
  tiles_.resize(new_tiles * TileBytes(), 0);
  PackIntoTiles(keys.data, keys.dtype, keys.rows, dim_, keys.row_stride(), size_, tiles_.data(),
                tile_dtype_);
  size_ = new_size;
  return absl::OkStatus();
}

absl::StatusOr<SearchResult> FlatIndex::Search(const VectorView& queries, int32_t k,
                                               const SearchParams& params) const {
  KVR_RETURN_IF_ERROR(ValidateVectors("queries", queries, dim_));
  KVR_RETURN_IF_ERROR(ValidateK(k));
  KVR_RETURN_IF_ERROR(params.knobs.CheckKnown("flat search", {}));
  KVR_ASSIGN_OR_RETURN(ExcludeSet exclude, ExcludeSet::Create(params.exclude, size_));
  const std::vector<float> q = VectorsToF32(queries);
  return SearchF32(q.data(), queries.rows, k, exclude, params.num_threads);
}

namespace {

// How a search splits into work units: key ranges (tile ranges) x query
// blocks. Many queries: split them (each thread scans every key for its
// block, no merge). Few queries: split the keys and merge the per-range
// top-k.
struct WorkPlan {
  WorkPlan(int64_t num_tiles, int64_t num_queries, int threads) : num_tiles(num_tiles) {
    const int64_t num_groups = (num_queries + kQueryGroup - 1) / kQueryGroup;
    const bool split_queries = num_groups >= 8 * threads;
    num_ranges = split_queries ? 1 : std::clamp<int64_t>(num_tiles / kMinTilesPerRange, 1, threads);
    num_blocks = std::clamp<int64_t>((threads + num_ranges - 1) / num_ranges, 1, num_groups);
    groups_per_block = (num_groups + num_blocks - 1) / num_blocks;
    tiles_per_range = (num_tiles + num_ranges - 1) / num_ranges;
  }
  int64_t num_units() const { return num_ranges * num_blocks; }

  int64_t num_tiles;
  int64_t num_ranges;
  int64_t num_blocks;
  int64_t groups_per_block;
  int64_t tiles_per_range;
};

// Pushes the `m` scores `s` of keys key_begin.. into `heap`, skipping those
// `valid` marks 0 (all valid when null). With `prime`, first raises the
// heap's threshold to a lower bound of the chunk's k-th largest score, which
// spares most pushes.
void PushScores(const float* s, int64_t m, int64_t key_begin, const uint8_t* valid, bool prime,
                int32_t k, int32_t* candidates, StreamingTopK* heap) {
  if (prime) heap->RaiseThreshold(KthLargestLowerBound(s, m, k));
  // Blocks of 256 so that the threshold tightens as the heap fills.
  for (int64_t b = 0; b < m; b += 256) {
    const int64_t count =
        CollectAtLeast(s + b, std::min<int64_t>(256, m - b), heap->threshold(), candidates);
    for (int64_t c = 0; c < count; ++c) {
      const int64_t i = b + candidates[c];
      if (valid == nullptr || valid[i]) heap->Push(s[i], key_begin + i);
    }
  }
}

// Merges the ranges' top-k of every query (heaps[range][query]) into `result`.
void MergeRanges(std::vector<std::vector<StreamingTopK>>& heaps, int32_t k,
                 SearchResult* result) {
  std::vector<int64_t> ids(k);
  std::vector<float> sc(k);
  for (int64_t qi = 0; qi < result->num_queries; ++qi) {
    int64_t* out_ids = result->ids.data() + qi * k;
    float* out_scores = result->scores.data() + qi * k;
    if (heaps.size() == 1) {
      heaps[0][qi].Drain(out_ids, out_scores);
      continue;
    }
    StreamingTopK merged(k);
    for (auto& range : heaps) {
      range[qi].Drain(ids.data(), sc.data());
      for (int32_t j = 0; j < k && ids[j] >= 0; ++j) merged.Push(sc[j], ids[j]);
    }
    merged.Drain(out_ids, out_scores);
  }
}

}  // namespace

int64_t FlatIndex::SearchUnit(const float* queries, int32_t k, const ExcludeSet& exclude,
                              int64_t tile_begin, int64_t tile_end, int64_t q_begin,
                              int64_t q_end, std::vector<StreamingTopK>* heaps) const {
  std::vector<float> scores(kQueryGroup * kChunkKeys);
  std::vector<uint8_t> valid(kChunkKeys);
  std::vector<int32_t> candidates(256);
  std::vector<uint8_t> heap_primed(q_end - q_begin, 0);
  const size_t tile_bytes = TileBytes();
  int64_t keys_scored = 0;
  for (int64_t t0 = tile_begin; t0 < tile_end; t0 += kChunkTiles) {
    const int64_t nt = std::min(kChunkTiles, tile_end - t0);
    const int64_t key_begin = t0 * kTileKeys;
    const int64_t key_end = std::min(size_, key_begin + nt * kTileKeys);
    const int64_t excluded = exclude.CountExcluded(key_begin, key_end);
    if (excluded == key_end - key_begin) continue;
    const bool masked = excluded > 0;
    if (masked) {
      for (int64_t p = key_begin; p < key_end; ++p) {
        valid[p - key_begin] = exclude.Contains(p) ? 0 : 1;
      }
    }
    keys_scored += key_end - key_begin;
    const char* tiles = tiles_.data() + t0 * tile_bytes;
    const int64_t m = key_end - key_begin;
    for (int64_t q0 = q_begin; q0 < q_end; q0 += kQueryGroup) {
      const int32_t nq = static_cast<int32_t>(std::min<int64_t>(kQueryGroup, q_end - q0));
      ScoreTiles(queries + q0 * dim_, nq, tiles, tile_dtype_, dim_, nt, scores.data(), kChunkKeys);
      for (int32_t qi = 0; qi < nq; ++qi) {
        // The first unmasked chunk of a query primes its heap.
        uint8_t& primed = heap_primed[q0 + qi - q_begin];
        const bool prime = !masked && m >= 4 * k && !primed;
        if (prime) primed = 1;
        PushScores(scores.data() + qi * kChunkKeys, m, key_begin, masked ? valid.data() : nullptr,
                   prime, k, candidates.data(), &(*heaps)[q0 + qi]);
      }
    }
  }
  return keys_scored * (q_end - q_begin);
}

SearchResult FlatIndex::SearchF32(const float* queries, int64_t num_queries, int32_t k,
                                  const ExcludeSet& exclude, int num_threads) const {
  SearchResult result = SearchResult::Padded(num_queries, k);
  if (num_queries == 0) return result;
  const int threads = ResolveThreads(num_threads);
  const WorkPlan plan(NumTiles(), num_queries, threads);
  // heaps[range][query]: the top-k of one key range.
  std::vector<std::vector<StreamingTopK>> heaps(plan.num_ranges);
  for (auto& h : heaps) h.assign(num_queries, StreamingTopK(k));
  std::vector<int64_t> scanned(plan.num_units(), 0);
  auto run_unit = [&](int64_t unit) {
    const int64_t range = unit % plan.num_ranges, block = unit / plan.num_ranges;
    const int64_t tile_begin = range * plan.tiles_per_range;
    const int64_t tile_end = std::min(plan.num_tiles, tile_begin + plan.tiles_per_range);
    const int64_t q_begin = block * plan.groups_per_block * kQueryGroup;
    const int64_t q_end = std::min(num_queries, q_begin + plan.groups_per_block * kQueryGroup);
    if (tile_begin >= tile_end || q_begin >= q_end) return;
    scanned[unit] =
        SearchUnit(queries, k, exclude, tile_begin, tile_end, q_begin, q_end, &heaps[range]);
  };
  if (plan.num_units() == 1) {
    run_unit(0);
  } else {
    ThreadPool::Default()->ParallelFor(
        plan.num_units(), 1, [&](int64_t b, int64_t e) {
          for (int64_t u = b; u < e; ++u) run_unit(u);
        },
        threads);
  }
  MergeRanges(heaps, k, &result);
  for (int64_t s : scanned) result.stats.keys_scanned += s;
  result.stats.exact_scores = result.stats.keys_scanned;
  return result;
}

int64_t FlatIndex::IndexBytes() const {
  // Tile padding of the last tile; the tiles themselves are the keys.
  return static_cast<int64_t>(NumTiles() * kTileKeys - size_) * dim_ *
         static_cast<int64_t>(DTypeSize(tile_dtype_));
}

int64_t FlatIndex::KeyBytes() const {
  return size_ * dim_ * static_cast<int64_t>(DTypeSize(tile_dtype_));
}

absl::StatusOr<std::string> FlatIndex::Serialize() const {
  // Payload (docs/formats/flat.md): version, then the keys as dense rows
  // [size, dim] in the keys' own dtype.
  const size_t elem = DTypeSize(key_dtype_);
  std::string payload(sizeof(uint32_t) + static_cast<size_t>(size_) * dim_ * elem, '\0');
  const uint32_t version = kFlatPayloadVersion;
  std::memcpy(payload.data(), &version, sizeof(version));
  std::vector<char> row(static_cast<size_t>(dim_) * DTypeSize(tile_dtype_));
  for (int64_t i = 0; i < size_; ++i) {
    char* out = payload.data() + sizeof(uint32_t) + i * dim_ * elem;
    if (tile_dtype_ == key_dtype_) {
      UnpackFromTiles(tiles_.data(), tile_dtype_, dim_, i, out);
    } else {  // f32 tiles of f16/bf16 keys: converting back is exact
      UnpackFromTiles(tiles_.data(), tile_dtype_, dim_, i, row.data());
      ConvertFromFloat(reinterpret_cast<const float*>(row.data()), dim_, key_dtype_, out);
    }
  }
  return EncodeIndex(IndexHeader{std::string("flat"), dim_, size_, key_dtype_, build_params_}, payload);
}

absl::StatusOr<std::unique_ptr<FlatIndex>> FlatIndex::Load(const IndexHeader& header,
                                                           absl::string_view payload) {
  if (header.kind != "flat") return absl::InvalidArgumentError("not a flat index");
  if (header.dim <= 0 || header.size < 0) return absl::DataLossError("flat: bad dim or size");
  auto options = FlatOptions::FromParams(header.build_params);
  if (!options.ok()) return absl::DataLossError(options.status().message());
  ByteReader r(payload);
  KVR_ASSIGN_OR_RETURN(uint32_t version, r.Get<uint32_t>());
  if (version != kFlatPayloadVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("flat: payload version ", version, " is not supported"));
  }
  // Rows counted by division: a size x row product could wrap to the bytes present.
  const size_t row_bytes = static_cast<size_t>(header.dim) * DTypeSize(header.key_dtype);
  if (row_bytes == 0 || r.remaining() % row_bytes != 0 ||
      r.remaining() / row_bytes != static_cast<size_t>(header.size)) {
    return absl::DataLossError(absl::StrCat("flat: payload has ", r.remaining(),
                                            " key bytes, not the header's ", header.size,
                                            " keys of ", row_bytes, " bytes"));
  }
  std::unique_ptr<FlatIndex> index(new FlatIndex(header.dim, header.key_dtype, *options));
  VectorView keys{payload.data() + sizeof(uint32_t), header.size, header.dim, header.key_dtype,
                  0};
  KVR_RETURN_IF_ERROR(index->AppendRows(keys));
  return index;
}

}  // namespace kvrecall::index
