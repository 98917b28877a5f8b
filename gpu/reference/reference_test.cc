// Tests of the CPU references against independent float64 math: the
// references are the ground truth of the GPU tests, so they are checked here,
// on every machine, without a GPU.

#include "gpu/reference/reference.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "gpu/reference/half_convert.h"

namespace kvrecall::gpu::reference {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Logical K/V of one batch: [batch][kv_head][token][d] as float64 (the values
// the 16-bit storage holds).
struct LogicalKv {
  int32_t batch = 0, num_kv_heads = 0, head_dim = 0;
  std::vector<int32_t> seq_lens;
  int32_t max_len = 0;
  std::vector<double> k, v;
  double K(int b, int h, int t, int d) const { return k[((static_cast<size_t>(b) * num_kv_heads + h) * max_len + t) * head_dim + d]; }
  double V(int b, int h, int t, int d) const { return v[((static_cast<size_t>(b) * num_kv_heads + h) * max_len + t) * head_dim + d]; }
};

LogicalKv MakeLogicalKv(std::mt19937_64& rng, DType dtype, int32_t batch, int32_t heads, int32_t head_dim,
                        std::vector<int32_t> seq_lens) {
  LogicalKv kv;
  kv.batch = batch;
  kv.num_kv_heads = heads;
  kv.head_dim = head_dim;
  kv.seq_lens = std::move(seq_lens);
  kv.max_len = *std::max_element(kv.seq_lens.begin(), kv.seq_lens.end());
  const size_t n = static_cast<size_t>(batch) * heads * kv.max_len * head_dim;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  kv.k.resize(n);
  kv.v.resize(n);
  for (size_t i = 0; i < n; ++i) {
    kv.k[i] = HalfBitsToFloat(FloatToHalfBits(normal(rng), dtype), dtype);
    kv.v[i] = HalfBitsToFloat(FloatToHalfBits(normal(rng), dtype), dtype);
  }
  return kv;
}

enum class Layout { kNhd, kHnd };

// A paged cache holding a LogicalKv: pages in shuffled order, one spare page
// per sequence left unused.
struct PagedStorage {
  std::vector<uint16_t> k, v;
  std::vector<int32_t> page_table;
  std::vector<int32_t> seq_lens;
  PagedKvCache cache;
};

PagedStorage Page(const LogicalKv& lkv, DType dtype, int32_t page_size, Layout layout, std::mt19937_64& rng) {
  PagedStorage s;
  const int32_t max_pages = (lkv.max_len + page_size - 1) / page_size + 1;
  const int32_t num_pages = lkv.batch * max_pages;
  std::vector<int32_t> perm(num_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  s.page_table.assign(perm.begin(), perm.end());
  s.seq_lens = lkv.seq_lens;
  PagedKvCache& c = s.cache;
  c.dtype = dtype;
  c.head_dim = lkv.head_dim;
  c.num_kv_heads = lkv.num_kv_heads;
  c.page_size = page_size;
  c.num_pages = num_pages;
  c.max_pages_per_seq = max_pages;
  if (layout == Layout::kNhd) {
    SetNhdStrides(&c);
  } else {
    SetHndStrides(&c);
  }
  const size_t elems = static_cast<size_t>(num_pages) * c.page_stride;
  s.k.assign(elems, FloatToHalfBits(std::nanf(""), dtype));
  s.v.assign(elems, FloatToHalfBits(std::nanf(""), dtype));
  for (int b = 0; b < lkv.batch; ++b) {
    for (int t = 0; t < lkv.seq_lens[b]; ++t) {
      const int32_t page = s.page_table[b * max_pages + t / page_size];
      for (int h = 0; h < lkv.num_kv_heads; ++h) {
        const int64_t off = page * c.page_stride + (t % page_size) * c.token_stride + h * c.head_stride;
        for (int d = 0; d < lkv.head_dim; ++d) {
          s.k[off + d] = FloatToHalfBits(static_cast<float>(lkv.K(b, h, t, d)), dtype);
          s.v[off + d] = FloatToHalfBits(static_cast<float>(lkv.V(b, h, t, d)), dtype);
        }
      }
    }
  }
  c.k = s.k.data();
  c.v = s.v.data();
  c.page_table = s.page_table.data();
  c.seq_lens = s.seq_lens.data();
  return s;
}

// Softmax attention of q over the given positions, straight from the
// definition in float64.
void NaiveAttention(const LogicalKv& lkv, int b, int h, const float* q, const std::vector<int32_t>& positions,
                    double scale, std::vector<double>* o, double* lse) {
  const int d = lkv.head_dim;
  o->assign(d, 0.0);
  if (positions.empty()) {
    *lse = -std::numeric_limits<double>::infinity();
    return;
  }
  std::vector<double> s;
  for (int32_t t : positions) {
    double dot = 0;
    for (int j = 0; j < d; ++j) dot += q[j] * lkv.K(b, h, t, j);
    s.push_back(dot * scale);
  }
  const double m = *std::max_element(s.begin(), s.end());
  double z = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const double w = std::exp(s[i] - m);
    z += w;
    for (int j = 0; j < d; ++j) (*o)[j] += w * lkv.V(b, h, positions[i], j);
  }
  for (int j = 0; j < d; ++j) (*o)[j] /= z;
  *lse = m + std::log(z);
}

std::vector<float> RandomQueries(std::mt19937_64& rng, size_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> q(n);
  for (float& x : q) x = normal(rng);
  return q;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<double>& b, size_t offset) {
  double m = 0;
  for (size_t i = 0; i < b.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[offset + i]) - b[i]));
  return m;
}

