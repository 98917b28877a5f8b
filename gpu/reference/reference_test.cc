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
  // 16-bit scores (no top-k) are the f32 scores rounded once, -inf included.
  for (DType out : {DType::kBf16, DType::kF16}) {
    std::vector<uint16_t> s16(scores.size(), 0x1234);
    LokiScoreArgs a16 = a;
    a16.scores = s16.data();
    a16.scores_dtype = out;
    a16.k = 0;
    ASSERT_TRUE(LokiScore(a16));
    for (size_t i = 0; i < scores.size(); ++i) ASSERT_EQ(s16[i], FloatToHalfBits(scores[i], out)) << i;
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
  a = good;
  a.math = static_cast<DecodeMath>(5);
  expect_rejected(a, "unknown math");
  a = good;
  a.merge = static_cast<DecodeMerge>(5);
  expect_rejected(a, "unknown merge");
  a = good;
  a.math = DecodeMath::kMma;
  a.merge = DecodeMerge::kCluster;
  EXPECT_EQ(ValidateSparseDecodeArgs(a), nullptr);  // speed choices: the reference accepts and ignores them

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
  l.scores_dtype = DType::kBf16;
  EXPECT_EQ(ValidateLokiScoreArgs(l), nullptr);
  l.scores_dtype = static_cast<DType>(4);
  EXPECT_NE(ValidateLokiScoreArgs(l), nullptr);
  l.scores_dtype = DType::kF16;
  l.k = 3;
  l.top_k_positions = idx.data();
  EXPECT_NE(ValidateLokiScoreArgs(l), nullptr);  // 16-bit scores with a top-k
  l.scores_dtype = DType::kF32;
  l.k = 33;
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


// ---------------------------------------------------------------------------
// Decode-step bookkeeping.

// An empty paged cache for `capacity` tokens per sequence: every slot NaN,
// shuffled pages, seq_lens 0.
PagedStorage EmptyPaged(std::mt19937_64& rng, DType dtype, int32_t batch, int32_t heads, int32_t head_dim,
                        int32_t capacity, int32_t page_size, Layout layout) {
  LogicalKv none;
  none.batch = batch;
  none.num_kv_heads = heads;
  none.head_dim = head_dim;
  none.seq_lens.assign(batch, 0);
  none.max_len = capacity;
  PagedStorage st = Page(none, dtype, page_size, layout, rng);
  return st;
}

TEST(AdvanceSeqLensReferenceTest, AddsTokensAndCountsPages) {
  std::vector<int32_t> lens = {0, 15, 16, 100};
  std::vector<int32_t> pages(4, -9);
  AdvanceSeqLensArgs a;
  a.seq_lens = lens.data();
  a.batch_size = 4;
  a.num_tokens = 1;
  a.pages = pages.data();
  a.page_size = 16;
  ASSERT_TRUE(AdvanceSeqLens(a));
  EXPECT_THAT(lens, ::testing::ElementsAre(1, 16, 17, 101));
  EXPECT_THAT(pages, ::testing::ElementsAre(1, 1, 2, 7));
  a.num_tokens = 0;
  a.pages = nullptr;
  ASSERT_TRUE(AdvanceSeqLens(a));
  EXPECT_THAT(lens, ::testing::ElementsAre(1, 16, 17, 101));
}

TEST(AppendKvReferenceTest, WritesRowsToTheirSlotsAndSkipsRowsWithoutAPage) {
  // One sequence, one head, d = 64, pages of 4 slots, page table {1, 0, -1}.
  std::mt19937_64 rng(3);
  PagedStorage st = EmptyPaged(rng, DType::kBf16, 1, 1, 64, 8, 4, Layout::kNhd);
  ASSERT_EQ(st.cache.max_pages_per_seq, 3);
  st.page_table = {1, 0, -1};
  st.cache.page_table = st.page_table.data();
  std::vector<uint16_t> src(5 * 64);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint16_t>(i + 1);
  const std::vector<int32_t> start = {3};  // positions 3..7: page 1 slot 3, page 0 slots 0..3
  AppendKvArgs a;
  a.kv = st.cache;
  a.batch_size = 1;
  a.num_tokens = 5;
  a.k_src = src.data();
  a.v_src = src.data();
  a.src_token_stride = 64;
  a.src_head_stride = 5 * 64;
  a.src_batch_stride = 5 * 64;
  a.start_positions = start.data();
  ASSERT_TRUE(AppendKv(a));
  const int64_t ps = st.cache.page_stride;
  EXPECT_EQ(st.k[1 * ps + 3 * 64 + 0], 1);      // token 0 -> page 1, slot 3
  EXPECT_EQ(st.k[0 * ps + 0 * 64 + 0], 65);     // token 1 -> page 0, slot 0
  EXPECT_EQ(st.v[0 * ps + 3 * 64 + 63], 5 * 64);  // token 4 -> page 0, slot 3
  // Positions 8..11 map to page index 2 (id -1), 12.. past the table: skipped.
  const std::vector<uint16_t> before = st.k;
  const std::vector<int32_t> late = {8};
  a.start_positions = late.data();
  ASSERT_TRUE(AppendKv(a));
  EXPECT_EQ(st.k, before);
  // Without start positions the rows go to [seq_len - num_tokens, seq_len).
  st.seq_lens[0] = 6;
  a.kv.seq_lens = st.seq_lens.data();
  a.start_positions = nullptr;
  a.num_tokens = 1;
  ASSERT_TRUE(AppendKv(a));
  EXPECT_EQ(st.k[0 * ps + 1 * 64 + 0], 1);  // position 5: page index 1 (id 0), slot 1; was token 2's row (129)
}

TEST(AppendKvReferenceTest, AppendedRowsAttendLikeTheSourceRows) {
  const uint64_t seed = 20250301;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (Layout layout : {Layout::kNhd, Layout::kHnd}) {
    const DType dtype = layout == Layout::kNhd ? DType::kBf16 : DType::kF16;
    const int32_t batch = 2, kv_heads = 2, group = 3, hq = kv_heads * group, d = 64, capacity = 80;
    PagedStorage st = EmptyPaged(rng, dtype, batch, kv_heads, d, capacity, 16, layout);
    // The logical rows appended so far, [b][h][t][d].
    LogicalKv lkv;
    lkv.batch = batch;
    lkv.num_kv_heads = kv_heads;
    lkv.head_dim = d;
    lkv.max_len = capacity;
    lkv.seq_lens.assign(batch, 0);
    lkv.k.assign(static_cast<size_t>(batch) * kv_heads * capacity * d, 0.0);
    lkv.v = lkv.k;
    // Steps of 7 (a prefill chunk) then 1 token; source rows padded to 72 elements.
    for (int32_t tokens : {7, 1, 1, 7, 1}) {
      AdvanceSeqLensArgs adv;
      adv.seq_lens = st.seq_lens.data();
      adv.batch_size = batch;
      adv.num_tokens = tokens;
      ASSERT_TRUE(AdvanceSeqLens(adv));
      const int64_t tok_stride = 72;
      std::vector<uint16_t> ks(static_cast<size_t>(batch) * kv_heads * tokens * tok_stride);
      std::vector<uint16_t> vs(ks.size());
      std::normal_distribution<float> normal;
      for (int b = 0; b < batch; ++b) {
        for (int h = 0; h < kv_heads; ++h) {
          for (int t = 0; t < tokens; ++t) {
            for (int j = 0; j < d; ++j) {
              const size_t i = ((static_cast<size_t>(b) * kv_heads + h) * tokens + t) * tok_stride + j;
              ks[i] = FloatToHalfBits(normal(rng), dtype);
              vs[i] = FloatToHalfBits(normal(rng), dtype);
              const size_t li = ((static_cast<size_t>(b) * kv_heads + h) * capacity + lkv.seq_lens[b] + t) * d + j;
              lkv.k[li] = HalfBitsToFloat(ks[i], dtype);
              lkv.v[li] = HalfBitsToFloat(vs[i], dtype);
            }
          }
        }
      }
      AppendKvArgs a;
      a.kv = st.cache;
      a.batch_size = batch;
      a.num_tokens = tokens;
      a.k_src = ks.data();
      a.v_src = vs.data();
      a.src_token_stride = tok_stride;
      a.src_head_stride = tokens * tok_stride;
      a.src_batch_stride = kv_heads * tokens * tok_stride;
      ASSERT_TRUE(AppendKv(a));
      for (int b = 0; b < batch; ++b) lkv.seq_lens[b] += tokens;
    }
    ASSERT_EQ(st.seq_lens, lkv.seq_lens);
    // Attention over every appended position equals attention over the source rows.
    const int32_t n = lkv.seq_lens[0];
    std::vector<int32_t> positions(static_cast<size_t>(batch) * kv_heads * n);
    for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int32_t>((i * 7) % n);  // a permutation
    const std::vector<float> q = RandomQueries(rng, static_cast<size_t>(batch) * hq * d, 2.0f);
    std::vector<float> o(q.size()), lse(static_cast<size_t>(batch) * hq);
    int32_t invalid = 0;
    SparseDecodeArgs s;
    s.kv = st.cache;
    s.batch_size = batch;
    s.num_q_heads = hq;
    s.q = q.data();
    s.positions = positions.data();
    s.max_list_len = n;
    s.o = o.data();
    s.lse = lse.data();
    s.num_invalid = &invalid;
    ASSERT_TRUE(SparseDecodeAttention(s));
    EXPECT_EQ(invalid, 0);
    std::vector<int32_t> all(n);
    std::iota(all.begin(), all.end(), 0);
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < hq; ++h) {
        std::vector<double> ref_o;
        double ref_lse;
        const size_t row = static_cast<size_t>(b) * hq + h;
        NaiveAttention(lkv, b, h / group, q.data() + row * d, all, 1.0 / 8.0, &ref_o, &ref_lse);
        EXPECT_LT(MaxAbsDiff(o, ref_o, row * d), 1e-6) << "b " << b << " h " << h;
        EXPECT_NEAR(lse[row], ref_lse, 1e-5 * std::max(1.0, std::abs(ref_lse)));
      }
    }
  }
}

