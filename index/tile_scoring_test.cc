#include "index/tile_scoring.h"

#include <cmath>
#include <random>
#include <vector>

#include "common/half.h"
#include "gtest/gtest.h"
#include "index/distance.h"

namespace kvrecall::index {
namespace {

// Keys as f32 values exactly representable in `dtype`, and their bits.
struct Keys {
  std::vector<float> values;  // [n, d]
  std::vector<char> bits;     // [n, d] of dtype
};

Keys MakeKeys(std::mt19937& rng, int64_t n, int32_t d, DType dtype) {
  std::normal_distribution<float> dist(0.5f, 2.0f);
  Keys keys;
  keys.values.resize(n * d);
  keys.bits.resize(n * d * DTypeSize(dtype));
  for (int64_t i = 0; i < n * d; ++i) {
    float v = dist(rng);
    if (dtype == DType::kF16) {
      const uint16_t h = FloatToHalf(v);
      std::memcpy(keys.bits.data() + 2 * i, &h, 2);
      v = HalfToFloat(h);
    } else if (dtype == DType::kBf16) {
      const uint16_t b = FloatToBf16(v);
      std::memcpy(keys.bits.data() + 2 * i, &b, 2);
      v = Bf16ToFloat(b);
    } else {
      std::memcpy(keys.bits.data() + 4 * i, &v, 4);
    }
    keys.values[i] = v;
  }
  return keys;
}

// DotAvx512's arithmetic (index/distance.cc) written out in scalar code:
// 32 FMA chains (lanes of acc0 and acc1), then _mm512_reduce_add_ps's tree.
float EmulateAvx512(const float* q, const float* k, int32_t d) {
  float acc[32] = {};
  int32_t j = 0;
  for (; j + 32 <= d; j += 32) {
    for (int c = 0; c < 32; ++c) acc[c] = std::fma(q[j + c], k[j + c], acc[c]);
  }
  for (; j + 16 <= d; j += 16) {
    for (int c = 0; c < 16; ++c) acc[c] = std::fma(q[j + c], k[j + c], acc[c]);
  }
  float a[16];
  for (int l = 0; l < 16; ++l) a[l] = acc[l] + acc[16 + l];
  float t3[8], t6[4];
  for (int i = 0; i < 8; ++i) t3[i] = a[8 + i] + a[i];
  for (int i = 0; i < 4; ++i) t6[i] = t3[4 + i] + t3[i];
  return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}

// DotAvx2's arithmetic: 16 FMA chains, then HorizontalSum256's tree.
float EmulateAvx2(const float* q, const float* k, int32_t d) {
  float acc[16] = {};
  int32_t j = 0;
  for (; j + 16 <= d; j += 16) {
    for (int c = 0; c < 16; ++c) acc[c] = std::fma(q[j + c], k[j + c], acc[c]);
  }
  for (; j + 8 <= d; j += 8) {
    for (int c = 0; c < 8; ++c) acc[c] = std::fma(q[j + c], k[j + c], acc[c]);
  }
  float a[8];
  for (int l = 0; l < 8; ++l) a[l] = acc[l] + acc[8 + l];
  float lo[4];
  for (int i = 0; i < 4; ++i) lo[i] = a[i] + a[4 + i];
  return (lo[0] + lo[1]) + (lo[2] + lo[3]);
}

float EmulateScalar(const float* q, const float* k, int32_t d) {
  float s = 0;
  for (int32_t j = 0; j < d; ++j) {
    const float p = q[j] * k[j];  // separate rounding: DotScalar has no FMA
    s += p;
  }
  return s;
}

std::vector<char> Tile(const Keys& keys, DType dtype, int64_t n, int32_t d) {
  const int64_t tiles = (n + kTileKeys - 1) / kTileKeys;
  std::vector<char> out(tiles * kTileKeys * d * DTypeSize(dtype), 0);
  PackIntoTiles(keys.bits.data(), dtype, n, d, d, 0, out.data(), dtype);
  return out;
}

TEST(TileScoringTest, EveryPathReproducesItsDotRowArithmeticBitForBit) {
  const uint32_t seed = 20240611;
  std::mt19937 rng(seed);
  for (TilePath path : {TilePath::kScalar, TilePath::kAvx2, TilePath::kAvx512}) {
    for (int32_t d : {16, 32, 48, 64, 128, 144, 256}) {
      if (!TilePathSupported(path, d)) continue;
      for (DType dtype : {DType::kF32, DType::kF16, DType::kBf16}) {
        const int64_t n = 3 * kTileKeys;
        const Keys keys = MakeKeys(rng, n, d, dtype);
        const std::vector<char> tiles = Tile(keys, dtype, n, d);
        for (int32_t nq : {1, 2, 3, 4, 5, 7}) {
          std::vector<float> q(nq * d);
          std::normal_distribution<float> qd(-0.3f, 1.5f);
          for (float& x : q) x = qd(rng);
          std::vector<float> scores(nq * n);
          ScoreTilesWith(path, q.data(), nq, tiles.data(), dtype, d, n / kTileKeys,
                         scores.data(), n);
          for (int32_t qi = 0; qi < nq; ++qi) {
            for (int64_t i = 0; i < n; ++i) {
              const float* qv = q.data() + qi * d;
              const float* kv = keys.values.data() + i * d;
              const float expected = path == TilePath::kAvx512 ? EmulateAvx512(qv, kv, d)
                                     : path == TilePath::kAvx2 ? EmulateAvx2(qv, kv, d)
                                                               : EmulateScalar(qv, kv, d);
              ASSERT_EQ(scores[qi * n + i], expected)
                  << "seed " << seed << " path " << TilePathName(path) << " d " << d
                  << " dtype " << DTypeName(dtype) << " q " << qi << " key " << i;
            }
          }
        }
      }
    }
  }
}

TEST(TileScoringTest, DispatchedKernelEqualsDotRowForAnyDim) {
  const uint32_t seed = 77;
  std::mt19937 rng(seed);
  for (int32_t d : {5, 8, 24, 100, 128}) {
    for (DType dtype : {DType::kF32, DType::kF16, DType::kBf16}) {
      const int64_t n = 2 * kTileKeys;
      const Keys keys = MakeKeys(rng, n, d, dtype);
      const std::vector<char> tiles = Tile(keys, dtype, n, d);
      std::vector<float> q(3 * d);
      for (float& x : q) x = std::normal_distribution<float>()(rng);
      std::vector<float> scores(3 * n);
      ScoreTiles(q.data(), 3, tiles.data(), dtype, d, 2, scores.data(), n);
      for (int qi = 0; qi < 3; ++qi) {
        for (int64_t i = 0; i < n; ++i) {
          const float expected =
              DotRow(q.data() + qi * d, keys.bits.data() + i * d * DTypeSize(dtype), dtype, d);
          ASSERT_EQ(scores[qi * n + i], expected)
              << "seed " << seed << " path " << TilePathName(ChooseTilePath(d)) << " d " << d
              << " dtype " << DTypeName(dtype);
        }
      }
    }
  }
}

TEST(TileScoringTest, PackConvertsToF32AndUnpackRoundTrips) {
  std::mt19937 rng(5);
  const int32_t d = 24;
  const int64_t n = 21;  // not a multiple of the tile width
  const Keys keys = MakeKeys(rng, n, d, DType::kF16);
  std::vector<float> tiles(2 * kTileKeys * d, 0);
  // Pack in two pieces, the second starting mid-tile.
  PackIntoTiles(keys.bits.data(), DType::kF16, 9, d, d, 0, tiles.data(), DType::kF32);
  PackIntoTiles(keys.bits.data() + 9 * d * 2, DType::kF16, n - 9, d, d, 9, tiles.data(),
                DType::kF32);
  std::vector<float> row(d);
  for (int64_t i = 0; i < n; ++i) {
    UnpackFromTiles(tiles.data(), DType::kF32, d, i, row.data());
    for (int32_t j = 0; j < d; ++j) ASSERT_EQ(row[j], keys.values[i * d + j]);
  }
}

}  // namespace
}  // namespace kvrecall::index