TEST(HalfConvertTest, KnownValuesAndRounding) {
  EXPECT_EQ(FloatToBf16Bits(1.0f), 0x3f80);
  EXPECT_EQ(FloatToF16Bits(1.0f), 0x3c00);
  EXPECT_EQ(FloatToF16Bits(-2.5f), 0xc100);
  EXPECT_EQ(FloatToF16Bits(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToF16Bits(65520.0f), 0x7c00);               // rounds to +inf
  EXPECT_EQ(FloatToF16Bits(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(FloatToF16Bits(std::ldexp(1.0f, -25)), 0x0000);  // tie to even (0)
  EXPECT_EQ(FloatToF16Bits(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie to even
  EXPECT_EQ(FloatToF16Bits(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(FloatToBf16Bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80);  // tie to even
  EXPECT_TRUE(std::isnan(F16BitsToFloat(FloatToF16Bits(std::nanf("")))));
  EXPECT_TRUE(std::isnan(Bf16BitsToFloat(FloatToBf16Bits(std::nanf("")))));
  EXPECT_EQ(F16BitsToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16BitsToFloat(0xfc00), -kInf);
  // Every f16 value round-trips.
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const uint16_t b = static_cast<uint16_t>(bits);
    const float f = F16BitsToFloat(b);
    if (!std::isnan(f)) {
      ASSERT_EQ(FloatToF16Bits(f), b) << bits;
    }
    const float g = Bf16BitsToFloat(b);
    if (!std::isnan(g)) {
      ASSERT_EQ(FloatToBf16Bits(g), b) << bits;
    }
  }
}

struct SparseCase {
  DType dtype;
  int32_t head_dim;
  int32_t group;
  int32_t page_size;
  Layout layout;
  bool per_kv_head;
};

TEST(SparseDecodeReferenceTest, MatchesNaiveFloat64AttentionOnEveryLayout) {
  const uint64_t seed = 20241101;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const SparseCase cases[] = {
      {DType::kBf16, 128, 4, 16, Layout::kNhd, true}, {DType::kF16, 64, 1, 1, Layout::kHnd, true},
      {DType::kBf16, 64, 3, 256, Layout::kHnd, false}, {DType::kF16, 128, 8, 7, Layout::kNhd, false},
  };
  for (const SparseCase& c : cases) {
    const int32_t batch = 2, kv_heads = 2, hq = kv_heads * c.group;
    const LogicalKv lkv = MakeLogicalKv(rng, c.dtype, batch, kv_heads, c.head_dim, {300, 517});
    PagedStorage st = Page(lkv, c.dtype, c.page_size, c.layout, rng);
    const int32_t num_lists = c.per_kv_head ? kv_heads : hq;
    const int32_t max_len = 200;
    std::vector<int32_t> positions(static_cast<size_t>(batch) * num_lists * max_len, -7);
    std::vector<int32_t> lens(static_cast<size_t>(batch) * num_lists);
    std::vector<std::vector<int32_t>> lists(lens.size());
    for (int b = 0; b < batch; ++b) {
      for (int l = 0; l < num_lists; ++l) {
        const size_t li = static_cast<size_t>(b) * num_lists + l;
        std::vector<int32_t> all(lkv.seq_lens[b]);
        std::iota(all.begin(), all.end(), 0);
        std::shuffle(all.begin(), all.end(), rng);
        lens[li] = l == 0 && b == 1 ? 0 : static_cast<int32_t>(rng() % (max_len + 1));
        lists[li].assign(all.begin(), all.begin() + lens[li]);
        std::copy(lists[li].begin(), lists[li].end(), positions.begin() + li * max_len);
      }
    }
    const std::vector<float> q = RandomQueries(rng, static_cast<size_t>(batch) * hq * c.head_dim, 3.0f);
    std::vector<float> o(q.size(), std::nanf("")), lse(static_cast<size_t>(batch) * hq, std::nanf(""));
    int32_t invalid = 0;
    SparseDecodeArgs a;
    a.kv = st.cache;
    a.batch_size = batch;
    a.num_q_heads = hq;
    a.q = q.data();
    a.lists_per_kv_head = c.per_kv_head;
    a.positions = positions.data();
    a.list_lens = lens.data();
    a.max_list_len = max_len;
    a.o = o.data();
    a.lse = lse.data();
    a.num_invalid = &invalid;
    ASSERT_TRUE(SparseDecodeAttention(a));
    EXPECT_EQ(invalid, 0);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < hq; ++h) {
        const int l = c.per_kv_head ? h / c.group : h;
        std::vector<double> ref_o;
        double ref_lse;
        const size_t row = static_cast<size_t>(b) * hq + h;
        NaiveAttention(lkv, b, h / c.group, q.data() + row * c.head_dim, lists[b * num_lists + l], scale, &ref_o,
                       &ref_lse);
        EXPECT_LT(MaxAbsDiff(o, ref_o, row * c.head_dim), 1e-6) << "b " << b << " h " << h;
        if (std::isinf(ref_lse)) {
          EXPECT_EQ(lse[row], -kInf);
        } else {
          EXPECT_NEAR(lse[row], ref_lse, 1e-5 * std::max(1.0, std::abs(ref_lse)));
        }
      }
    }
  }
}

TEST(SparseDecodeReferenceTest, SkipsAndCountsInvalidEntries) {
  std::mt19937_64 rng(7);
  const LogicalKv lkv = MakeLogicalKv(rng, DType::kBf16, 1, 1, 64, {40});
  PagedStorage st = Page(lkv, DType::kBf16, 16, Layout::kNhd, rng);
  st.page_table[1] = st.cache.num_pages;  // positions 16..31 now on a page outside the pool
  const std::vector<int32_t> positions = {3, -1, 40, 17, 39, 1000, 5};
  const std::vector<float> q = RandomQueries(rng, 64, 1.0f);
  std::vector<float> o(64), lse(1);
  int32_t invalid = 0;
  SparseDecodeArgs a;
  a.kv = st.cache;
  a.batch_size = 1;
  a.num_q_heads = 1;
  a.q = q.data();
  a.positions = positions.data();
  a.max_list_len = static_cast<int32_t>(positions.size());
  a.o = o.data();
  a.lse = lse.data();
  a.num_invalid = &invalid;
  ASSERT_TRUE(SparseDecodeAttention(a));
  EXPECT_EQ(invalid, 4);  // -1, 40 (== seq_len), 17 (bad page), 1000
  std::vector<double> ref_o;
  double ref_lse;
  NaiveAttention(lkv, 0, 0, q.data(), {3, 39, 5}, 1.0 / 8.0, &ref_o, &ref_lse);
  EXPECT_LT(MaxAbsDiff(o, ref_o, 0), 1e-6);
  EXPECT_NEAR(lse[0], ref_lse, 1e-5);
}

TEST(DenseDecodeReferenceTest, EqualsSparseOverAllPositionsAndWritesScores) {
  std::mt19937_64 rng(11);
  const int32_t batch = 2, kv_heads = 2, group = 2, hq = 4, d = 128, max_seq = 700;
  const LogicalKv lkv = MakeLogicalKv(rng, DType::kF16, batch, kv_heads, d, {650, 123});
  PagedStorage st = Page(lkv, DType::kF16, 32, Layout::kHnd, rng);
  const std::vector<float> q = RandomQueries(rng, static_cast<size_t>(batch) * hq * d, 2.0f);
  std::vector<float> o(q.size()), lse(batch * hq), scores(static_cast<size_t>(batch) * hq * max_seq);
  std::vector<int32_t> top(static_cast<size_t>(batch) * hq * 50);
  DenseDecodeArgs a;
  a.kv = st.cache;
  a.batch_size = batch;
  a.num_q_heads = hq;
  a.q = q.data();
  a.max_seq_len = max_seq;
  a.o = o.data();
  a.lse = lse.data();
  a.scores = scores.data();
  a.top_k = 50;
  a.top_k_positions = top.data();
  ASSERT_TRUE(DenseDecodeAttention(a));

  // Sparse over every position gives the same o and lse.
  std::vector<int32_t> positions(static_cast<size_t>(batch) * kv_heads * max_seq, 0);
  std::vector<int32_t> lens(batch * kv_heads);
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < kv_heads; ++h) {
      lens[b * kv_heads + h] = lkv.seq_lens[b];
      std::iota(positions.begin() + (b * kv_heads + h) * max_seq,
                positions.begin() + (b * kv_heads + h) * max_seq + lkv.seq_lens[b], 0);
    }
  }
  std::vector<float> o2(o.size()), lse2(lse.size());
  SparseDecodeArgs s;
  s.kv = st.cache;
  s.batch_size = batch;
  s.num_q_heads = hq;
  s.q = q.data();
  s.positions = positions.data();
  s.list_lens = lens.data();
  s.max_list_len = max_seq;
  s.o = o2.data();
  s.lse = lse2.data();
  ASSERT_TRUE(SparseDecodeAttention(s));
  EXPECT_EQ(o, o2);
  EXPECT_EQ(lse, lse2);

  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < hq; ++h) {
      const float* srow = scores.data() + (static_cast<size_t>(b) * hq + h) * max_seq;
      for (int t = 0; t < max_seq; ++t) {
        if (t >= lkv.seq_lens[b]) {
          ASSERT_EQ(srow[t], -kInf);
          continue;
        }
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += q[(static_cast<size_t>(b) * hq + h) * d + j] * lkv.K(b, h / group, t, j);
        ASSERT_NEAR(srow[t], dot * scale, 1e-5 * std::max(1.0, std::abs(dot * scale)));
      }
      // Top-k positions are the 50 largest logits, in descending order.
      const int32_t* tk = top.data() + (static_cast<size_t>(b) * hq + h) * 50;
      EXPECT_EQ(CheckTopKSelection(srow, max_seq, tk, 50, 0.0), "");
      for (int i = 1; i < 50; ++i) EXPECT_GE(srow[tk[i - 1]], srow[tk[i]]);
    }
  }
}