TEST(ProjectRowsReferenceTest, HandCheckedSumsAndSharedMatrices) {
  // d = 64, rank 2: column 0 all ones (sum of x), column 1 ones on odd rows.
  const int32_t d = 64;
  std::vector<float> x(2 * d);  // two heads, one token
  for (int i = 0; i < d; ++i) {
    x[i] = static_cast<float>(i);
    x[d + i] = 1.0f;
  }
  std::vector<float> mat(static_cast<size_t>(d) * 3, 0.0f);  // one matrix shared by both heads, 3 columns
  for (int i = 0; i < d; ++i) {
    mat[i * 3 + 0] = 1.0f;
    mat[i * 3 + 1] = static_cast<float>(i % 2);
    mat[i * 3 + 2] = 100.0f;  // unused: only [0, rank) is read
  }
  std::vector<float> y(2 * 2, -1.0f);
  ProjectRowsArgs a;
  a.x = x.data();
  a.x_dtype = DType::kF32;
  a.x_head_stride = d;
  a.x_batch_stride = 2 * d;
  a.matrices = mat.data();
  a.matrix_cols = 3;
  a.heads_per_matrix = 2;
  a.batch_size = 1;
  a.num_heads = 2;
  a.num_tokens = 1;
  a.head_dim = d;
  a.rank = 2;
  a.y = y.data();
  a.y_head_stride = 2;
  a.y_batch_stride = 4;
  a.y_token_stride = 2;
  ASSERT_TRUE(ProjectRows(a));
  EXPECT_THAT(y, ::testing::ElementsAre(2016.0f, 1024.0f, 64.0f, 32.0f));
}

