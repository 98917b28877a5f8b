#pragma once

// Register-blocked inner products of several f32 queries against keys stored
// in transposed tiles of 16 keys (the layout of FlatIndex). Within a tile,
// element j of key l (0 <= l < 16) is at offset j * 16 + l, so one vector
// load fetches element j of 16 keys and a query element is broadcast against
// it; up to 4 queries share every key load.
//
// The result of every (query, key) pair is bit-identical to DotRow() of
// index/distance.h on the same CPU: the kernels keep DotRow's per-lane
// accumulation chains and its horizontal-sum tree, only transposed. So the
// flat index, the rerank step of every other kind and the ground truth of the
// benchmarks agree to the last bit, and "exactly the flat result" is a
// testable statement. All functions are thread-safe (pure).

#include <cstdint>

#include "common/types.h"

namespace kvrecall::index {

inline constexpr int32_t kTileKeys = 16;

// The path of the tile kernels. ChooseTilePath follows ScoreKernelName() so
// that results match DotRow: kAvx512 / kAvx2 / kScalar mirror DotRow's
// avx512 (d % 16 == 0), avx2 (d % 8 == 0) and scalar paths; kGeneric calls
// DotRow on each key's gathered row (any d, slow).
enum class TilePath { kScalar, kAvx2, kAvx512, kGeneric };

// The path ScoreTiles uses for dimension d on this CPU.
TilePath ChooseTilePath(int32_t d);
const char* TilePathName(TilePath path);
// True when `path` can run on this CPU for dimension d.
bool TilePathSupported(TilePath path, int32_t d);

// scores[q * score_stride + 16 * t + l] = queries[q] · key l of tile t, for
// q < num_queries, t < num_tiles, l < 16.
//   queries: [num_queries, d] f32, row-major
//   tiles:   [num_tiles, d, 16] elements of `dtype` (f32, f16 or bf16 bits)
//   scores:  [num_queries, score_stride] f32; score_stride >= 16 * num_tiles
void ScoreTiles(const float* queries, int32_t num_queries, const void* tiles, DType dtype,
                int32_t d, int64_t num_tiles, float* scores, int64_t score_stride);

// The same with an explicit path (tests). REQUIRES: TilePathSupported(path, d).
void ScoreTilesWith(TilePath path, const float* queries, int32_t num_queries, const void* tiles,
                    DType dtype, int32_t d, int64_t num_tiles, float* scores,
                    int64_t score_stride);

// Writes the positions i in [0, m) with scores[i] >= threshold to `out` in
// increasing order and returns their number (the threshold check of a
// streaming top-k, vectorised).
//   scores: [m] f32;  out: [m] positions
int64_t CollectAtLeast(const float* scores, int64_t m, float threshold, int32_t* out);

// Writes rows [0, rows) of a row-major matrix into tiles as key positions
// first..first+rows-1 (`first` need not be a tile boundary), converting the
// elements to `tile_dtype` (exact: tile_dtype is src_dtype or f32).
//   src:   [rows, src_stride] elements of src_dtype
//   tiles: [*, d, 16] elements of tile_dtype, holding at least first + rows keys
// REQUIRES: tile_dtype == src_dtype || tile_dtype == DType::kF32.
void PackIntoTiles(const void* src, DType src_dtype, int64_t rows, int32_t d, int64_t src_stride,
                   int64_t first, void* tiles, DType tile_dtype);

// Copies key `pos` of the tiles into a dense row of the tile dtype.
//   row: [d] elements of tile_dtype
void UnpackFromTiles(const void* tiles, DType tile_dtype, int32_t d, int64_t pos, void* row);

}  // namespace kvrecall::index