TEST(DenseDecodeReferenceTest, IdenticalKeysGiveTheMeanOfValues) {
  std::mt19937_64 rng(3);
  LogicalKv lkv = MakeLogicalKv(rng, DType::kBf16, 1, 1, 64, {100});
  for (int t = 1; t < 100; ++t) {
    for (int j = 0; j < 64; ++j) lkv.k[t * 64 + j] = lkv.k[j];
  }
  PagedStorage st = Page(lkv, DType::kBf16, 8, Layout::kNhd, rng);
  const std::vector<float> q = RandomQueries(rng, 64, 1.0f);
  std::vector<float> o(64), lse(1);
  DenseDecodeArgs a;
  a.kv = st.cache;
  a.batch_size = 1;
  a.num_q_heads = 1;
  a.q = q.data();
  a.max_seq_len = 100;
  a.o = o.data();
  a.lse = lse.data();
  ASSERT_TRUE(DenseDecodeAttention(a));
  double s = 0;
  for (int j = 0; j < 64; ++j) s += q[j] * lkv.k[j];
  s /= 8.0;
  EXPECT_NEAR(lse[0], s + std::log(100.0), 1e-5);
  for (int j = 0; j < 64; ++j) {
    double mean = 0;
    for (int t = 0; t < 100; ++t) mean += lkv.V(0, 0, t, j);
    EXPECT_NEAR(o[j], mean / 100, 1e-6);
  }
}