TEST(ProjectRowsReferenceTest, IdentityAtFullRankReproducesTheInputAtItsOffset) {
  std::mt19937_64 rng(17);
  for (DType dtype : {DType::kBf16, DType::kF16}) {
    for (int32_t d : {64, 128}) {
      const int32_t batch = 2, heads = 4, tokens = 3, cap = 10;
      std::vector<uint16_t> x(static_cast<size_t>(batch) * heads * tokens * d);
      std::normal_distribution<float> normal;
      for (uint16_t& v : x) v = FloatToHalfBits(normal(rng), dtype);
      std::vector<float> eye(static_cast<size_t>(heads / 2) * d * d, 0.0f);
      for (int m = 0; m < heads / 2; ++m) {
        for (int i = 0; i < d; ++i) eye[(static_cast<size_t>(m) * d + i) * d + i] = 1.0f;
      }
      const std::vector<int32_t> seq_lens = {3, 9};  // offsets 0 and 6
      std::vector<uint16_t> y(static_cast<size_t>(batch) * heads * cap * d, 0x7fff);
      ProjectRowsArgs a;
      a.x = x.data();
      a.x_dtype = dtype;
      a.x_token_stride = d;
      a.x_head_stride = static_cast<int64_t>(tokens) * d;
      a.x_batch_stride = static_cast<int64_t>(heads) * tokens * d;
      a.matrices = eye.data();
      a.matrix_cols = d;
      a.heads_per_matrix = 2;
      a.batch_size = batch;
      a.num_heads = heads;
      a.num_tokens = tokens;
      a.head_dim = d;
      a.rank = d;
      a.y = y.data();
      a.y_dtype = dtype;
      a.y_token_stride = d;
      a.y_head_stride = static_cast<int64_t>(cap) * d;
      a.y_batch_stride = static_cast<int64_t>(heads) * cap * d;
      a.offset_from_seq_lens = true;
      a.seq_lens = seq_lens.data();
      a.max_positions = 8;  // sequence 1's token 2 (position 8) is skipped
      ASSERT_TRUE(ProjectRows(a));
      for (int b = 0; b < batch; ++b) {
        for (int h = 0; h < heads; ++h) {
          for (int p = 0; p < cap; ++p) {
            const int t = p - (seq_lens[b] - tokens);
            const bool written = t >= 0 && t < tokens && p < 8;
            for (int j = 0; j < d; ++j) {
              const uint16_t got = y[((static_cast<size_t>(b) * heads + h) * cap + p) * d + j];
              if (written) {
                ASSERT_EQ(got, x[((static_cast<size_t>(b) * heads + h) * tokens + t) * d + j]) << b << " " << h << " " << p;
              } else {
                ASSERT_EQ(got, 0x7fff) << b << " " << h << " " << p;
              }
            }
          }
        }
      }
    }
  }
}