TEST(MergeStatesReferenceTest, MergeOfDisjointPartsEqualsAttentionOverTheUnion) {
  std::mt19937_64 rng(5);
  const int32_t d = 128, parts = 5, len = 400;
  const LogicalKv lkv = MakeLogicalKv(rng, DType::kBf16, 1, 1, d, {len});
  PagedStorage st = Page(lkv, DType::kBf16, 16, Layout::kNhd, rng);
  const std::vector<float> q = RandomQueries(rng, d, 4.0f);
  std::vector<int32_t> all(len);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  // Parts of sizes 0, 1, 99, 150, 150 (one empty part is the identity).
  const int32_t sizes[parts] = {0, 1, 99, 150, 150};
  std::vector<float> o_states(static_cast<size_t>(parts) * d), lse_states(parts);
  int32_t begin = 0;
  for (int j = 0; j < parts; ++j) {
    SparseDecodeArgs a;
    a.kv = st.cache;
    a.batch_size = 1;
    a.num_q_heads = 1;
    a.q = q.data();
    a.positions = all.data() + begin;
    a.max_list_len = sizes[j];
    a.o = o_states.data() + j * d;
    a.lse = lse_states.data() + j;
    ASSERT_TRUE(SparseDecodeAttention(a));
    begin += sizes[j];
  }
  EXPECT_EQ(lse_states[0], -kInf);
  for (DType out : {DType::kF32, DType::kBf16}) {
    std::vector<float> o32(d);
    std::vector<uint16_t> o16(d);
    float lse = 0;
    MergeStatesArgs m;
    m.o_states = o_states.data();
    m.lse_states = lse_states.data();
    m.num_states = parts;
    m.num_heads = 1;
    m.head_dim = d;
    m.o_state_stride = d;
    m.o_head_stride = d;
    m.lse_state_stride = 1;
    m.lse_head_stride = 1;
    m.o = out == DType::kF32 ? static_cast<void*>(o32.data()) : static_cast<void*>(o16.data());
    m.out_dtype = out;
    m.lse = &lse;
    ASSERT_TRUE(MergeStates(m));
    std::vector<double> ref_o;
    double ref_lse;
    NaiveAttention(lkv, 0, 0, q.data(), std::vector<int32_t>(all.begin(), all.begin() + begin), 1.0 / std::sqrt(128.0),
                   &ref_o, &ref_lse);
    EXPECT_NEAR(lse, ref_lse, 1e-5);
    for (int j = 0; j < d; ++j) {
      const double got = out == DType::kF32 ? o32[j] : Bf16BitsToFloat(o16[j]);
      EXPECT_NEAR(got, ref_o[j], out == DType::kF32 ? 1e-6 : 4e-3 * std::max(1.0, std::abs(ref_o[j])));
    }
  }
}

TEST(MergeStatesReferenceTest, AllEmptyGivesZeroAndMinusInfinity) {
  std::vector<float> o_states(3 * 64, 5.0f), lse_states(3, -kInf), o(64, 1.0f);
  float lse = 0;
  MergeStatesArgs m;
  m.o_states = o_states.data();
  m.lse_states = lse_states.data();
  m.num_states = 3;
  m.num_heads = 1;
  m.head_dim = 64;
  m.o_state_stride = 64;
  m.lse_state_stride = 1;
  m.o = o.data();
  m.lse = &lse;
  ASSERT_TRUE(MergeStates(m));
  EXPECT_EQ(lse, -kInf);
  EXPECT_THAT(o, ::testing::Each(0.0f));
}

TEST(TopKReferenceTest, MatchesAFullSortWithTiesNanAndInfinities) {
  const uint64_t seed = 99;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int32_t rows = 4, n = 3001;
  std::vector<float> scores(static_cast<size_t>(rows) * n);
  std::normal_distribution<float> normal;
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < n; ++i) {
      float x = r == 1 ? static_cast<float>(rng() % 7) : normal(rng);  // row 1: heavy ties
      if (r == 2 && i % 97 == 0) x = -kInf;
      if (r == 3 && i % 500 == 3) x = std::nanf("");
      if (r == 3 && i == 10) x = kInf;
      scores[static_cast<size_t>(r) * n + i] = x;
    }
  }
  for (int32_t k : {1, 17, 1000, n}) {
    std::vector<int32_t> idx(static_cast<size_t>(rows) * k);
    std::vector<float> val(idx.size());
    TopKArgs a;
    a.scores = scores.data();
    a.num_rows = rows;
    a.num_cols = n;
    a.k = k;
    a.indices = idx.data();
    a.values = val.data();
    ASSERT_TRUE(TopK(a));
    for (int r = 0; r < rows; ++r) {
      const float* row = scores.data() + static_cast<size_t>(r) * n;
      std::vector<int32_t> order(n);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [row](int32_t x, int32_t y) {
        const bool nx = std::isnan(row[x]), ny = std::isnan(row[y]);
        if (nx != ny) return nx;
        if (nx) return false;
        return row[x] > row[y];
      });
      for (int i = 0; i < k; ++i) {
        ASSERT_EQ(idx[static_cast<size_t>(r) * k + i], order[i]) << "row " << r << " k " << k << " i " << i;
        const float v = val[static_cast<size_t>(r) * k + i];
        ASSERT_TRUE(v == row[order[i]] || (std::isnan(v) && std::isnan(row[order[i]])));
      }
      EXPECT_EQ(CheckTopKSelection(row, n, idx.data() + static_cast<size_t>(r) * k, k, 0.0), "");
    }
  }
  // NaN ranks first; +inf next.
  std::vector<int32_t> idx(4);
  TopKArgs a;
  a.scores = scores.data() + 3 * n;
  a.num_rows = 1;
  a.num_cols = n;
  a.k = 4;
  a.indices = idx.data();
  ASSERT_TRUE(TopK(a));
  EXPECT_THAT(idx, ::testing::ElementsAre(3, 503, 1003, 1503));
}