TEST(ComputePageBoundsReferenceTest, BoundsEveryKeyOfItsPageTightlyAndUpdatesTheLastPages) {
  const uint64_t seed = 99;
  std::mt19937_64 rng(seed);
  const int32_t batch = 2, heads = 2, d = 64, qp = 5, max_pages = 40;
  const LogicalKv lkv = MakeLogicalKv(rng, DType::kBf16, batch, heads, d, {103, 37});
  PagedStorage st = Page(lkv, DType::kBf16, 16, Layout::kHnd, rng);
  const int64_t head_stride = static_cast<int64_t>(max_pages) * d;
  const uint16_t sentinel = 0x1234;
  std::vector<uint16_t> pmax(static_cast<size_t>(batch) * heads * head_stride, sentinel), pmin(pmax);
  PageBoundsArgs a;
  a.kv = st.cache;
  a.kv.v = nullptr;  // not read
  a.batch_size = batch;
  a.quest_page_size = qp;
  a.page_max = pmax.data();
  a.page_min = pmin.data();
  a.head_stride = head_stride;
  a.seq_stride = heads * head_stride;
  a.max_pages = max_pages;
  ASSERT_TRUE(ComputePageBounds(a));
  for (int b = 0; b < batch; ++b) {
    const int pages = (lkv.seq_lens[b] + qp - 1) / qp;
    for (int h = 0; h < heads; ++h) {
      for (int p = 0; p < max_pages; ++p) {
        const size_t base = b * a.seq_stride + h * head_stride + static_cast<size_t>(p) * d;
        for (int j = 0; j < d; ++j) {
          if (p >= pages) {
            ASSERT_EQ(pmax[base + j], sentinel);  // past the sequence: not written
            continue;
          }
          const double hi = Bf16BitsToFloat(pmax[base + j]), lo = Bf16BitsToFloat(pmin[base + j]);
          bool hit_hi = false, hit_lo = false;
          for (int t = p * qp; t < std::min((p + 1) * qp, lkv.seq_lens[b]); ++t) {
            ASSERT_LE(lkv.K(b, h, t, j), hi);
            ASSERT_GE(lkv.K(b, h, t, j), lo);
            hit_hi |= lkv.K(b, h, t, j) == hi;
            hit_lo |= lkv.K(b, h, t, j) == lo;
          }
          ASSERT_TRUE(hit_hi && hit_lo) << "b " << b << " h " << h << " p " << p << " j " << j;
        }
      }
    }
  }
  // QuestScore over these bounds is >= every logit of the page.
  const std::vector<float> q = RandomQueries(rng, static_cast<size_t>(batch) * heads * d, 1.0f);
  const std::vector<int32_t> num_pages = {(103 + qp - 1) / qp, (37 + qp - 1) / qp};
  std::vector<float> scores(static_cast<size_t>(batch) * heads * max_pages);
  QuestScoreArgs qs;
  qs.q = q.data();
  qs.page_max = pmax.data();
  qs.page_min = pmin.data();
  qs.head_dim = d;
  qs.batch_size = batch;
  qs.num_q_heads = heads;
  qs.num_kv_heads = heads;
  qs.seq_stride = a.seq_stride;
  qs.head_stride = head_stride;
  qs.num_pages = num_pages.data();
  qs.max_pages = max_pages;
  qs.sm_scale = 1.0f;
  qs.scores = scores.data();
  ASSERT_TRUE(QuestScore(qs));
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < heads; ++h) {
      for (int t = 0; t < lkv.seq_lens[b]; ++t) {
        double dot = 0;
        for (int j = 0; j < d; ++j) dot += q[(static_cast<size_t>(b) * heads + h) * d + j] * lkv.K(b, h, t, j);
        ASSERT_GE(scores[(static_cast<size_t>(b) * heads + h) * max_pages + t / qp], dot - 1e-4 * (1 + std::abs(dot)));
      }
    }
  }
  // After a step that lands in a new page, last_pages = 1 rewrites only that page.
  std::fill(pmax.begin(), pmax.end(), sentinel);
  std::fill(pmin.begin(), pmin.end(), sentinel);
  a.last_pages = 1;
  ASSERT_TRUE(ComputePageBounds(a));
  for (int b = 0; b < batch; ++b) {
    const int last = (lkv.seq_lens[b] + qp - 1) / qp - 1;
    for (int p = 0; p < max_pages; ++p) {
      const uint16_t got = pmax[b * a.seq_stride + static_cast<size_t>(p) * d];
      EXPECT_EQ(got != sentinel, p == last) << "b " << b << " p " << p;
    }
  }
  // A Quest page whose KV page is gone gets max -inf and min +inf.
  st.page_table[0] = -1;  // sequence 0, positions 0..15
  a.kv.page_table = st.page_table.data();
  a.last_pages = 0;
  ASSERT_TRUE(ComputePageBounds(a));
  EXPECT_EQ(Bf16BitsToFloat(pmax[0]), -kInf);
  EXPECT_EQ(Bf16BitsToFloat(pmin[0]), kInf);
  // Page 3 covers positions 15..19: only 16..19 remain, still a valid bound.
  EXPECT_TRUE(std::isfinite(Bf16BitsToFloat(pmax[3 * d])));
}

TEST(MaskScoresReferenceTest, KeepsOnlyTheCandidatesBetweenSinksAndWindow) {
  // T = 20, sinks 2, window 4: candidates are positions [2, 16).
  const int32_t seq_len = 20;
  std::vector<float> s(24, 1.0f);
  MaskScoresArgs a;
  a.scores = s.data();
  a.num_rows = 1;
  a.num_cols = 24;
  a.seq_lens = &seq_len;
  a.sinks = 2;
  a.window = 4;
  ASSERT_TRUE(MaskScores(a));
  for (int c = 0; c < 24; ++c) EXPECT_EQ(s[c], c >= 2 && c < 16 ? 1.0f : -kInf) << c;
  // Pages of 4: page 0 = [0, 4) meets [2, 16); page 4 = [16, 20) does not.
  std::vector<float> p(6, 1.0f);
  a.scores = p.data();
  a.num_cols = 6;
  a.unit = 4;
  ASSERT_TRUE(MaskScores(a));
  EXPECT_THAT(p, ::testing::ElementsAre(1.0f, 1.0f, 1.0f, 1.0f, -kInf, -kInf));
}

// MaskScores, TopK and ComposeLists in a row, as a selection layer runs them.
TEST(ComposeListsReferenceTest, SelectionPipelineGivesDistinctInRangeListsWithoutSinksOrWindowTwice) {
  const uint64_t seed = 4242;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int32_t unit : {1, 4, 16}) {
    const int32_t batch = 3, heads = 4, sinks = 4, window = 32, k = 8;
    const std::vector<int32_t> seq_lens = {1000, 90, 3};
    const int32_t cols = (1000 + unit - 1) / unit;
    std::vector<float> scores(static_cast<size_t>(batch) * heads * cols);
    std::normal_distribution<float> normal;
    for (float& x : scores) x = normal(rng);
    MaskScoresArgs m;
    m.scores = scores.data();
    m.num_rows = batch * heads;
    m.rows_per_seq = heads;
    m.num_cols = cols;
    m.seq_lens = seq_lens.data();
    m.sinks = sinks;
    m.window = window;
    m.unit = unit;
    ASSERT_TRUE(MaskScores(m));
    std::vector<int32_t> selected(static_cast<size_t>(batch) * heads * k);
    TopKArgs t;
    t.scores = scores.data();
    t.num_rows = batch * heads;
    t.num_cols = cols;
    t.k = k;
    t.indices = selected.data();
    ASSERT_TRUE(TopK(t));
    const int32_t max_len = sinks + window + k * unit;
    std::vector<int32_t> positions(static_cast<size_t>(batch) * heads * max_len, -5), lens(batch * heads);
    ComposeListsArgs c;
    c.batch_size = batch;
    c.num_lists = heads;
    c.seq_lens = seq_lens.data();
    c.sinks = sinks;
    c.window = window;
    c.selected = selected.data();
    c.num_selected = k;
    c.unit = unit;
    c.positions = positions.data();
    c.list_lens = lens.data();
    c.max_list_len = max_len;
    ASSERT_TRUE(ComposeLists(c));
    for (int b = 0; b < batch; ++b) {
      const int32_t len = seq_lens[b];
      for (int h = 0; h < heads; ++h) {
        const size_t li = static_cast<size_t>(b) * heads + h;
        const int32_t* list = positions.data() + li * max_len;
        std::vector<char> seen(len, 0);
        int32_t in_sinks_or_window = 0;
        for (int i = 0; i < lens[li]; ++i) {
          ASSERT_GE(list[i], 0);
          ASSERT_LT(list[i], len);
          ASSERT_FALSE(seen[list[i]]) << "position " << list[i] << " twice, unit " << unit;
          seen[list[i]] = 1;
          in_sinks_or_window += list[i] < sinks || list[i] >= len - window;
        }
        for (int i = lens[li]; i < max_len; ++i) ASSERT_EQ(list[i], -5);  // left unchanged
        // Every sink and window position is there, once.
        const int32_t expected = std::min(len, sinks) + std::max(0, len - std::max(sinks, len - window));
        EXPECT_EQ(in_sinks_or_window, expected);
        // The selection of a long sequence fills its budget (at most two
        // entries are pages cut by the sinks or the window); of the shortest,
        // nothing is left.
        const int32_t candidates = std::max(0, len - window - sinks);
        const int32_t picked = lens[li] - expected;
        EXPECT_LE(picked, k * unit);
        if (unit == 1) {
          EXPECT_EQ(picked, std::min(k, candidates));
        }
        if (len == 1000) {
          EXPECT_GE(picked, (k - 2) * unit);
        }
        if (len == 3) {
          EXPECT_EQ(lens[li], 3);
        }
        // With at least k candidate columns, the top-k of the masked row never
        // picks a sink or window column.
        int32_t kept_cols = 0;
        for (int32_t col = 0; col < cols; ++col) kept_cols += col * unit < len - window && (col + 1) * unit > sinks;
        for (int i = 0; i < k && kept_cols >= k; ++i) {
          const int32_t e = selected[li * k + i];
          EXPECT_TRUE(e * unit < len - window && (e + 1) * unit > sinks) << "entry " << e;
        }
      }
    }
  }
}