TEST(TopKReferenceTest, CheckTopKSelectionRejectsWrongSelections) {
  const std::vector<float> row = {5, 1, 4, 4, 0, 3};
  const int32_t good[] = {0, 3, 2};
  const int32_t also_good[] = {2, 0, 3};
  const int32_t low[] = {0, 2, 5};
  const int32_t dup[] = {0, 2, 2};
  const int32_t out_of_range[] = {0, 2, 6};
  EXPECT_EQ(CheckTopKSelection(row.data(), 6, good, 3, 0.0), "");
  EXPECT_EQ(CheckTopKSelection(row.data(), 6, also_good, 3, 0.0), "");
  EXPECT_NE(CheckTopKSelection(row.data(), 6, low, 3, 0.0), "");
  EXPECT_NE(CheckTopKSelection(row.data(), 6, dup, 3, 0.0), "");
  EXPECT_NE(CheckTopKSelection(row.data(), 6, out_of_range, 3, 0.0), "");
  // Ties at the k-th value may go either way.
  const int32_t tie_a[] = {0, 2};
  const int32_t tie_b[] = {3, 0};
  EXPECT_EQ(CheckTopKSelection(row.data(), 6, tie_a, 2, 0.0), "");
  EXPECT_EQ(CheckTopKSelection(row.data(), 6, tie_b, 2, 0.0), "");
  // A tolerance admits near-ties only.
  const int32_t near[] = {0, 5};
  EXPECT_NE(CheckTopKSelection(row.data(), 6, near, 2, 0.5), "");
  EXPECT_EQ(CheckTopKSelection(row.data(), 6, near, 2, 1.5), "");
}

// Random orthonormal d x d matrix (rows), by Gram-Schmidt in float64.
std::vector<double> RandomRotation(std::mt19937_64& rng, int d) {
  std::normal_distribution<double> normal;
  std::vector<double> p(static_cast<size_t>(d) * d);
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j < d; ++j) p[i * d + j] = normal(rng);
    for (int r = 0; r < i; ++r) {
      double dot = 0;
      for (int j = 0; j < d; ++j) dot += p[i * d + j] * p[r * d + j];
      for (int j = 0; j < d; ++j) p[i * d + j] -= dot * p[r * d + j];
    }
    double norm = 0;
    for (int j = 0; j < d; ++j) norm += p[i * d + j] * p[i * d + j];
    norm = std::sqrt(norm);
    for (int j = 0; j < d; ++j) p[i * d + j] /= norm;
  }
  return p;
}

TEST(LokiScoreReferenceTest, FullRankRotatedScoresEqualExactLogits) {
  // With rank == head_dim, (qP)·(kP) = q·k for orthonormal P: Loki's scores
  // are the exact logits (up to the f16 rounding of the rotated keys).
  std::mt19937_64 rng(17);
  const int32_t d = 64, batch = 2, kv_heads = 1, group = 2, hq = 2, max_seq = 300;
  const std::vector<double> rot = RandomRotation(rng, d);
  const LogicalKv lkv = MakeLogicalKv(rng, DType::kF16, batch, kv_heads, d, {300, 250});
  const std::vector<float> q = RandomQueries(rng, static_cast<size_t>(batch) * hq * d, 1.0f);
  // Rotated keys [batch, kv_heads, max_seq, d] and queries.
  std::vector<uint16_t> keys(static_cast<size_t>(batch) * kv_heads * max_seq * d, 0);
  for (int b = 0; b < batch; ++b) {
    for (int t = 0; t < lkv.seq_lens[b]; ++t) {
      for (int j = 0; j < d; ++j) {
        double x = 0;
        for (int i = 0; i < d; ++i) x += lkv.K(b, 0, t, i) * rot[j * d + i];
        keys[(static_cast<size_t>(b) * max_seq + t) * d + j] = FloatToF16Bits(static_cast<float>(x));
      }
    }
  }
  std::vector<float> q_rot(q.size());
  for (size_t r = 0; r < q.size() / d; ++r) {
    for (int j = 0; j < d; ++j) {
      double x = 0;
      for (int i = 0; i < d; ++i) x += q[r * d + i] * rot[j * d + i];
      q_rot[r * d + j] = static_cast<float>(x);
    }
  }
  std::vector<int32_t> seq_lens = lkv.seq_lens;
  std::vector<float> scores(static_cast<size_t>(batch) * hq * max_seq);
  std::vector<int32_t> top(static_cast<size_t>(batch) * hq * 20);
  LokiScoreArgs a;
  a.q = q_rot.data();
  a.keys = keys.data();
  a.dtype = DType::kF16;
  a.rank = 64;
  a.head_dim = d;
  a.batch_size = batch;
  a.num_q_heads = hq;
  a.num_kv_heads = kv_heads;
  a.head_stride = static_cast<int64_t>(max_seq) * d;
  a.seq_stride = a.head_stride * kv_heads;
  a.seq_lens = seq_lens.data();
  a.max_seq_len = max_seq;
  a.scores = scores.data();
  a.k = 20;
  a.top_k_positions = top.data();
  ASSERT_TRUE(LokiScore(a));
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < hq; ++h) {
      const float* srow = scores.data() + (static_cast<size_t>(b) * hq + h) * max_seq;
      for (int t = 0; t < max_seq; ++t) {
        if (t >= lkv.seq_lens[b]) {
          ASSERT_EQ(srow[t], -kInf);
          continue;
        }
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += q[(static_cast<size_t>(b) * hq + h) * d + j] * lkv.K(b, h / group, t, j);
        ASSERT_NEAR(srow[t], dot / 8.0, 5e-3 * std::max(1.0, std::abs(dot / 8.0)));
      }
      EXPECT_EQ(CheckTopKSelection(srow, max_seq, top.data() + (static_cast<size_t>(b) * hq + h) * 20, 20, 0.0), "");
    }
  }
}

TEST(QuestScoreReferenceTest, PageBoundIsAnUpperBoundAndTightForOneTokenPages) {
  std::mt19937_64 rng(23);
  const int32_t d = 128, page = 16, len = 1000, pages = (len + page - 1) / page, hq = 4;
  const LogicalKv lkv = MakeLogicalKv(rng, DType::kBf16, 1, 1, d, {len});
  std::vector<uint16_t> pmax(static_cast<size_t>(pages) * d), pmin(pmax.size());
  for (int p = 0; p < pages; ++p) {
    for (int j = 0; j < d; ++j) {
      double hi = -1e300, lo = 1e300;
      for (int t = p * page; t < std::min(len, (p + 1) * page); ++t) {
        hi = std::max(hi, lkv.K(0, 0, t, j));
        lo = std::min(lo, lkv.K(0, 0, t, j));
      }
      pmax[p * d + j] = FloatToBf16Bits(static_cast<float>(hi));  // exact: the keys are bf16 already
      pmin[p * d + j] = FloatToBf16Bits(static_cast<float>(lo));
    }
  }
  const std::vector<float> q = RandomQueries(rng, static_cast<size_t>(hq) * d, 1.0f);
  const int32_t num_pages = pages;
  std::vector<float> scores(static_cast<size_t>(hq) * pages);
  std::vector<int32_t> top(static_cast<size_t>(hq) * 4);
  QuestScoreArgs a;
  a.q = q.data();
  a.page_max = pmax.data();
  a.page_min = pmin.data();
  a.dtype = DType::kBf16;
  a.head_dim = d;
  a.batch_size = 1;
  a.num_q_heads = hq;
  a.num_kv_heads = 1;
  a.head_stride = static_cast<int64_t>(pages) * d;
  a.seq_stride = a.head_stride;
  a.num_pages = &num_pages;
  a.max_pages = pages;
  a.scores = scores.data();
  a.k = 4;
  a.top_k_pages = top.data();
  ASSERT_TRUE(QuestScore(a));
  const double scale = 1.0 / std::sqrt(128.0);
  for (int h = 0; h < hq; ++h) {
    double best = -1e300;
    int best_page = -1;
    for (int p = 0; p < pages; ++p) {
      double page_max_logit = -1e300;
      for (int t = p * page; t < std::min(len, (p + 1) * page); ++t) {
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += q[h * d + j] * lkv.K(0, 0, t, j);
        page_max_logit = std::max(page_max_logit, dot * scale);
        if (dot * scale > best) {
          best = dot * scale;
          best_page = p;
        }
      }
      EXPECT_GE(scores[h * pages + p], page_max_logit - 1e-5) << "page " << p;
    }
    // The bound of the page holding the best token is >= that token's logit,
    // and the top-4 pages by bound contain a page whose bound is >= it.
    EXPECT_GE(scores[h * pages + best_page], best - 1e-5);
    EXPECT_EQ(CheckTopKSelection(scores.data() + h * pages, pages, top.data() + h * 4, 4, 0.0), "");
  }
  // One-token pages: the bound is the logit itself.
  std::vector<uint16_t> one(static_cast<size_t>(len) * d);
  for (int t = 0; t < len; ++t) {
    for (int j = 0; j < d; ++j) one[t * d + j] = FloatToBf16Bits(static_cast<float>(lkv.K(0, 0, t, j)));
  }
  const int32_t one_pages = len;
  std::vector<float> s1(static_cast<size_t>(hq) * len);
  a.page_max = one.data();
  a.page_min = one.data();
  a.head_stride = static_cast<int64_t>(len) * d;
  a.seq_stride = a.head_stride;
  a.num_pages = &one_pages;
  a.max_pages = len;
  a.scores = s1.data();
  a.k = 0;
  ASSERT_TRUE(QuestScore(a));
  for (int h = 0; h < hq; ++h) {
    for (int t = 0; t < len; t += 37) {
      double dot = 0;
      for (int j = 0; j < d; ++j) dot += q[h * d + j] * lkv.K(0, 0, t, j);
      EXPECT_NEAR(s1[h * len + t], dot * scale, 1e-5 * std::max(1.0, std::abs(dot * scale)));
    }
  }
}