TEST(ComposeListsReferenceTest, HandCheckedLists) {
  const std::vector<int32_t> seq_lens = {20, 3, 0};
  const std::vector<int32_t> selected = {5, 3, -1, 17, 0,  // sequence 0
                                         1, 0, 2, 0, 1,    // sequence 1: nothing between sinks and window
                                         4, 4, 4, 4, 4};   // sequence 2: empty
  std::vector<int32_t> positions(3 * 30, -5), lens(3, -5);
  ComposeListsArgs a;
  a.batch_size = 3;
  a.num_lists = 1;
  a.seq_lens = seq_lens.data();
  a.sinks = 2;
  a.window = 4;
  a.selected = selected.data();
  a.num_selected = 5;
  a.positions = positions.data();
  a.list_lens = lens.data();
  a.max_list_len = 30;
  ASSERT_TRUE(ComposeLists(a));
  EXPECT_THAT(lens, ::testing::ElementsAre(8, 3, 0));
  EXPECT_THAT(std::vector<int32_t>(positions.begin(), positions.begin() + 8),
              ::testing::ElementsAre(0, 1, 16, 17, 18, 19, 5, 3));
  EXPECT_THAT(std::vector<int32_t>(positions.begin() + 30, positions.begin() + 33), ::testing::ElementsAre(0, 1, 2));
  // Pages of 4: page 1 -> 4..7, page 3 -> 12..15, page 0 -> 2..3 (0, 1 are sinks), page 4 is the window.
  const std::vector<int32_t> pages = {1, 3, 4, 0};
  a.batch_size = 1;
  a.selected = pages.data();
  a.num_selected = 4;
  a.unit = 4;
  ASSERT_TRUE(ComposeLists(a));
  EXPECT_EQ(lens[0], 16);
  EXPECT_THAT(std::vector<int32_t>(positions.begin(), positions.begin() + 16),
              ::testing::ElementsAre(0, 1, 16, 17, 18, 19, 4, 5, 6, 7, 12, 13, 14, 15, 2, 3));
  // No selection: sinks and window only.
  a.selected = nullptr;
  ASSERT_TRUE(ComposeLists(a));
  EXPECT_EQ(lens[0], 6);
}