TEST(ValidationTest, BadArgumentsAreRejectedAndNothingIsWritten) {
  std::mt19937_64 rng(1);
  const LogicalKv lkv = MakeLogicalKv(rng, DType::kBf16, 1, 1, 64, {32});
  PagedStorage st = Page(lkv, DType::kBf16, 16, Layout::kNhd, rng);
  const std::vector<float> q(64, 1.0f);
  const std::vector<int32_t> positions = {0, 1, 2};
  std::vector<float> o(64, 42.0f);
  SparseDecodeArgs good;
  good.kv = st.cache;
  good.batch_size = 1;
  good.num_q_heads = 1;
  good.q = q.data();
  good.positions = positions.data();
  good.max_list_len = 3;
  good.o = o.data();
  ASSERT_EQ(ValidateSparseDecodeArgs(good), nullptr);

  auto expect_rejected = [&](SparseDecodeArgs a, const char* what) {
    EXPECT_NE(ValidateSparseDecodeArgs(a), nullptr) << what;
    EXPECT_FALSE(SparseDecodeAttention(a)) << what;
    EXPECT_THAT(o, ::testing::Each(42.0f)) << what;
  };
  SparseDecodeArgs a = good;
  a.q = nullptr;
  expect_rejected(a, "null q");
  a = good;
  a.kv.k = nullptr;
  expect_rejected(a, "null k");
  a = good;
  a.kv.head_dim = 96;
  expect_rejected(a, "head_dim 96");
  a = good;
  a.kv.dtype = DType::kF32;
  expect_rejected(a, "f32 kv");
  a = good;
  a.kv.page_size = 0;
  expect_rejected(a, "page_size 0");
  a = good;
  a.kv.page_size = 257;
  expect_rejected(a, "page_size 257");
  a = good;
  a.num_q_heads = 9;
  expect_rejected(a, "group 9");
  a = good;
  a.kv.token_stride = 12;
  expect_rejected(a, "stride not a multiple of 8");
  a = good;
  a.kv.k = reinterpret_cast<const char*>(st.cache.k) + 2;
  expect_rejected(a, "misaligned k");
  a = good;
  a.positions = nullptr;
  expect_rejected(a, "null positions");
  a = good;
  a.max_list_len = -1;
  expect_rejected(a, "negative list length");

  std::vector<float> scores(10, 1.0f);
  std::vector<int32_t> idx(11, -5);
  TopKArgs t;
  t.scores = scores.data();
  t.num_rows = 1;
  t.num_cols = 10;
  t.k = 11;
  t.indices = idx.data();
  EXPECT_NE(ValidateTopKArgs(t), nullptr);
  EXPECT_FALSE(TopK(t));
  EXPECT_THAT(idx, ::testing::Each(-5));
  t.k = 0;
  EXPECT_NE(ValidateTopKArgs(t), nullptr);
  t.k = 3;
  t.row_stride = 5;
  EXPECT_NE(ValidateTopKArgs(t), nullptr);

  MergeStatesArgs m;
  m.o_states = o.data();
  m.lse_states = o.data();
  m.num_states = 1;
  m.num_heads = 1;
  m.head_dim = 32;
  m.o = o.data();
  EXPECT_NE(ValidateMergeStatesArgs(m), nullptr);
  m.head_dim = 64;
  EXPECT_EQ(ValidateMergeStatesArgs(m), nullptr);
  m.num_states = 0;
  EXPECT_NE(ValidateMergeStatesArgs(m), nullptr);

  LokiScoreArgs l;
  l.q = q.data();
  l.keys = st.k.data();
  l.rank = 24;
  l.batch_size = 1;
  l.num_q_heads = 1;
  l.num_kv_heads = 1;
  l.seq_lens = st.seq_lens.data();
  l.max_seq_len = 32;
  l.head_stride = 32 * 32;
  l.scores = scores.data();
  EXPECT_NE(ValidateLokiScoreArgs(l), nullptr);
  l.rank = 32;
  EXPECT_EQ(ValidateLokiScoreArgs(l), nullptr);
  l.k = 33;
  l.top_k_positions = idx.data();
  EXPECT_NE(ValidateLokiScoreArgs(l), nullptr);

  QuestScoreArgs qs;
  qs.q = q.data();
  qs.page_max = st.k.data();
  qs.page_min = st.v.data();
  qs.head_dim = 64;
  qs.batch_size = 1;
  qs.num_q_heads = 1;
  qs.num_kv_heads = 1;
  const int32_t np = 2;
  qs.num_pages = &np;
  qs.max_pages = 2;
  qs.head_stride = 128;
  qs.scores = scores.data();
  EXPECT_EQ(ValidateQuestScoreArgs(qs), nullptr);
  qs.num_kv_heads = 2;
  EXPECT_NE(ValidateQuestScoreArgs(qs), nullptr);
  qs.num_kv_heads = 1;
  qs.k = 3;
  qs.top_k_pages = idx.data();
  EXPECT_NE(ValidateQuestScoreArgs(qs), nullptr);
}

}  // namespace
}  // namespace kvrecall::gpu::reference