TEST(ValidationTest, StepArgumentsAreRejectedAndNothingIsWritten) {
  std::vector<int32_t> lens = {5, 6};
  AdvanceSeqLensArgs adv;
  adv.seq_lens = lens.data();
  adv.batch_size = 2;
  adv.pages = lens.data();
  adv.page_size = 0;
  EXPECT_NE(ValidateAdvanceSeqLensArgs(adv), nullptr);
  EXPECT_FALSE(AdvanceSeqLens(adv));
  adv.page_size = 16;
  adv.num_tokens = -1;
  EXPECT_FALSE(AdvanceSeqLens(adv));
  adv.num_tokens = 1;
  adv.seq_lens = nullptr;
  EXPECT_FALSE(AdvanceSeqLens(adv));
  EXPECT_THAT(lens, ::testing::ElementsAre(5, 6));

  std::mt19937_64 rng(1);
  PagedStorage st = EmptyPaged(rng, DType::kBf16, 1, 1, 64, 32, 16, Layout::kNhd);
  const std::vector<uint16_t> before = st.k;
  std::vector<uint16_t> src(64 * 2, 1);
  AppendKvArgs ap;
  ap.kv = st.cache;
  ap.batch_size = 1;
  ap.num_tokens = 1;
  ap.k_src = src.data();
  ap.v_src = src.data();
  ap.src_token_stride = 64;
  ASSERT_EQ(ValidateAppendKvArgs(ap), nullptr);
  auto append_rejected = [&](AppendKvArgs a, const char* what) {
    EXPECT_NE(ValidateAppendKvArgs(a), nullptr) << what;
    EXPECT_FALSE(AppendKv(a)) << what;
    EXPECT_EQ(st.k, before) << what;
  };
  AppendKvArgs a = ap;
  a.k_src = nullptr;
  append_rejected(a, "null source");
  a = ap;
  a.src_token_stride = 60;
  append_rejected(a, "stride not a multiple of 8");
  a = ap;
  a.v_src = src.data() + 1;
  append_rejected(a, "misaligned source");
  a = ap;
  a.num_tokens = 0;
  append_rejected(a, "no tokens");
  a = ap;
  a.kv.seq_lens = nullptr;
  append_rejected(a, "no seq_lens and no start positions");
  a.start_positions = lens.data();
  EXPECT_EQ(ValidateAppendKvArgs(a), nullptr);  // start positions replace seq_lens
  a = ap;
  a.kv.head_dim = 96;
  append_rejected(a, "head_dim 96");

  std::vector<float> x(64, 1.0f), mat(64 * 64, 1.0f), y(64, 7.0f);
  ProjectRowsArgs pr;
  pr.x = x.data();
  pr.matrices = mat.data();
  pr.matrix_cols = 64;
  pr.batch_size = 1;
  pr.num_heads = 1;
  pr.num_tokens = 1;
  pr.head_dim = 64;
  pr.rank = 32;
  pr.y = y.data();
  pr.y_token_stride = 32;
  ASSERT_EQ(ValidateProjectRowsArgs(pr), nullptr);
  auto project_rejected = [&](ProjectRowsArgs p, const char* what) {
    EXPECT_NE(ValidateProjectRowsArgs(p), nullptr) << what;
    EXPECT_FALSE(ProjectRows(p)) << what;
    EXPECT_THAT(y, ::testing::Each(7.0f)) << what;
  };
  ProjectRowsArgs p = pr;
  p.rank = 65;
  project_rejected(p, "rank > head_dim");
  p = pr;
  p.matrix_cols = 16;
  project_rejected(p, "matrix_cols < rank");
  p = pr;
  p.heads_per_matrix = 2;
  project_rejected(p, "heads not a multiple of heads_per_matrix");
  p = pr;
  p.y_token_stride = 31;
  project_rejected(p, "y_token_stride < rank");
  p = pr;
  p.offset_from_seq_lens = true;
  project_rejected(p, "offset without seq_lens");
  p = pr;
  p.x_dtype = static_cast<DType>(9);
  project_rejected(p, "bad x dtype");

  std::vector<uint16_t> bounds(4 * 64, 3);
  PageBoundsArgs pb;
  pb.kv = st.cache;
  pb.batch_size = 1;
  pb.page_max = bounds.data();
  pb.page_min = bounds.data();
  pb.max_pages = 4;
  pb.head_stride = 4 * 64;
  ASSERT_EQ(ValidatePageBoundsArgs(pb), nullptr);
  auto bounds_rejected = [&](PageBoundsArgs b, const char* what) {
    EXPECT_NE(ValidatePageBoundsArgs(b), nullptr) << what;
    EXPECT_FALSE(ComputePageBounds(b)) << what;
    EXPECT_THAT(bounds, ::testing::Each(3)) << what;
  };
  PageBoundsArgs b = pb;
  b.quest_page_size = 0;
  bounds_rejected(b, "quest page size 0");
  b = pb;
  b.head_stride = 3 * 64;
  bounds_rejected(b, "head_stride < max_pages * head_dim");
  b = pb;
  b.page_min = bounds.data() + 1;
  bounds_rejected(b, "misaligned page_min");
  b = pb;
  b.last_pages = -1;
  bounds_rejected(b, "negative last_pages");
  b = pb;
  b.kv.seq_lens = nullptr;
  bounds_rejected(b, "null seq_lens");

  std::vector<float> scores(8, 2.0f);
  MaskScoresArgs ms;
  ms.scores = scores.data();
  ms.num_rows = 2;
  ms.rows_per_seq = 2;
  ms.num_cols = 4;
  ms.seq_lens = lens.data();
  ASSERT_EQ(ValidateMaskScoresArgs(ms), nullptr);
  MaskScoresArgs m = ms;
  m.rows_per_seq = 3;
  EXPECT_FALSE(MaskScores(m));
  m = ms;
  m.unit = 0;
  EXPECT_FALSE(MaskScores(m));
  m = ms;
  m.row_stride = 3;
  EXPECT_FALSE(MaskScores(m));
  m = ms;
  m.window = -1;
  EXPECT_FALSE(MaskScores(m));
  EXPECT_THAT(scores, ::testing::Each(2.0f));

  std::vector<int32_t> positions(10, -5), list_lens(1, -5), sel(2, 0);
  ComposeListsArgs cl;
  cl.batch_size = 1;
  cl.num_lists = 1;
  cl.seq_lens = lens.data();
  cl.sinks = 2;
  cl.window = 4;
  cl.selected = sel.data();
  cl.num_selected = 2;
  cl.unit = 2;
  cl.positions = positions.data();
  cl.list_lens = list_lens.data();
  cl.max_list_len = 10;
  ASSERT_EQ(ValidateComposeListsArgs(cl), nullptr);
  ComposeListsArgs c = cl;
  c.max_list_len = 9;  // < 2 + 4 + 2 * 2
  EXPECT_FALSE(ComposeLists(c));
  c.selected = nullptr;
  EXPECT_EQ(ValidateComposeListsArgs(c), nullptr);  // without a selection 6 suffice
  c = cl;
  c.num_lists = 0;
  EXPECT_FALSE(ComposeLists(c));
  c = cl;
  c.list_lens = nullptr;
  EXPECT_FALSE(ComposeLists(c));
  EXPECT_THAT(positions, ::testing::Each(-5));
  EXPECT_THAT(list_lens, ::testing::Each(-5));
}

}  // namespace
}  // namespace kvrecall::gpu::reference
