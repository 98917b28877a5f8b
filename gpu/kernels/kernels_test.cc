// GPU tests of the gpu/kernels launchers against the CPU references
// (gpu/reference/) over a grid of shapes, on fresh random data (never zeros),
// with poisoned outputs (NaN floats, -1 indices) so that an unwritten element
// fails; ‖out − ref‖ / ‖ref‖ must be within bf16 tolerance and NaN never
// passes. Also the launchers' argument validation and CUDA-graph capture
// (which fails if a launcher allocates or synchronizes). Every test skips
// without a CUDA device.

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "gpu/kernels/decode_attention.h"
#include "gpu/kernels/decode_attention_internal.h"
#include "gpu/kernels/kernel_args.h"
#include "gpu/kernels/loki_score.h"
#include "gpu/kernels/merge_states.h"
#include "gpu/kernels/quest_score.h"
#include "gpu/kernels/step_kernels.h"
#include "gpu/kernels/top_k.h"
#include "gpu/reference/half_convert.h"
#include "gpu/reference/reference.h"

namespace kvrecall::gpu {
namespace {

using reference::FloatToHalfBits;
using reference::HalfBitsToFloat;

constexpr float kInf = std::numeric_limits<float>::infinity();
// Relative L2 error allowed for f32 outputs computed from bf16/f16 inputs
// with f32 accumulation: half a bf16 ulp at 1.0 (the reference is float64).
constexpr double kTol = 2e-3;

#define KVR_ASSERT_CUDA(expr)                                                  \
  do {                                                                         \
    const cudaError_t kvr_e_ = (expr);                                         \
    ASSERT_EQ(kvr_e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(kvr_e_); \
  } while (0)

bool HasDevice() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();  // clear the error of a failed query
  return ok;
}

#define SKIP_WITHOUT_DEVICE() \
  if (!HasDevice()) GTEST_SKIP() << "no CUDA device"

// Owning device array (test-only RAII).
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) { Allocate(n); }
  explicit DeviceArray(const std::vector<T>& host) {
    Allocate(host.size());
    Upload(host);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  void Allocate(size_t n) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = n;
    if (n > 0 && cudaMalloc(&ptr_, n * sizeof(T)) != cudaSuccess) {
      ptr_ = nullptr;
      ADD_FAILURE() << "cudaMalloc of " << n * sizeof(T) << " bytes failed";
    }
  }
  void Upload(const std::vector<T>& host) {
    ASSERT_EQ(host.size(), size_);
    if (size_ > 0) KVR_ASSERT_CUDA(cudaMemcpy(ptr_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> Download() const {
    std::vector<T> host(size_);
    if (size_ > 0) {
      const cudaError_t e = cudaMemcpy(host.data(), ptr_, size_ * sizeof(T), cudaMemcpyDeviceToHost);
      EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
    }
    return host;
  }
  // Fills every byte (0xff: NaN floats, -1 ints).
  void Poison(int byte = 0xff) {
    if (size_ > 0) KVR_ASSERT_CUDA(cudaMemset(ptr_, byte, size_ * sizeof(T)));
  }
  T* get() const { return static_cast<T*>(ptr_); }
  size_t size() const { return size_; }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

// Raw workspace of the given size (nullptr when 0).
class Workspace {
 public:
  explicit Workspace(size_t bytes) : buf_((bytes + 15) / 16) {}
  void* get() const { return buf_.size() > 0 ? static_cast<void*>(buf_.get()) : nullptr; }

 private:
  DeviceArray<uint4> buf_;
};

double RelErr(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = static_cast<double>(got[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  if (den == 0) return std::sqrt(num);  // NaN stays NaN
  return std::sqrt(num / den);
}

// LSE values: -inf must match exactly; finite ones within 1e-3 absolute.
// Returns the number of mismatches.
int LseMismatches(const std::vector<float>& got, const std::vector<float>& ref) {
  int bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i])) {
      bad += got[i] != ref[i];
    } else {
      bad += !(std::abs(got[i] - ref[i]) <= 1e-3 * std::max(1.0f, std::abs(ref[i])));
    }
  }
  return bad;
}

// Scores with -inf padding: -inf must match exactly, the finite part within kTol.
void ExpectScoresNear(const std::vector<float>& got, const std::vector<float>& ref, const std::string& what) {
  std::vector<float> g, r;
  int inf_mismatch = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i])) {
      inf_mismatch += got[i] != ref[i];
    } else {
      g.push_back(got[i]);
      r.push_back(ref[i]);
    }
  }
  EXPECT_EQ(inf_mismatch, 0) << what;
  EXPECT_LE(RelErr(g, r), kTol) << what;
}

// Checks GPU top-k rows against the reference scores with a tolerance for
// near-ties between the GPU's f32 and the reference's float64 logits.
void ExpectTopKRows(const std::vector<float>& ref_scores, int64_t rows, int32_t n, const std::vector<int32_t>& got,
                    int32_t k, const std::string& what) {
  double max_abs = 0;
  for (float s : ref_scores) {
    if (std::isfinite(s)) max_abs = std::max(max_abs, static_cast<double>(std::abs(s)));
  }
  const double tol = 1e-4 * (1.0 + max_abs);
  for (int64_t r = 0; r < rows; ++r) {
    const std::string err =
        reference::CheckTopKSelection(ref_scores.data() + r * n, n, got.data() + r * k, k, tol);
    ASSERT_EQ(err, "") << what << " row " << r;
  }
}

// "k1v1 k2v2 ...": a trace label built by appending (GCC 12 warns falsely
// on chains of std::string operator+ here).
std::string Label(std::initializer_list<std::pair<const char*, int64_t>> parts) {
  std::string s;
  for (const auto& [key, value] : parts) {
    s += key;
    s += std::to_string(value);
    s += ' ';
  }
  return s;
}

std::string DTypeName(DType d) { return d == DType::kBf16 ? "bf16" : (d == DType::kF16 ? "f16" : "f32"); }

// The decode-attention inner loops and merges, each run against the same reference.
struct DecodeVariant {
  DecodeMath math;
  DecodeMerge merge;
  const char* name;
};
constexpr DecodeVariant kDecodeVariants[] = {
    {DecodeMath::kAuto, DecodeMerge::kAuto, "auto"},
    {DecodeMath::kFma, DecodeMerge::kKernel, "fma+merge kernel"},
    {DecodeMath::kMma, DecodeMerge::kKernel, "mma+merge kernel"},
    {DecodeMath::kFma, DecodeMerge::kCluster, "fma+cluster merge"},
    {DecodeMath::kMma, DecodeMerge::kCluster, "mma+cluster merge"},
};

std::vector<float> RandomNormal(std::mt19937_64& rng, size_t n, float stddev) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> x(n);
  for (float& v : x) v = normal(rng);
  return x;
}

std::vector<uint16_t> RandomHalf(std::mt19937_64& rng, size_t n, DType dtype, float stddev = 1.0f) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<uint16_t> x(n);
  for (uint16_t& v : x) v = FloatToHalfBits(normal(rng), dtype);
  return x;
}

// A paged KV cache on the host and its device mirror. Pages are shuffled in
// the pool; slots past a sequence's end and unused pages hold NaN, so a read
// outside the valid tokens poisons the result.
struct PagedKv {
  std::vector<uint16_t> k, v;
  std::vector<int32_t> page_table, seq_lens;
  PagedKvCache host;  // host pointers (reference)
  DeviceArray<uint16_t> dk, dv;
  DeviceArray<int32_t> dpage_table, dseq_lens;
  PagedKvCache dev;   // device pointers (kernels)

  void Build(std::mt19937_64& rng, DType dtype, int32_t head_dim, int32_t num_kv_heads,
             const std::vector<int32_t>& lens, int32_t page_size, bool hnd) {
    seq_lens = lens;
    const int32_t max_len = *std::max_element(lens.begin(), lens.end());
    const int32_t batch = static_cast<int32_t>(lens.size());
    const int32_t max_pages = std::max(1, (max_len + page_size - 1) / page_size);
    const int32_t num_pages = batch * max_pages + 3;
    std::vector<int32_t> perm(num_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    page_table.assign(perm.begin(), perm.begin() + static_cast<size_t>(batch) * max_pages);
    host = PagedKvCache{};
    host.dtype = dtype;
    host.head_dim = head_dim;
    host.num_kv_heads = num_kv_heads;
    host.page_size = page_size;
    host.num_pages = num_pages;
    host.max_pages_per_seq = max_pages;
    if (hnd) {
      SetHndStrides(&host);
    } else {
      SetNhdStrides(&host);
    }
    const size_t elems = static_cast<size_t>(num_pages) * host.page_stride;
    const uint16_t nan_bits = FloatToHalfBits(std::nanf(""), dtype);
    k.assign(elems, nan_bits);
    v.assign(elems, nan_bits);
    std::normal_distribution<float> normal;
    for (int32_t b = 0; b < batch; ++b) {
      for (int32_t t = 0; t < lens[b]; ++t) {
        const int64_t page = page_table[static_cast<size_t>(b) * max_pages + t / page_size];
        for (int32_t h = 0; h < num_kv_heads; ++h) {
          const int64_t off = page * host.page_stride + (t % page_size) * host.token_stride + h * host.head_stride;
          for (int32_t d = 0; d < head_dim; ++d) {
            k[off + d] = FloatToHalfBits(normal(rng), dtype);
            v[off + d] = FloatToHalfBits(normal(rng), dtype);
          }
        }
      }
    }
    host.k = k.data();
    host.v = v.data();
    host.page_table = page_table.data();
    host.seq_lens = seq_lens.data();
    Sync();
  }

  // (Re)uploads the host arrays and points both views at the current ones.
  void Sync() {
    host.k = k.data();
    host.v = v.data();
    host.page_table = page_table.data();
    host.seq_lens = seq_lens.data();
    dk.Allocate(k.size());
    dk.Upload(k);
    dv.Allocate(v.size());
    dv.Upload(v);
    dpage_table.Allocate(page_table.size());
    dpage_table.Upload(page_table);
    dseq_lens.Allocate(seq_lens.size());
    dseq_lens.Upload(seq_lens);
    dev = host;
    dev.k = dk.get();
    dev.v = dv.get();
    dev.page_table = dpage_table.get();
    dev.seq_lens = dseq_lens.get();
  }
};

// ---------------------------------------------------------------------------
// Split planning (host code: runs without a device).

TEST(DecodePlanTest, ClusterSplitCoversTheListWithAPowerOfTwoBlocks) {
  using kernels::PlanClusterSplit;
  // Batch 1, 8 lists, one wave of 528 blocks, clusters of 16: the chunks of
  // the wave planner (128 tokens), 16 blocks of which the last 5 are empty.
  kernels::DecodeSplit s = PlanClusterSplit(8, 1310, 0, 528, true, 16);
  EXPECT_EQ(s.num_chunks, 16);
  EXPECT_EQ(s.chunk_tokens, 128);
  // Portable clusters only (8): longer chunks.
  s = PlanClusterSplit(8, 1310, 0, 528, true, 8);
  EXPECT_EQ(s.num_chunks, 8);
  EXPECT_EQ(s.chunk_tokens, 192);
  // kAuto declines chunks over 256 tokens, grids over one wave, lists over 16 * 1024 tokens;
  // kCluster takes the first two.
  EXPECT_EQ(PlanClusterSplit(8, 6553, 0, 528, true, 16).num_chunks, 0);
  s = PlanClusterSplit(8, 6553, 0, 528, false, 16);
  EXPECT_EQ(s.num_chunks, 16);
  EXPECT_EQ(s.chunk_tokens, 416);
  EXPECT_EQ(PlanClusterSplit(256, 327, 0, 528, true, 16).num_chunks, 0);
  EXPECT_EQ(PlanClusterSplit(256, 327, 0, 528, false, 16).num_chunks, 4);
  EXPECT_EQ(PlanClusterSplit(8, 20000, 0, 528, false, 16).num_chunks, 0);
  // Nothing to merge, or no clusters on the device.
  EXPECT_EQ(PlanClusterSplit(8, 100, 0, 528, false, 16).num_chunks, 0);
  EXPECT_EQ(PlanClusterSplit(8, 3000, 0, 528, false, 1).num_chunks, 0);
  // Requested splits are kept, within [ceil(tokens / 1024), cluster cap].
  s = PlanClusterSplit(2, 5000, 3, 528, false, 16);
  EXPECT_EQ(s.num_chunks, 8);  // 5 chunks of 1024 (at least ceil(5000 / 1024)), in a cluster of 8
  EXPECT_EQ(s.chunk_tokens, 1024);
  // Invariants over a sweep.
  for (int32_t max_cluster : {2, 8, 12, 16}) {
    for (int32_t tokens = 1; tokens <= 17000; tokens += 97) {
      for (int32_t splits : {0, 1, 3, 9, 40}) {
        for (bool auto_choice : {false, true}) {
          s = PlanClusterSplit(16, tokens, splits, 528, auto_choice, max_cluster);
          if (s.num_chunks == 0) continue;
          SCOPED_TRACE(Label({{"max", max_cluster}, {"tokens", tokens}, {"splits", splits}, {"auto", auto_choice}}));
          ASSERT_GE(s.num_chunks, 2);
          ASSERT_EQ(s.num_chunks & (s.num_chunks - 1), 0);  // power of two
          ASSERT_LE(s.num_chunks, max_cluster);
          ASSERT_EQ(s.chunk_tokens % 32, 0);
          ASSERT_LE(s.chunk_tokens, kernels::kMaxChunkTokens);
          ASSERT_GE(static_cast<int64_t>(s.num_chunks) * s.chunk_tokens, tokens);
          ASSERT_LT(static_cast<int64_t>(s.num_chunks / 2) * s.chunk_tokens, tokens);  // at most half the blocks idle
          if (auto_choice) {
            ASSERT_LE(s.chunk_tokens, kernels::kClusterAutoMaxChunkTokens);
            ASSERT_LE(16 * s.num_chunks, 528);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Sparse decode attention.

struct SparseCase {
  DType dtype;
  int32_t head_dim;
  int32_t group;
  int32_t num_kv_heads;
  int32_t page_size;
  bool hnd;
  bool per_kv_head;
  int32_t max_list_len;
  int32_t num_splits;
  int32_t batch;
  float q_scale;
  std::string Name() const {
    return DTypeName(dtype) + " d" + std::to_string(head_dim) + " g" + std::to_string(group) + " hkv" +
           std::to_string(num_kv_heads) + " ps" + std::to_string(page_size) + (hnd ? " hnd" : " nhd") +
           (per_kv_head ? " kvlists" : " qlists") + " L" + std::to_string(max_list_len) + " splits" +
           std::to_string(num_splits) + " b" + std::to_string(batch) + " qs" + std::to_string(q_scale);
  }
};

std::vector<SparseCase> SparseCases() {
  std::vector<SparseCase> cases;
  const int32_t page_sizes[] = {1, 16, 256, 7, 64};
  const int32_t lens[] = {1, 37, 1500, 3000, 300};
  const int32_t splits[] = {0, 0, 1, 5};
  int i = 0;
  for (DType dtype : {DType::kBf16, DType::kF16}) {
    for (int32_t d : {64, 128}) {
      for (int32_t g : {1, 2, 3, 4, 8}) {
        SparseCase c;
        c.dtype = dtype;
        c.head_dim = d;
        c.group = g;
        c.num_kv_heads = g == 8 ? 1 : 2;
        c.page_size = page_sizes[i % 5];
        c.hnd = i % 2 == 1;
        c.per_kv_head = (i / 2) % 2 == 0;
        c.max_list_len = lens[i % 5];
        c.num_splits = splits[i % 4];
        c.batch = 3;
        c.q_scale = i % 3 == 0 ? 4.0f : 1.0f;
        cases.push_back(c);
        ++i;
      }
    }
  }
  // Long lists split over many blocks, empty lists, larger batch.
  cases.push_back({DType::kBf16, 128, 4, 2, 16, false, true, 9000, 0, 2, 2.0f});
  cases.push_back({DType::kF16, 64, 2, 2, 32, true, false, 5000, 3, 2, 1.0f});
  cases.push_back({DType::kBf16, 128, 4, 2, 16, false, true, 0, 0, 2, 1.0f});
  cases.push_back({DType::kBf16, 128, 1, 4, 16, false, true, 200, 0, 9, 1.0f});
  return cases;
}

TEST(SparseDecodeAttentionTest, MatchesReferenceOverShapeGrid) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const SparseCase& c : SparseCases()) {
    SCOPED_TRACE(c.Name());
    const int32_t hq = c.num_kv_heads * c.group;
    // Sequence lengths around the list length, one shorter than the list.
    std::vector<int32_t> seq_lens;
    for (int32_t b = 0; b < c.batch; ++b) {
      const int32_t base = std::max(c.max_list_len, 1);
      seq_lens.push_back(b % 3 == 0 ? 2 * base + 13 : (b % 3 == 1 ? base : std::max(1, base / 2)));
    }
    PagedKv kv;
    kv.Build(rng, c.dtype, c.head_dim, c.num_kv_heads, seq_lens, c.page_size, c.hnd);
    const int32_t num_lists = c.per_kv_head ? c.num_kv_heads : hq;
    const size_t lists = static_cast<size_t>(c.batch) * num_lists;
    std::vector<int32_t> positions(std::max<size_t>(lists * c.max_list_len, 1), -1);
    std::vector<int32_t> list_lens(lists);
    for (int32_t b = 0; b < c.batch; ++b) {
      std::vector<int32_t> all(seq_lens[b]);
      std::iota(all.begin(), all.end(), 0);
      for (int32_t l = 0; l < num_lists; ++l) {
        const size_t li = static_cast<size_t>(b) * num_lists + l;
        const int32_t cap = std::min(c.max_list_len, seq_lens[b]);
        int32_t len = l == 0 ? cap : static_cast<int32_t>(rng() % (cap + 1));
        if (b == 1 && l == num_lists - 1) len = 0;  // an empty list
        list_lens[li] = len;
        // A random subset of `len` distinct positions (partial Fisher-Yates).
        for (int32_t i = 0; i < len; ++i) std::swap(all[i], all[i + rng() % (all.size() - i)]);
        std::copy(all.begin(), all.begin() + len, positions.begin() + li * c.max_list_len);
      }
    }
    const std::vector<float> q = RandomNormal(rng, static_cast<size_t>(c.batch) * hq * c.head_dim, c.q_scale);

    SparseDecodeArgs ref;
    ref.kv = kv.host;
    ref.batch_size = c.batch;
    ref.num_q_heads = hq;
    ref.q = q.data();
    ref.lists_per_kv_head = c.per_kv_head;
    ref.positions = positions.data();
    ref.list_lens = list_lens.data();
    ref.max_list_len = c.max_list_len;
    ref.num_splits = c.num_splits;
    std::vector<float> ref_o(q.size()), ref_lse(static_cast<size_t>(c.batch) * hq);
    ref.o = ref_o.data();
    ref.lse = ref_lse.data();
    ASSERT_TRUE(reference::SparseDecodeAttention(ref));

    for (const DecodeVariant& v : kDecodeVariants) {
      SCOPED_TRACE(v.name);
      DeviceArray<float> dq(q), d_o(q.size()), d_lse(ref_lse.size());
      DeviceArray<int32_t> dpos(positions), dlens(list_lens), dinvalid(1);
      d_o.Poison();
      d_lse.Poison();
      dinvalid.Poison(0);
      SparseDecodeArgs a = ref;
      a.kv = kv.dev;
      a.q = dq.get();
      a.positions = dpos.get();
      a.list_lens = dlens.get();
      a.o = d_o.get();
      a.lse = d_lse.get();
      a.num_invalid = dinvalid.get();
      a.math = v.math;
      a.merge = v.merge;
      Workspace ws(SparseDecodeAttentionWorkspaceBytes(a));
      KVR_ASSERT_CUDA(SparseDecodeAttention(a, ws.get(), nullptr));
      KVR_ASSERT_CUDA(cudaDeviceSynchronize());
      EXPECT_LE(RelErr(d_o.Download(), ref_o), kTol);
      EXPECT_EQ(LseMismatches(d_lse.Download(), ref_lse), 0);
      EXPECT_EQ(dinvalid.Download()[0], 0);
    }
  }
}

TEST(SparseDecodeAttentionTest, SkipsAndCountsInvalidPositionsAndPages) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  PagedKv kv;
  kv.Build(rng, DType::kBf16, 128, 2, {500, 300}, 16, false);
  // Sequence 0's page 3 points outside the pool, sequence 1's page 2 is -1.
  kv.page_table[3] = kv.host.num_pages + 5;
  kv.page_table[kv.host.max_pages_per_seq + 2] = -1;
  kv.Sync();
  const int32_t hq = 8, max_len = 400;
  std::vector<int32_t> positions(2 * 2 * max_len);
  std::vector<int32_t> list_lens = {400, 399, 7, 401};  // 401 > max_len: clamped and counted
  for (size_t i = 0; i < positions.size(); ++i) {
    const int32_t b = static_cast<int32_t>(i / (2 * max_len));
    const int32_t r = static_cast<int32_t>(rng() % 20);
    // Mostly valid positions, some negative, some past the sequence end.
    positions[i] = r == 0 ? -3 : (r == 1 ? 500 + static_cast<int32_t>(rng() % 50) : static_cast<int32_t>(rng() % (b == 0 ? 500 : 300)));
  }
  // Positions must be distinct within a list: repeats become -1 (invalid).
  for (size_t li = 0; li < 4; ++li) {
    std::vector<char> seen(600, 0);
    for (int32_t i = 0; i < max_len; ++i) {
      int32_t& p = positions[li * max_len + i];
      if (p < 0 || p >= 600) continue;
      if (seen[p]) {
        p = -1;
      } else {
        seen[p] = 1;
      }
    }
  }
  const std::vector<float> q = RandomNormal(rng, 2 * hq * 128, 2.0f);
  SparseDecodeArgs ref;
  ref.kv = kv.host;
  ref.batch_size = 2;
  ref.num_q_heads = hq;
  ref.q = q.data();
  ref.positions = positions.data();
  ref.list_lens = list_lens.data();
  ref.max_list_len = max_len;
  std::vector<float> ref_o(q.size()), ref_lse(2 * hq);
  int32_t ref_invalid = 0;
  ref.o = ref_o.data();
  ref.lse = ref_lse.data();
  ref.num_invalid = &ref_invalid;
  ASSERT_TRUE(reference::SparseDecodeAttention(ref));
  ASSERT_GT(ref_invalid, 10);
  for (const DecodeVariant& v : kDecodeVariants) {
    for (int32_t splits : {1, 4}) {
      SCOPED_TRACE(v.name);
      DeviceArray<float> dq(q), d_o(q.size()), d_lse(ref_lse.size());
      DeviceArray<int32_t> dpos(positions), dlens(list_lens), dinvalid(1);
      d_o.Poison();
      d_lse.Poison();
      dinvalid.Poison(0);
      SparseDecodeArgs a = ref;
      a.kv = kv.dev;
      a.q = dq.get();
      a.positions = dpos.get();
      a.list_lens = dlens.get();
      a.num_splits = splits;
      a.o = d_o.get();
      a.lse = d_lse.get();
      a.num_invalid = dinvalid.get();
      a.math = v.math;
      a.merge = v.merge;
      Workspace ws(SparseDecodeAttentionWorkspaceBytes(a));
      KVR_ASSERT_CUDA(SparseDecodeAttention(a, ws.get(), nullptr));
      KVR_ASSERT_CUDA(cudaDeviceSynchronize());
      EXPECT_LE(RelErr(d_o.Download(), ref_o), kTol) << "splits " << splits;
      EXPECT_EQ(LseMismatches(d_lse.Download(), ref_lse), 0) << "splits " << splits;
      EXPECT_EQ(dinvalid.Download()[0], ref_invalid) << "splits " << splits;
    }
  }
}

// ---------------------------------------------------------------------------
// Dense decode attention with scores and top-k.

TEST(DenseDecodeAttentionTest, MatchesReferenceWithScoresAndTopK) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  struct Case {
    DType dtype;
    int32_t head_dim, group, num_kv_heads, page_size;
    bool hnd;
    int32_t max_seq_len, top_k, num_splits;
    bool scores_in_workspace;
  };
  const Case cases[] = {
      {DType::kBf16, 128, 4, 2, 16, false, 5000, 64, 0, false},
      {DType::kF16, 128, 1, 3, 1, true, 1200, 1, 0, false},
      {DType::kBf16, 64, 3, 2, 256, true, 7000, 500, 2, true},
      {DType::kF16, 64, 8, 1, 64, false, 3000, 0, 0, false},
      {DType::kBf16, 128, 2, 2, 7, true, 2100, 2048, 1, true},
      {DType::kF16, 128, 5, 1, 16, false, 40000, 2048, 0, false},
  };
  for (const Case& c : cases) {
    const std::string name = DTypeName(c.dtype) + " d" + std::to_string(c.head_dim) + " g" +
                             std::to_string(c.group) + " ps" + std::to_string(c.page_size) + " n" +
                             std::to_string(c.max_seq_len) + " k" + std::to_string(c.top_k);
    SCOPED_TRACE(name);
    const int32_t batch = 3, hq = c.num_kv_heads * c.group;
    // One full sequence, one shorter, one shorter than top_k when possible.
    const std::vector<int32_t> seq_lens = {c.max_seq_len, c.max_seq_len * 2 / 3 + 1,
                                           std::max(1, std::min(c.max_seq_len, c.top_k > 1 ? c.top_k - 1 : 57))};
    PagedKv kv;
    kv.Build(rng, c.dtype, c.head_dim, c.num_kv_heads, seq_lens, c.page_size, c.hnd);
    const std::vector<float> q = RandomNormal(rng, static_cast<size_t>(batch) * hq * c.head_dim, 2.0f);
    const int64_t rows = static_cast<int64_t>(batch) * hq;
    const int64_t stride = c.max_seq_len + 3;

    DenseDecodeArgs ref;
    ref.kv = kv.host;
    ref.batch_size = batch;
    ref.num_q_heads = hq;
    ref.q = q.data();
    ref.max_seq_len = c.max_seq_len;
    ref.num_splits = c.num_splits;
    std::vector<float> ref_o(q.size()), ref_lse(rows), ref_scores(rows * stride, 0.0f);
    std::vector<int32_t> ref_top(std::max<int64_t>(rows * c.top_k, 1));
    ref.o = ref_o.data();
    ref.lse = ref_lse.data();
    ref.scores = ref_scores.data();
    ref.scores_stride = stride;
    ref.top_k = c.top_k;
    ref.top_k_positions = ref_top.data();
    ASSERT_TRUE(reference::DenseDecodeAttention(ref));
    // Compact the reference scores to [rows, max_seq_len] for the top-k check.
    std::vector<float> ref_compact(rows * c.max_seq_len);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(ref_scores.begin() + r * stride, ref_scores.begin() + r * stride + c.max_seq_len,
                ref_compact.begin() + r * c.max_seq_len);
    }
    for (const DecodeVariant& v : kDecodeVariants) {
      SCOPED_TRACE(v.name);
      DeviceArray<float> dq(q), d_o(q.size()), d_lse(rows), d_scores(rows * stride);
      DeviceArray<int32_t> d_top(ref_top.size()), dinvalid(1);
      d_o.Poison();
      d_lse.Poison();
      d_scores.Poison();
      d_top.Poison();
      dinvalid.Poison(0);
      DenseDecodeArgs a = ref;
      a.kv = kv.dev;
      a.q = dq.get();
      a.o = d_o.get();
      a.lse = d_lse.get();
      a.scores = c.scores_in_workspace ? nullptr : d_scores.get();
      a.top_k_positions = d_top.get();
      a.num_invalid = dinvalid.get();
      a.math = v.math;
      a.merge = v.merge;
      Workspace ws(DenseDecodeAttentionWorkspaceBytes(a));
      KVR_ASSERT_CUDA(DenseDecodeAttention(a, ws.get(), nullptr));
      KVR_ASSERT_CUDA(cudaDeviceSynchronize());
      EXPECT_LE(RelErr(d_o.Download(), ref_o), kTol);
      EXPECT_EQ(LseMismatches(d_lse.Download(), ref_lse), 0);
      EXPECT_EQ(dinvalid.Download()[0], 0);
      if (!c.scores_in_workspace) {
        const std::vector<float> got = d_scores.Download();
        std::vector<float> got_compact(rows * c.max_seq_len);
        for (int64_t r = 0; r < rows; ++r) {
          std::copy(got.begin() + r * stride, got.begin() + r * stride + c.max_seq_len,
                    got_compact.begin() + r * c.max_seq_len);
          // The padding columns past max_seq_len are not written.
          for (int64_t j = c.max_seq_len; j < stride; ++j) EXPECT_TRUE(std::isnan(got[r * stride + j]));
        }
        ExpectScoresNear(got_compact, ref_compact, name);
      }
      if (c.top_k > 0) ExpectTopKRows(ref_compact, rows, c.max_seq_len, d_top.Download(), c.top_k, name);
    }
  }
}

// ---------------------------------------------------------------------------
// Merge states.

TEST(MergeStatesTest, MatchesReferenceForLayoutsAndOutputTypes) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int32_t d : {64, 128}) {
    for (int32_t j : {1, 3, 64, 300}) {
      for (int32_t heads : {1, 37, 1000}) {
        for (DType out : {DType::kF32, DType::kBf16, DType::kF16}) {
          for (bool head_major : {false, true}) {
            std::string name = "d" + std::to_string(d);
            name += " J" + std::to_string(j);
            name += " H" + std::to_string(heads);
            name += " " + DTypeName(out);
            name += head_major ? " [H,J]" : " [J,H]";
            SCOPED_TRACE(name);
            const size_t n = static_cast<size_t>(j) * heads;
            const std::vector<float> o_states = RandomNormal(rng, n * d, 1.0f);
            std::vector<float> lse_states = RandomNormal(rng, n, 3.0f);
            for (size_t i = 0; i < n; ++i) {
              if (rng() % 5 == 0) lse_states[i] = -kInf;
            }
            MergeStatesArgs ref;
            ref.num_states = j;
            ref.num_heads = heads;
            ref.head_dim = d;
            if (head_major) {  // [H, J, D]
              ref.o_state_stride = d;
              ref.o_head_stride = static_cast<int64_t>(j) * d;
              ref.lse_state_stride = 1;
              ref.lse_head_stride = j;
            } else {  // [J, H, D]
              ref.o_state_stride = static_cast<int64_t>(heads) * d;
              ref.o_head_stride = d;
              ref.lse_state_stride = heads;
              ref.lse_head_stride = 1;
            }
            // Head 0 has only empty states.
            for (int32_t s = 0; s < j; ++s) lse_states[s * ref.lse_state_stride] = -kInf;
            ref.o_states = o_states.data();
            ref.lse_states = lse_states.data();
            ref.out_dtype = out;
            std::vector<float> ref_o32(static_cast<size_t>(heads) * d);
            std::vector<uint16_t> ref_o16(ref_o32.size());
            std::vector<float> ref_lse(heads);
            ref.o = out == DType::kF32 ? static_cast<void*>(ref_o32.data()) : static_cast<void*>(ref_o16.data());
            ref.lse = ref_lse.data();
            ASSERT_TRUE(reference::MergeStates(ref));

            DeviceArray<float> d_states(o_states), d_lse_states(lse_states), d_o32(ref_o32.size()), d_lse(heads);
            DeviceArray<uint16_t> d_o16(ref_o16.size());
            d_o32.Poison();
            d_o16.Poison();
            d_lse.Poison();
            MergeStatesArgs a = ref;
            a.o_states = d_states.get();
            a.lse_states = d_lse_states.get();
            a.o = out == DType::kF32 ? static_cast<void*>(d_o32.get()) : static_cast<void*>(d_o16.get());
            a.lse = d_lse.get();
            KVR_ASSERT_CUDA(MergeStates(a, nullptr, nullptr));
            KVR_ASSERT_CUDA(cudaDeviceSynchronize());
            std::vector<float> got, want;
            if (out == DType::kF32) {
              got = d_o32.Download();
              want = ref_o32;
            } else {
              const std::vector<uint16_t> g16 = d_o16.Download();
              for (size_t i = 0; i < g16.size(); ++i) {
                got.push_back(HalfBitsToFloat(g16[i], out));
                want.push_back(HalfBitsToFloat(ref_o16[i], out));
              }
            }
            EXPECT_LE(RelErr(got, want), out == DType::kF32 ? 1e-5 : 5e-3);
            EXPECT_EQ(LseMismatches(d_lse.Download(), ref_lse), 0);
            // The all-empty head is exactly zero.
            for (int32_t i = 0; i < d; ++i) ASSERT_EQ(got[i], 0.0f);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Top-k.

enum class Dist { kNormal, kTies, kMostlyNegInf, kWithNan, kAllEqual, kSignedZeros };

std::vector<float> MakeScores(std::mt19937_64& rng, size_t n, Dist dist) {
  std::vector<float> x(n);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (size_t i = 0; i < n; ++i) {
    switch (dist) {
      case Dist::kNormal:
        x[i] = normal(rng);
        break;
      case Dist::kTies:
        x[i] = static_cast<float>(rng() % 10) - 4.0f;
        break;
      case Dist::kMostlyNegInf:
        x[i] = rng() % 50 == 0 ? normal(rng) : -kInf;
        break;
      case Dist::kWithNan:
        x[i] = rng() % 200 == 0 ? std::nanf("") : (rng() % 300 == 0 ? kInf : normal(rng));
        break;
      case Dist::kAllEqual:
        x[i] = 1.5f;
        break;
      case Dist::kSignedZeros:
        x[i] = rng() % 2 == 0 ? 0.0f : -0.0f;
        break;
    }
  }
  return x;
}

TEST(TopKTest, SelectsAValidTopKOverShapesAndDistributions) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  struct Case {
    int32_t rows, n, k;
    Dist dist;
    int32_t stride_pad;  // row_stride = n + pad
    int32_t ptr_offset;  // floats added to the base pointer (1: misaligned rows)
  };
  const Case cases[] = {
      {1, 1, 1, Dist::kNormal, 0, 0},          {3, 5, 5, Dist::kNormal, 0, 0},
      {7, 1000, 10, Dist::kTies, 0, 0},        {4, 4097, 2048, Dist::kNormal, 1, 0},
      {2, 131072, 2048, Dist::kNormal, 0, 0},  {1, 1 << 20, 8192, Dist::kNormal, 0, 0},
      {16, 32768, 1, Dist::kWithNan, 0, 0},    {5, 50000, 50000, Dist::kNormal, 0, 1},
      {3, 20000, 777, Dist::kMostlyNegInf, 4, 0}, {2, 9999, 100, Dist::kAllEqual, 0, 0},
      {2, 3000, 1500, Dist::kSignedZeros, 0, 0}, {64, 8192, 256, Dist::kTies, 0, 3},
      {1, 1 << 20, 1, Dist::kTies, 0, 0},
  };
  for (const Case& c : cases) {
    const std::string name = "rows " + std::to_string(c.rows) + " n " + std::to_string(c.n) + " k " +
                             std::to_string(c.k) + " dist " + std::to_string(static_cast<int>(c.dist)) + " pad " +
                             std::to_string(c.stride_pad) + " off " + std::to_string(c.ptr_offset);
    SCOPED_TRACE(name);
    const int64_t stride = static_cast<int64_t>(c.n) + c.stride_pad;
    std::vector<float> host(static_cast<size_t>(c.rows) * stride + c.ptr_offset, 123.0f);
    for (int32_t r = 0; r < c.rows; ++r) {
      const std::vector<float> row = MakeScores(rng, c.n, c.dist);
      std::copy(row.begin(), row.end(), host.begin() + c.ptr_offset + r * stride);
    }
    DeviceArray<float> d_scores(host), d_vals(static_cast<size_t>(c.rows) * c.k);
    DeviceArray<int32_t> d_idx(static_cast<size_t>(c.rows) * c.k);
    d_idx.Poison();
    d_vals.Poison();
    TopKArgs a;
    a.scores = d_scores.get() + c.ptr_offset;
    a.num_rows = c.rows;
    a.num_cols = c.n;
    a.row_stride = stride;
    a.k = c.k;
    a.indices = d_idx.get();
    a.values = d_vals.get();
    Workspace ws(TopKWorkspaceBytes(a));
    KVR_ASSERT_CUDA(TopK(a, ws.get(), nullptr));
    KVR_ASSERT_CUDA(cudaDeviceSynchronize());
    const std::vector<int32_t> idx = d_idx.Download();
    const std::vector<float> vals = d_vals.Download();
    for (int32_t r = 0; r < c.rows; ++r) {
      const float* row = host.data() + c.ptr_offset + r * stride;
      const int32_t* sel = idx.data() + static_cast<size_t>(r) * c.k;
      ASSERT_EQ(reference::CheckTopKSelection(row, c.n, sel, c.k, 0.0), "") << "row " << r;
      for (int32_t i = 0; i < c.k; ++i) {
        const float v = vals[static_cast<size_t>(r) * c.k + i];
        const float want = row[sel[i]];
        ASSERT_TRUE(std::memcmp(&v, &want, sizeof(v)) == 0 || (std::isnan(v) && std::isnan(want)))
            << "row " << r << " slot " << i;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Loki and Quest scoring.

TEST(LokiScoreTest, MatchesReferenceScoresAndTopK) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int i = 0;
  for (DType dtype : {DType::kBf16, DType::kF16}) {
    for (int32_t rank : {16, 32, 64}) {
      for (int32_t group : {1, 2, 5, 8}) {
        const int32_t k = (i % 3 == 0) ? 0 : (i % 3 == 1 ? 1 : 300);
        const bool scores_in_ws = k > 0 && i % 2 == 0;
        ++i;
        const std::string name = DTypeName(dtype) + " r" + std::to_string(rank) + " g" + std::to_string(group) +
                                 " k" + std::to_string(k) + (scores_in_ws ? " ws" : "");
        SCOPED_TRACE(name);
        const int32_t batch = 2, kv_heads = group == 8 ? 1 : 2, hq = kv_heads * group, max_seq = 5000;
        std::vector<int32_t> seq_lens = {max_seq, 1234};
        const int64_t head_stride = static_cast<int64_t>(max_seq + 8) * rank;
        const int64_t seq_stride = head_stride * kv_heads + 64;
        std::vector<uint16_t> keys = RandomHalf(rng, static_cast<size_t>(batch) * seq_stride, dtype);
        const std::vector<float> q = RandomNormal(rng, static_cast<size_t>(batch) * hq * rank, 1.0f);
        const int64_t rows = static_cast<int64_t>(batch) * hq;
        LokiScoreArgs ref;
        ref.q = q.data();
        ref.keys = keys.data();
        ref.dtype = dtype;
        ref.rank = rank;
        ref.head_dim = 128;
        ref.batch_size = batch;
        ref.num_q_heads = hq;
        ref.num_kv_heads = kv_heads;
        ref.seq_stride = seq_stride;
        ref.head_stride = head_stride;
        ref.seq_lens = seq_lens.data();
        ref.max_seq_len = max_seq;
        std::vector<float> ref_scores(rows * max_seq);
        std::vector<int32_t> ref_top(std::max<int64_t>(rows * k, 1));
        ref.scores = ref_scores.data();
        ref.k = k;
        ref.top_k_positions = ref_top.data();
        ASSERT_TRUE(reference::LokiScore(ref));

        DeviceArray<float> dq(q), d_scores(ref_scores.size());
        DeviceArray<uint16_t> dkeys(keys);
        DeviceArray<int32_t> dlens(seq_lens), d_top(ref_top.size());
        d_scores.Poison();
        d_top.Poison();
        LokiScoreArgs a = ref;
        a.q = dq.get();
        a.keys = dkeys.get();
        a.seq_lens = dlens.get();
        a.scores = scores_in_ws ? nullptr : d_scores.get();
        a.top_k_positions = d_top.get();
        Workspace ws(LokiScoreWorkspaceBytes(a));
        KVR_ASSERT_CUDA(LokiScore(a, ws.get(), nullptr));
        KVR_ASSERT_CUDA(cudaDeviceSynchronize());
        if (!scores_in_ws) ExpectScoresNear(d_scores.Download(), ref_scores, name);
        if (k > 0) ExpectTopKRows(ref_scores, rows, max_seq, d_top.Download(), k, name);
        if (k > 0) continue;
        // 16-bit scores (scores only): the reference's rounding of the same logits.
        for (DType out : {DType::kBf16, DType::kF16}) {
          SCOPED_TRACE("scores " + DTypeName(out));
          std::vector<uint16_t> ref16(ref_scores.size());
          LokiScoreArgs r16 = ref;
          r16.scores = ref16.data();
          r16.scores_dtype = out;
          ASSERT_TRUE(reference::LokiScore(r16));
          DeviceArray<uint16_t> d16(ref16.size());
          d16.Poison();
          LokiScoreArgs a16 = a;
          a16.scores = d16.get();
          a16.scores_dtype = out;
          Workspace ws16(LokiScoreWorkspaceBytes(a16));
          KVR_ASSERT_CUDA(LokiScore(a16, ws16.get(), nullptr));
          KVR_ASSERT_CUDA(cudaDeviceSynchronize());
          const std::vector<uint16_t> got16 = d16.Download();
          std::vector<float> got(got16.size()), want(ref16.size());
          for (size_t e = 0; e < got16.size(); ++e) {
            got[e] = HalfBitsToFloat(got16[e], out);
            want[e] = HalfBitsToFloat(ref16[e], out);
          }
          ExpectScoresNear(got, want, name);
        }
      }
    }
  }
}

TEST(QuestScoreTest, MatchesReferenceScoresAndTopPages) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int i = 0;
  for (DType dtype : {DType::kBf16, DType::kF16}) {
    for (int32_t d : {64, 128}) {
      for (int32_t group : {1, 4, 7}) {
        const int32_t k = i % 2 == 0 ? 0 : 128;
        ++i;
        const std::string name =
            DTypeName(dtype) + " d" + std::to_string(d) + " g" + std::to_string(group) + " k" + std::to_string(k);
        SCOPED_TRACE(name);
        const int32_t batch = 3, kv_heads = 2, hq = kv_heads * group, max_pages = 2048;
        std::vector<int32_t> num_pages = {max_pages, 1000, 129};
        const int64_t head_stride = static_cast<int64_t>(max_pages) * d;
        const int64_t seq_stride = head_stride * kv_heads;
        // max >= min element-wise, as for real page metadata.
        std::vector<uint16_t> pmax(static_cast<size_t>(batch) * seq_stride), pmin(pmax.size());
        std::normal_distribution<float> normal;
        for (size_t e = 0; e < pmax.size(); ++e) {
          const float a = normal(rng), b = normal(rng);
          pmax[e] = FloatToHalfBits(std::max(a, b), dtype);
          pmin[e] = FloatToHalfBits(std::min(a, b), dtype);
        }
        const std::vector<float> q = RandomNormal(rng, static_cast<size_t>(batch) * hq * d, 1.0f);
        const int64_t rows = static_cast<int64_t>(batch) * hq;
        QuestScoreArgs ref;
        ref.q = q.data();
        ref.page_max = pmax.data();
        ref.page_min = pmin.data();
        ref.dtype = dtype;
        ref.head_dim = d;
        ref.batch_size = batch;
        ref.num_q_heads = hq;
        ref.num_kv_heads = kv_heads;
        ref.seq_stride = seq_stride;
        ref.head_stride = head_stride;
        ref.num_pages = num_pages.data();
        ref.max_pages = max_pages;
        std::vector<float> ref_scores(rows * max_pages);
        std::vector<int32_t> ref_top(std::max<int64_t>(rows * k, 1));
        ref.scores = ref_scores.data();
        ref.k = k;
        ref.top_k_pages = ref_top.data();
        ASSERT_TRUE(reference::QuestScore(ref));

        DeviceArray<float> dq(q), d_scores(ref_scores.size());
        DeviceArray<uint16_t> dmax(pmax), dmin(pmin);
        DeviceArray<int32_t> dnum(num_pages), d_top(ref_top.size());
        d_scores.Poison();
        d_top.Poison();
        QuestScoreArgs a = ref;
        a.q = dq.get();
        a.page_max = dmax.get();
        a.page_min = dmin.get();
        a.num_pages = dnum.get();
        a.scores = d_scores.get();
        a.top_k_pages = d_top.get();
        Workspace ws(QuestScoreWorkspaceBytes(a));
        KVR_ASSERT_CUDA(QuestScore(a, ws.get(), nullptr));
        KVR_ASSERT_CUDA(cudaDeviceSynchronize());
        ExpectScoresNear(d_scores.Download(), ref_scores, name);
        if (k > 0) ExpectTopKRows(ref_scores, rows, max_pages, d_top.Download(), k, name);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Argument validation: cudaErrorInvalidValue, nothing launched, nothing written.

TEST(ValidationTest, LaunchersRejectBadArgumentsWithoutLaunching) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(12345);
  PagedKv kv;
  kv.Build(rng, DType::kBf16, 128, 2, {300}, 16, false);
  const std::vector<float> q = RandomNormal(rng, 4 * 128, 1.0f);
  std::vector<int32_t> positions(2 * 100);
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int32_t>(i % 100);
  DeviceArray<float> dq(q), d_o(4 * 128), d_lse(4), d_scores(4 * 300);
  DeviceArray<int32_t> dpos(positions), d_top(4 * 300);
  Workspace ws(1 << 22);

  auto expect_untouched = [&](const std::string& what) {
    KVR_ASSERT_CUDA(cudaDeviceSynchronize());
    EXPECT_EQ(cudaGetLastError(), cudaSuccess) << what;
    for (float x : d_o.Download()) ASSERT_TRUE(std::isnan(x)) << what;
    for (float x : d_lse.Download()) ASSERT_TRUE(std::isnan(x)) << what;
    for (float x : d_scores.Download()) ASSERT_TRUE(std::isnan(x)) << what;
    for (int32_t x : d_top.Download()) ASSERT_EQ(x, -1) << what;
  };
  d_o.Poison();
  d_lse.Poison();
  d_scores.Poison();
  d_top.Poison();

  SparseDecodeArgs s;
  s.kv = kv.dev;
  s.batch_size = 1;
  s.num_q_heads = 4;
  s.q = dq.get();
  s.positions = dpos.get();
  s.max_list_len = 100;
  s.o = d_o.get();
  s.lse = d_lse.get();
  struct SparseMutation {
    const char* what;
    void (*apply)(SparseDecodeArgs*);
  };
  const SparseMutation sparse_bad[] = {
      {"null q", [](SparseDecodeArgs* a) { a->q = nullptr; }},
      {"null o", [](SparseDecodeArgs* a) { a->o = nullptr; }},
      {"null k", [](SparseDecodeArgs* a) { a->kv.k = nullptr; }},
      {"null page table", [](SparseDecodeArgs* a) { a->kv.page_table = nullptr; }},
      {"null positions", [](SparseDecodeArgs* a) { a->positions = nullptr; }},
      {"head_dim 96", [](SparseDecodeArgs* a) { a->kv.head_dim = 96; }},
      {"f32 kv", [](SparseDecodeArgs* a) { a->kv.dtype = DType::kF32; }},
      {"page_size 0", [](SparseDecodeArgs* a) { a->kv.page_size = 0; }},
      {"page_size 512", [](SparseDecodeArgs* a) { a->kv.page_size = 512; }},
      {"group 9", [](SparseDecodeArgs* a) { a->num_q_heads = 18; }},
      {"heads not a multiple", [](SparseDecodeArgs* a) { a->num_q_heads = 3; }},
      {"odd stride", [](SparseDecodeArgs* a) { a->kv.token_stride += 4; }},
      {"misaligned v", [](SparseDecodeArgs* a) { a->kv.v = static_cast<const char*>(a->kv.v) + 8; }},
      {"negative list length", [](SparseDecodeArgs* a) { a->max_list_len = -1; }},
      {"zero batch", [](SparseDecodeArgs* a) { a->batch_size = 0; }},
      {"negative scale", [](SparseDecodeArgs* a) { a->sm_scale = -1.0f; }},
      {"bad math", [](SparseDecodeArgs* a) { a->math = static_cast<DecodeMath>(3); }},
      {"bad merge", [](SparseDecodeArgs* a) { a->merge = static_cast<DecodeMerge>(-1); }},
  };
  for (const SparseMutation& m : sparse_bad) {
    SparseDecodeArgs a = s;
    m.apply(&a);
    EXPECT_EQ(SparseDecodeAttention(a, ws.get(), nullptr), cudaErrorInvalidValue) << m.what;
    expect_untouched(m.what);
  }
  // A needed workspace that is missing.
  {
    SparseDecodeArgs a = s;
    a.num_splits = 4;
    ASSERT_GT(SparseDecodeAttentionWorkspaceBytes(a), 0u);
    EXPECT_EQ(SparseDecodeAttention(a, nullptr, nullptr), cudaErrorInvalidValue);
    expect_untouched("missing workspace");
  }

  DenseDecodeArgs dn;
  dn.kv = kv.dev;
  dn.batch_size = 1;
  dn.num_q_heads = 4;
  dn.q = dq.get();
  dn.max_seq_len = 300;
  dn.o = d_o.get();
  dn.lse = d_lse.get();
  dn.scores = d_scores.get();
  dn.top_k = 10;
  dn.top_k_positions = d_top.get();
  {
    DenseDecodeArgs a = dn;
    a.top_k = 301;  // k > n
    EXPECT_EQ(DenseDecodeAttention(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = dn;
    a.top_k_positions = nullptr;
    EXPECT_EQ(DenseDecodeAttention(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = dn;
    a.scores_stride = 299;
    EXPECT_EQ(DenseDecodeAttention(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = dn;
    a.max_seq_len = 0;
    EXPECT_EQ(DenseDecodeAttention(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = dn;
    a.kv.num_kv_heads = 0;
    EXPECT_EQ(DenseDecodeAttention(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = dn;
    a.math = static_cast<DecodeMath>(9);
    EXPECT_EQ(DenseDecodeAttention(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = dn;
    EXPECT_EQ(DenseDecodeAttention(a, nullptr, nullptr), cudaErrorInvalidValue);  // top-k needs a workspace
    expect_untouched("dense");
  }

  TopKArgs t;
  t.scores = d_scores.get();
  t.num_rows = 4;
  t.num_cols = 300;
  t.k = 10;
  t.indices = d_top.get();
  {
    TopKArgs a = t;
    a.k = 301;
    EXPECT_EQ(TopK(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = t;
    a.k = 0;
    EXPECT_EQ(TopK(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = t;
    a.num_rows = 70000;
    EXPECT_EQ(TopK(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = t;
    a.scores = nullptr;
    EXPECT_EQ(TopK(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = t;
    EXPECT_EQ(TopK(a, nullptr, nullptr), cudaErrorInvalidValue);
    a = t;
    EXPECT_EQ(TopK(a, static_cast<char*>(ws.get()) + 4, nullptr), cudaErrorInvalidValue);
    expect_untouched("top-k");
  }

  MergeStatesArgs m;
  m.o_states = d_scores.get();
  m.lse_states = d_scores.get();
  m.num_states = 2;
  m.num_heads = 4;
  m.head_dim = 128;
  m.o_state_stride = 4 * 128;
  m.o_head_stride = 128;
  m.lse_state_stride = 4;
  m.lse_head_stride = 1;
  m.o = d_o.get();
  m.lse = d_lse.get();
  {
    MergeStatesArgs a = m;
    a.head_dim = 80;
    EXPECT_EQ(MergeStates(a, nullptr, nullptr), cudaErrorInvalidValue);
    a = m;
    a.num_states = 0;
    EXPECT_EQ(MergeStates(a, nullptr, nullptr), cudaErrorInvalidValue);
    a = m;
    a.out_dtype = static_cast<DType>(7);
    EXPECT_EQ(MergeStates(a, nullptr, nullptr), cudaErrorInvalidValue);
    a = m;
    a.o = nullptr;
    EXPECT_EQ(MergeStates(a, nullptr, nullptr), cudaErrorInvalidValue);
    expect_untouched("merge");
  }

  DeviceArray<uint16_t> keys(2 * 300 * 32);
  DeviceArray<int32_t> lens(std::vector<int32_t>{300});
  LokiScoreArgs l;
  l.q = dq.get();
  l.keys = keys.get();
  l.rank = 32;
  l.batch_size = 1;
  l.num_q_heads = 4;
  l.num_kv_heads = 2;
  l.head_stride = 300 * 32;
  l.seq_stride = 2 * 300 * 32;
  l.seq_lens = lens.get();
  l.max_seq_len = 300;
  l.scores = d_scores.get();
  l.k = 10;
  l.top_k_positions = d_top.get();
  {
    LokiScoreArgs a = l;
    a.rank = 48;
    EXPECT_EQ(LokiScore(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = l;
    a.k = 301;
    EXPECT_EQ(LokiScore(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = l;
    a.head_stride = 299 * 32;
    EXPECT_EQ(LokiScore(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = l;
    a.keys = static_cast<const char*>(a.keys) + 2;
    EXPECT_EQ(LokiScore(a, ws.get(), nullptr), cudaErrorInvalidValue);
    a = l;
    EXPECT_EQ(LokiScore(a, nullptr, nullptr), cudaErrorInvalidValue);
    a = l;
    a.scores_dtype = DType::kBf16;  // 16-bit scores need k == 0
    EXPECT_EQ(LokiScore(a, ws.get(), nullptr), cudaErrorInvalidValue);
    expect_untouched("loki");
  }

  QuestScoreArgs qs;
  qs.q = dq.get();
  qs.page_max = keys.get();
  qs.page_min = keys.get();
  qs.head_dim = 128;
  qs.batch_size = 1;
  qs.num_q_heads = 4;
  qs.num_kv_heads = 2;
  qs.head_stride = 37 * 128;
  qs.seq_stride = 2 * 37 * 128;
  qs.num_pages = lens.get();
  qs.max_pages = 37;
  qs.scores = d_scores.get();
  qs.k = 38;
  qs.top_k_pages = d_top.get();
  EXPECT_EQ(QuestScore(qs, ws.get(), nullptr), cudaErrorInvalidValue);  // k > pages
  qs.k = 4;
  qs.dtype = DType::kF32;
  EXPECT_EQ(QuestScore(qs, ws.get(), nullptr), cudaErrorInvalidValue);
  expect_untouched("quest");
}

// ---------------------------------------------------------------------------
// Graph capture: a decode step (sparse attention with splits and merge, dense
// selection with top-k, Loki scoring with fused top-k) is captured into a
// CUDA graph in global capture mode, which fails if any launcher allocates
// or synchronizes; the replay must give the same results as direct launches.
// Once per decode variant (the cluster launches must capture too).

void CheckDecodeStepCapture(const DecodeVariant& v) {
  SCOPED_TRACE(v.name);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int32_t batch = 2, kv_heads = 2, hq = 8, d = 128, n = 6000, budget = 700;
  PagedKv kv;
  kv.Build(rng, DType::kBf16, d, kv_heads, {n, n - 100}, 16, false);
  const std::vector<float> q = RandomNormal(rng, static_cast<size_t>(batch) * hq * d, 2.0f);
  std::vector<int32_t> positions(static_cast<size_t>(batch) * kv_heads * budget);
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int32_t>((i * 7919) % (n - 100));
  const int64_t rows = static_cast<int64_t>(batch) * hq;
  std::vector<uint16_t> keys = RandomHalf(rng, static_cast<size_t>(batch) * kv_heads * n * 32, DType::kBf16);

  DeviceArray<float> dq(q), o1(rows * d), lse1(rows), o2(rows * d), lse2(rows), scores(rows * n);
  DeviceArray<int32_t> dpos(positions), top1(rows * 64), top2(rows * 64), ltop1(rows * 32), ltop2(rows * 32);
  DeviceArray<uint16_t> dkeys(keys);
  DeviceArray<float> lscores(rows * n);

  SparseDecodeArgs s;
  s.kv = kv.dev;
  s.batch_size = batch;
  s.num_q_heads = hq;
  s.q = dq.get();
  s.positions = dpos.get();
  s.max_list_len = budget;
  s.num_splits = 3;
  s.math = v.math;
  s.merge = v.merge;
  DenseDecodeArgs dn;
  dn.kv = kv.dev;
  dn.batch_size = batch;
  dn.num_q_heads = hq;
  dn.q = dq.get();
  dn.max_seq_len = n;
  dn.scores = scores.get();
  dn.top_k = 64;
  dn.math = v.math;
  dn.merge = v.merge;
  LokiScoreArgs l;
  l.q = dq.get();  // [batch, hq, 32]: the first rows * 32 floats of q serve as q'
  l.keys = dkeys.get();
  l.rank = 32;
  l.batch_size = batch;
  l.num_q_heads = hq;
  l.num_kv_heads = kv_heads;
  l.head_stride = static_cast<int64_t>(n) * 32;
  l.seq_stride = l.head_stride * kv_heads;
  l.seq_lens = kv.dseq_lens.get();
  l.max_seq_len = n;
  l.scores = lscores.get();
  l.k = 32;

  // Output pointers are part of the arguments that WorkspaceBytes validates.
  s.o = o1.get();
  dn.o = o1.get();
  dn.top_k_positions = top1.get();
  l.top_k_positions = ltop1.get();
  Workspace ws_s(SparseDecodeAttentionWorkspaceBytes(s));
  Workspace ws_d(DenseDecodeAttentionWorkspaceBytes(dn));
  Workspace ws_l(LokiScoreWorkspaceBytes(l));
  ASSERT_GT(SparseDecodeAttentionWorkspaceBytes(s), 0u);
  ASSERT_GT(DenseDecodeAttentionWorkspaceBytes(dn), 0u);
  ASSERT_GT(LokiScoreWorkspaceBytes(l), 0u);
  cudaStream_t stream;
  KVR_ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto step = [&](float* o_s, float* lse_s, int32_t* top_d, int32_t* top_l) {
    SparseDecodeArgs a = s;
    a.o = o_s;
    a.lse = lse_s;
    DenseDecodeArgs b = dn;
    b.o = o_s;  // dense writes after sparse; only its selection is compared
    b.top_k_positions = top_d;
    LokiScoreArgs c = l;
    c.top_k_positions = top_l;
    cudaError_t e = SparseDecodeAttention(a, ws_s.get(), stream);
    if (e == cudaSuccess) e = DenseDecodeAttention(b, ws_d.get(), stream);
    if (e == cudaSuccess) e = SparseDecodeAttention(a, ws_s.get(), stream);
    if (e == cudaSuccess) e = LokiScore(c, ws_l.get(), stream);
    return e;
  };
  // Direct launches (also sets any per-device kernel attributes).
  KVR_ASSERT_CUDA(step(o1.get(), lse1.get(), top1.get(), ltop1.get()));
  KVR_ASSERT_CUDA(cudaStreamSynchronize(stream));
  // Captured.
  o2.Poison();
  lse2.Poison();
  top2.Poison();
  ltop2.Poison();
  cudaGraph_t graph;
  KVR_ASSERT_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  const cudaError_t captured = step(o2.get(), lse2.get(), top2.get(), ltop2.get());
  KVR_ASSERT_CUDA(cudaStreamEndCapture(stream, &graph));
  KVR_ASSERT_CUDA(captured);
  cudaGraphExec_t exec;
  KVR_ASSERT_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  KVR_ASSERT_CUDA(cudaGraphLaunch(exec, stream));
  KVR_ASSERT_CUDA(cudaStreamSynchronize(stream));
  EXPECT_EQ(o1.Download(), o2.Download());  // deterministic: bitwise equal
  EXPECT_EQ(lse1.Download(), lse2.Download());
  auto sorted_rows = [](std::vector<int32_t> v, int32_t k) {
    for (size_t r = 0; r < v.size() / k; ++r) std::sort(v.begin() + r * k, v.begin() + (r + 1) * k);
    return v;
  };
  EXPECT_EQ(sorted_rows(top1.Download(), 64), sorted_rows(top2.Download(), 64));
  EXPECT_EQ(sorted_rows(ltop1.Download(), 32), sorted_rows(ltop2.Download(), 32));
  KVR_ASSERT_CUDA(cudaGraphExecDestroy(exec));
  KVR_ASSERT_CUDA(cudaGraphDestroy(graph));
  KVR_ASSERT_CUDA(cudaStreamDestroy(stream));
}

TEST(GraphCaptureTest, DecodeStepCapturesAndReplaysIdentically) {
  SKIP_WITHOUT_DEVICE();
  for (const DecodeVariant& v : kDecodeVariants) CheckDecodeStepCapture(v);
}

// ---------------------------------------------------------------------------
// Decode-step bookkeeping kernels: each launcher against its reference on
// fresh random data over a small shape grid. Outputs the kernels must not
// touch (pool slots of skipped rows, positions past a list's length, score
// padding) are poisoned identically on both sides and compared bit for bit.

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(StepKernelsTest, AdvanceSeqLensMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int32_t batch : {1, 7, 300}) {
    for (int32_t tokens : {0, 1, 5}) {
      for (int32_t page_size : {0, 1, 7, 16}) {  // 0: no pages output
        SCOPED_TRACE(Label({{"b", batch}, {"t", tokens}, {"ps", page_size}}));
        std::vector<int32_t> lens(batch);
        for (int32_t& l : lens) l = static_cast<int32_t>(rng() % 5000);
        std::vector<int32_t> pages(batch, -1);
        DeviceArray<int32_t> dlens(lens), dpages(pages);
        AdvanceSeqLensArgs ref;
        ref.seq_lens = lens.data();
        ref.batch_size = batch;
        ref.num_tokens = tokens;
        ref.pages = page_size > 0 ? pages.data() : nullptr;
        ref.page_size = std::max(page_size, 1);
        ASSERT_TRUE(reference::AdvanceSeqLens(ref));
        AdvanceSeqLensArgs a = ref;
        a.seq_lens = dlens.get();
        a.pages = page_size > 0 ? dpages.get() : nullptr;
        KVR_ASSERT_CUDA(AdvanceSeqLens(a, nullptr));
        KVR_ASSERT_CUDA(cudaDeviceSynchronize());
        EXPECT_EQ(dlens.Download(), lens);
        EXPECT_EQ(dpages.Download(), pages);
      }
    }
  }
}

TEST(StepKernelsTest, AppendKvMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int i = 0;
  for (DType dtype : {DType::kBf16, DType::kF16}) {
    for (int32_t d : {64, 128}) {
      for (int32_t tokens : {1, 37}) {
        for (bool explicit_start : {false, true}) {
          const int32_t page_size = i % 3 == 0 ? 16 : (i % 3 == 1 ? 7 : 1);
          const bool hnd = i % 2 == 1;
          ++i;
          const std::string name = DTypeName(dtype) + " d" + std::to_string(d) + " t" + std::to_string(tokens) +
                                   " ps" + std::to_string(page_size) + (hnd ? " hnd" : " nhd") +
                                   (explicit_start ? " start" : " seq_lens");
          SCOPED_TRACE(name);
          const int32_t batch = 3, kv_heads = 3;
          // Lengths after the append; the pool holds room for 100 more tokens.
          const std::vector<int32_t> lens = {500, 37 + tokens, tokens};
          PagedKv kv;
          kv.Build(rng, dtype, d, kv_heads, {600, 37 + tokens, tokens}, page_size, hnd);
          kv.seq_lens = lens;
          kv.page_table[499 / page_size] = -1;                        // sequence 0: the page of position 499 gone
          kv.page_table[kv.host.max_pages_per_seq] = kv.host.num_pages;  // sequence 1: its first page outside the pool
          kv.Sync();
          // Source rows [B, Hkv, T, d + 8] (padded tokens).
          const int64_t tok_stride = d + 8;
          const std::vector<uint16_t> ks = RandomHalf(rng, static_cast<size_t>(batch) * kv_heads * tokens * tok_stride, dtype);
          const std::vector<uint16_t> vs = RandomHalf(rng, ks.size(), dtype);
          // Explicit starts: one row partly past the page table, one negative.
          const std::vector<int32_t> starts = {590, 3, -2};
          AppendKvArgs ref;
          ref.kv = kv.host;
          ref.batch_size = batch;
          ref.num_tokens = tokens;
          ref.k_src = ks.data();
          ref.v_src = vs.data();
          ref.src_token_stride = tok_stride;
          ref.src_head_stride = tokens * tok_stride;
          ref.src_batch_stride = kv_heads * tokens * tok_stride;
          ref.start_positions = explicit_start ? starts.data() : nullptr;
          ASSERT_TRUE(reference::AppendKv(ref));
          DeviceArray<uint16_t> dks(ks), dvs(vs);
          DeviceArray<int32_t> dstarts(starts);
          AppendKvArgs a = ref;
          a.kv = kv.dev;
          a.k_src = dks.get();
          a.v_src = dvs.get();
          a.start_positions = explicit_start ? dstarts.get() : nullptr;
          KVR_ASSERT_CUDA(AppendKv(a, nullptr));
          KVR_ASSERT_CUDA(cudaDeviceSynchronize());
          EXPECT_TRUE(kv.dk.Download() == kv.k) << "K pool differs";
          EXPECT_TRUE(kv.dv.Download() == kv.v) << "V pool differs";
        }
      }
    }
  }
}

TEST(StepKernelsTest, ProjectRowsMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  struct Case {
    DType x_dtype, y_dtype;
    int32_t d, rank, heads_per_matrix, tokens;
    bool offset;
  };
  const Case cases[] = {
      {DType::kF32, DType::kF32, 128, 32, 4, 1, false},   // Loki query rotation, GQA group 4
      {DType::kBf16, DType::kBf16, 128, 32, 1, 1, true},   // the key row just appended
      {DType::kF16, DType::kF16, 64, 16, 1, 300, true},
      {DType::kBf16, DType::kF32, 64, 64, 2, 1000, false},  // full rank, prefill of the key plane
      {DType::kF32, DType::kBf16, 128, 1, 1, 9, true},
      {DType::kF16, DType::kF32, 128, 128, 1, 20, false},
  };
  for (const Case& c : cases) {
    const std::string name = DTypeName(c.x_dtype) + "->" + DTypeName(c.y_dtype) + " d" + std::to_string(c.d) + " r" +
                             std::to_string(c.rank) + " hpm" + std::to_string(c.heads_per_matrix) + " t" +
                             std::to_string(c.tokens) + (c.offset ? " offset" : "");
    SCOPED_TRACE(name);
    const int32_t batch = 2, heads = 4, cap = c.tokens + 40;
    const int64_t x_tok = c.d + 3, y_tok = c.rank + 5;
    const size_t x_elems = static_cast<size_t>(batch) * heads * c.tokens * x_tok;
    std::vector<float> xf = RandomNormal(rng, x_elems, 1.0f);
    std::vector<uint16_t> xh(x_elems);
    for (size_t e = 0; e < x_elems; ++e) xh[e] = FloatToHalfBits(xf[e], c.x_dtype == DType::kF32 ? DType::kBf16 : c.x_dtype);
    const int32_t cols = c.rank + 7;
    const std::vector<float> mats = RandomNormal(rng, static_cast<size_t>(heads / c.heads_per_matrix) * c.d * cols, 0.1f);
    // Sequence 0 wrote its rows 10 positions in; sequence 1 at the end of its capacity, past max_positions.
    std::vector<int32_t> seq_lens = {c.tokens + 10, cap};
    const size_t y_elems = static_cast<size_t>(batch) * heads * cap * y_tok;
    const bool y32 = c.y_dtype == DType::kF32;
    std::vector<float> ref_y32(y32 ? y_elems : 0, std::nanf(""));
    std::vector<uint16_t> ref_y16(y32 ? 0 : y_elems, 0xffff);
    ProjectRowsArgs ref;
    ref.x = c.x_dtype == DType::kF32 ? static_cast<const void*>(xf.data()) : static_cast<const void*>(xh.data());
    ref.x_dtype = c.x_dtype;
    ref.x_token_stride = x_tok;
    ref.x_head_stride = c.tokens * x_tok;
    ref.x_batch_stride = heads * c.tokens * x_tok;
    ref.matrices = mats.data();
    ref.matrix_cols = cols;
    ref.heads_per_matrix = c.heads_per_matrix;
    ref.batch_size = batch;
    ref.num_heads = heads;
    ref.num_tokens = c.tokens;
    ref.head_dim = c.d;
    ref.rank = c.rank;
    ref.y = y32 ? static_cast<void*>(ref_y32.data()) : static_cast<void*>(ref_y16.data());
    ref.y_dtype = c.y_dtype;
    ref.y_token_stride = y_tok;
    ref.y_head_stride = cap * y_tok;
    ref.y_batch_stride = heads * cap * y_tok;
    ref.offset_from_seq_lens = c.offset;
    ref.seq_lens = seq_lens.data();
    ref.max_positions = c.offset ? cap - 3 : 0;
    ASSERT_TRUE(reference::ProjectRows(ref));

    DeviceArray<float> dxf(xf), dmats(mats), dy32(ref_y32.size());
    DeviceArray<uint16_t> dxh(xh), dy16(ref_y16.size());
    DeviceArray<int32_t> dlens(seq_lens);
    dy32.Poison();
    dy16.Poison();
    ProjectRowsArgs a = ref;
    a.x = c.x_dtype == DType::kF32 ? static_cast<const void*>(dxf.get()) : static_cast<const void*>(dxh.get());
    a.matrices = dmats.get();
    a.y = y32 ? static_cast<void*>(dy32.get()) : static_cast<void*>(dy16.get());
    a.seq_lens = dlens.get();
    KVR_ASSERT_CUDA(ProjectRows(a, nullptr));
    KVR_ASSERT_CUDA(cudaDeviceSynchronize());
    std::vector<float> got, want;
    int unwritten_mismatch = 0;
    const std::vector<float> g32 = y32 ? dy32.Download() : std::vector<float>();
    const std::vector<uint16_t> g16 = y32 ? std::vector<uint16_t>() : dy16.Download();
    for (size_t e = 0; e < y_elems; ++e) {
      const float w = y32 ? ref_y32[e] : HalfBitsToFloat(ref_y16[e], c.y_dtype);
      const float g = y32 ? g32[e] : HalfBitsToFloat(g16[e], c.y_dtype);
      if (std::isnan(w)) {
        unwritten_mismatch += !std::isnan(g);
      } else {
        want.push_back(w);
        got.push_back(g);
      }
    }
    EXPECT_EQ(unwritten_mismatch, 0);
    ASSERT_FALSE(want.empty());
    EXPECT_LE(RelErr(got, want), y32 ? 1e-5 : kTol);
  }
}

TEST(StepKernelsTest, ComputePageBoundsMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int i = 0;
  for (DType dtype : {DType::kBf16, DType::kF16}) {
    for (int32_t d : {64, 128}) {
      for (int32_t qp : {1, 5, 16, 64}) {
        const int32_t last_pages = i % 3 == 0 ? 0 : (i % 3 == 1 ? 1 : 3);
        const int32_t page_size = i % 2 == 0 ? 16 : 7;
        const bool hnd = (i / 2) % 2 == 1;
        ++i;
        const std::string name = DTypeName(dtype) + " d" + std::to_string(d) + " P" + std::to_string(qp) + " last" +
                                 std::to_string(last_pages) + " ps" + std::to_string(page_size) + (hnd ? " hnd" : " nhd");
        SCOPED_TRACE(name);
        const int32_t batch = 3, kv_heads = 2;
        PagedKv kv;
        kv.Build(rng, dtype, d, kv_heads, {1000, 333, 1}, page_size, hnd);
        kv.page_table[2] = -1;  // sequence 0 loses one KV page
        kv.Sync();
        const int32_t max_pages = (1000 + qp - 1) / qp - 2;  // the last two pages of sequence 0 are not written
        const int64_t head_stride = static_cast<int64_t>(max_pages) * d + 8;
        const int64_t seq_stride = head_stride * kv_heads;
        std::vector<uint16_t> ref_max(static_cast<size_t>(batch) * seq_stride, 0xffff), ref_min(ref_max);
        PageBoundsArgs ref;
        ref.kv = kv.host;
        ref.batch_size = batch;
        ref.quest_page_size = qp;
        ref.last_pages = last_pages;
        ref.page_max = ref_max.data();
        ref.page_min = ref_min.data();
        ref.seq_stride = seq_stride;
        ref.head_stride = head_stride;
        ref.max_pages = max_pages;
        ASSERT_TRUE(reference::ComputePageBounds(ref));
        DeviceArray<uint16_t> dmax(ref_max.size()), dmin(ref_min.size());
        dmax.Poison();
        dmin.Poison();
        PageBoundsArgs a = ref;
        a.kv = kv.dev;
        a.page_max = dmax.get();
        a.page_min = dmin.get();
        KVR_ASSERT_CUDA(ComputePageBounds(a, nullptr));
        KVR_ASSERT_CUDA(cudaDeviceSynchronize());
        EXPECT_TRUE(dmax.Download() == ref_max) << "page_max differs";
        EXPECT_TRUE(dmin.Download() == ref_min) << "page_min differs";
      }
    }
  }
}

TEST(StepKernelsTest, MaskScoresMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int32_t unit : {1, 16}) {
    for (int32_t sinks : {0, 4, 100}) {
      for (int32_t window : {0, 64}) {
        SCOPED_TRACE(Label({{"U", unit}, {"sinks", sinks}, {"window", window}}));
        const int32_t batch = 4, rows_per_seq = 8, cols = 20000 / unit, pad = 5;
        const std::vector<int32_t> seq_lens = {20000, 777, 0, 120};
        std::vector<float> scores = RandomNormal(rng, static_cast<size_t>(batch) * rows_per_seq * (cols + pad), 1.0f);
        DeviceArray<float> dscores(scores);
        DeviceArray<int32_t> dlens(seq_lens);
        MaskScoresArgs ref;
        ref.scores = scores.data();
        ref.num_rows = batch * rows_per_seq;
        ref.rows_per_seq = rows_per_seq;
        ref.num_cols = cols;
        ref.row_stride = cols + pad;
        ref.seq_lens = seq_lens.data();
        ref.sinks = sinks;
        ref.window = window;
        ref.unit = unit;
        ASSERT_TRUE(reference::MaskScores(ref));
        MaskScoresArgs a = ref;
        a.scores = dscores.get();
        a.seq_lens = dlens.get();
        KVR_ASSERT_CUDA(MaskScores(a, nullptr));
        KVR_ASSERT_CUDA(cudaDeviceSynchronize());
        EXPECT_TRUE(SameBits(dscores.Download(), scores));
      }
    }
  }
}

TEST(StepKernelsTest, ComposeListsMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int32_t unit : {1, 4, 16}) {
    for (int32_t num_selected : {0, 1, 300}) {
      for (bool null_selection : {false, true}) {
        if (null_selection && num_selected > 1) continue;
        SCOPED_TRACE(Label({{"U", unit}, {"n", num_selected}, {"null", null_selection}}));
        const int32_t batch = 4, lists = 8, sinks = 4, window = 64;
        const std::vector<int32_t> seq_lens = {50000, 900, 3, 0};
        const int32_t max_len = sinks + window + num_selected * unit + 11;
        // Distinct entries per list (a top-k's output), some -1.
        std::vector<int32_t> selected(std::max<size_t>(static_cast<size_t>(batch) * lists * num_selected, 1));
        for (int32_t b = 0; b < batch; ++b) {
          const int32_t cols = std::max(1, (seq_lens[b] + unit - 1) / unit);
          for (int32_t l = 0; l < lists; ++l) {
            std::vector<int32_t> all(std::max(cols, num_selected));
            std::iota(all.begin(), all.end(), 0);
            std::shuffle(all.begin(), all.end(), rng);
            for (int32_t e = 0; e < num_selected; ++e) {
              selected[(static_cast<size_t>(b) * lists + l) * num_selected + e] = rng() % 17 == 0 ? -1 : all[e];
            }
          }
        }
        std::vector<int32_t> positions(static_cast<size_t>(batch) * lists * max_len, -1), list_lens(batch * lists, -1);
        DeviceArray<int32_t> dlens(seq_lens), dsel(selected), dpos(positions.size()), dlist_lens(list_lens.size());
        dpos.Poison();
        dlist_lens.Poison();
        ComposeListsArgs ref;
        ref.batch_size = batch;
        ref.num_lists = lists;
        ref.seq_lens = seq_lens.data();
        ref.sinks = sinks;
        ref.window = window;
        ref.selected = null_selection ? nullptr : selected.data();
        ref.num_selected = num_selected;
        ref.unit = unit;
        ref.positions = positions.data();
        ref.list_lens = list_lens.data();
        ref.max_list_len = max_len;
        ASSERT_TRUE(reference::ComposeLists(ref));
        ComposeListsArgs a = ref;
        a.seq_lens = dlens.get();
        a.selected = null_selection ? nullptr : dsel.get();
        a.positions = dpos.get();
        a.list_lens = dlist_lens.get();
        KVR_ASSERT_CUDA(ComposeLists(a, nullptr));
        KVR_ASSERT_CUDA(cudaDeviceSynchronize());
        EXPECT_EQ(dlist_lens.Download(), list_lens);
        EXPECT_TRUE(dpos.Download() == positions) << "positions differ";
      }
    }
  }
}

TEST(StepKernelsTest, LaunchersRejectBadArgumentsWithoutLaunching) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(777);
  PagedKv kv;
  kv.Build(rng, DType::kBf16, 128, 2, {64}, 16, false);
  const std::vector<uint16_t> pool = kv.k;
  DeviceArray<int32_t> ints(1024);
  DeviceArray<float> floats(1024);
  DeviceArray<uint16_t> halves(4096);
  ints.Poison();
  floats.Poison();
  halves.Poison();
  auto expect_untouched = [&](const std::string& what) {
    KVR_ASSERT_CUDA(cudaDeviceSynchronize());
    EXPECT_EQ(cudaGetLastError(), cudaSuccess) << what;
    for (int32_t x : ints.Download()) ASSERT_EQ(x, -1) << what;
    for (float x : floats.Download()) ASSERT_TRUE(std::isnan(x)) << what;
    for (uint16_t x : halves.Download()) ASSERT_EQ(x, 0xffff) << what;
    EXPECT_TRUE(kv.dk.Download() == pool) << what;
  };

  AdvanceSeqLensArgs adv;
  adv.seq_lens = ints.get();
  adv.batch_size = 0;
  EXPECT_EQ(AdvanceSeqLens(adv, nullptr), cudaErrorInvalidValue);
  adv.batch_size = 4;
  adv.pages = ints.get() + 8;
  adv.page_size = 0;
  EXPECT_EQ(AdvanceSeqLens(adv, nullptr), cudaErrorInvalidValue);
  expect_untouched("advance");

  AppendKvArgs ap;
  ap.kv = kv.dev;
  ap.batch_size = 1;
  ap.num_tokens = 1;
  ap.k_src = halves.get();
  ap.v_src = halves.get();
  ap.src_token_stride = 128;
  {
    AppendKvArgs a = ap;
    a.src_head_stride = 4;
    EXPECT_EQ(AppendKv(a, nullptr), cudaErrorInvalidValue);
    a = ap;
    a.k_src = halves.get() + 1;
    EXPECT_EQ(AppendKv(a, nullptr), cudaErrorInvalidValue);
    a = ap;
    a.kv.dtype = DType::kF32;
    EXPECT_EQ(AppendKv(a, nullptr), cudaErrorInvalidValue);
    a = ap;
    a.num_tokens = 0;
    EXPECT_EQ(AppendKv(a, nullptr), cudaErrorInvalidValue);
    expect_untouched("append");
  }

  ProjectRowsArgs pr;
  pr.x = floats.get();
  pr.matrices = floats.get();
  pr.matrix_cols = 32;
  pr.batch_size = 1;
  pr.num_heads = 1;
  pr.num_tokens = 1;
  pr.head_dim = 128;
  pr.rank = 32;
  pr.y = floats.get();
  pr.y_token_stride = 32;
  {
    ProjectRowsArgs a = pr;
    a.head_dim = 96;
    EXPECT_EQ(ProjectRows(a, nullptr), cudaErrorInvalidValue);
    a = pr;
    a.rank = 0;
    EXPECT_EQ(ProjectRows(a, nullptr), cudaErrorInvalidValue);
    a = pr;
    a.y_dtype = static_cast<DType>(5);
    EXPECT_EQ(ProjectRows(a, nullptr), cudaErrorInvalidValue);
    expect_untouched("project");
  }

  PageBoundsArgs pb;
  pb.kv = kv.dev;
  pb.batch_size = 1;
  pb.page_max = halves.get();
  pb.page_min = halves.get();
  pb.max_pages = 4;
  pb.head_stride = 4 * 128;
  {
    PageBoundsArgs a = pb;
    a.quest_page_size = 0;
    EXPECT_EQ(ComputePageBounds(a, nullptr), cudaErrorInvalidValue);
    a = pb;
    a.max_pages = 5;  // head_stride too small
    EXPECT_EQ(ComputePageBounds(a, nullptr), cudaErrorInvalidValue);
    a = pb;
    a.page_max = halves.get() + 4;
    EXPECT_EQ(ComputePageBounds(a, nullptr), cudaErrorInvalidValue);
    expect_untouched("page bounds");
  }

  MaskScoresArgs ms;
  ms.scores = floats.get();
  ms.num_rows = 4;
  ms.num_cols = 16;
  ms.seq_lens = ints.get();
  ms.unit = 0;
  EXPECT_EQ(MaskScores(ms, nullptr), cudaErrorInvalidValue);
  ms.unit = 1;
  ms.rows_per_seq = 3;
  EXPECT_EQ(MaskScores(ms, nullptr), cudaErrorInvalidValue);
  expect_untouched("mask");

  ComposeListsArgs cl;
  cl.batch_size = 1;
  cl.num_lists = 2;
  cl.seq_lens = ints.get();
  cl.sinks = 4;
  cl.window = 8;
  cl.selected = ints.get();
  cl.num_selected = 4;
  cl.positions = ints.get() + 64;
  cl.list_lens = ints.get() + 32;
  cl.max_list_len = 15;  // < 4 + 8 + 4
  EXPECT_EQ(ComposeLists(cl, nullptr), cudaErrorInvalidValue);
  cl.max_list_len = 16;
  cl.unit = 0;
  EXPECT_EQ(ComposeLists(cl, nullptr), cudaErrorInvalidValue);
  expect_untouched("compose");
}

// A GPU-resident decode step captured once and replayed step after step:
// AdvanceSeqLens, AppendKv of the step's new K/V rows, ComposeLists (sinks,
// window and a fixed selection) and SparseDecodeAttention over the lists.
// Between replays only the source rows and the queries change (copied into
// the same buffers); every step is compared with the references run on the
// host copy of the state.
TEST(GraphCaptureTest, DecodeStepWithBookkeepingReplaysStepAfterStep) {
  SKIP_WITHOUT_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int32_t batch = 2, kv_heads = 2, group = 4, hq = kv_heads * group, d = 128, page_size = 16;
  const int32_t sinks = 4, window = 16, num_selected = 64, steps = 6;
  const DType dtype = DType::kBf16;
  PagedKv kv;
  // Pages for 400 tokens; the sequences start at 300 and 123.
  kv.Build(rng, dtype, d, kv_heads, {400, 400}, page_size, false);
  kv.seq_lens = {300, 123};
  kv.Sync();
  std::vector<int32_t> selected(static_cast<size_t>(batch) * kv_heads * num_selected);
  for (int32_t b = 0; b < batch; ++b) {
    for (int32_t h = 0; h < kv_heads; ++h) {
      std::vector<int32_t> all(kv.seq_lens[b]);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      std::copy(all.begin(), all.begin() + num_selected, selected.begin() + (b * kv_heads + h) * num_selected);
    }
  }
  const int32_t max_len = sinks + window + num_selected;
  const size_t src_elems = static_cast<size_t>(batch) * kv_heads * d;
  DeviceArray<uint16_t> dks(src_elems), dvs(src_elems);
  DeviceArray<float> dq(static_cast<size_t>(batch) * hq * d), d_o(dq.size()), d_lse(static_cast<size_t>(batch) * hq);
  DeviceArray<int32_t> dsel(selected), dpos(static_cast<size_t>(batch) * kv_heads * max_len),
      dlist_lens(static_cast<size_t>(batch) * kv_heads);

  AdvanceSeqLensArgs adv;
  adv.batch_size = batch;
  adv.num_tokens = 1;
  AppendKvArgs app;
  app.batch_size = batch;
  app.num_tokens = 1;
  app.src_token_stride = d;
  app.src_head_stride = d;
  app.src_batch_stride = static_cast<int64_t>(kv_heads) * d;
  ComposeListsArgs cl;
  cl.batch_size = batch;
  cl.num_lists = kv_heads;
  cl.sinks = sinks;
  cl.window = window;
  cl.num_selected = num_selected;
  cl.max_list_len = max_len;
  SparseDecodeArgs sp;
  sp.batch_size = batch;
  sp.num_q_heads = hq;
  sp.max_list_len = max_len;

  // Device arguments.
  AdvanceSeqLensArgs dadv = adv;
  dadv.seq_lens = kv.dseq_lens.get();
  AppendKvArgs dapp = app;
  dapp.kv = kv.dev;
  dapp.k_src = dks.get();
  dapp.v_src = dvs.get();
  ComposeListsArgs dcl = cl;
  dcl.seq_lens = kv.dseq_lens.get();
  dcl.selected = dsel.get();
  dcl.positions = dpos.get();
  dcl.list_lens = dlist_lens.get();
  SparseDecodeArgs dsp = sp;
  dsp.kv = kv.dev;
  dsp.q = dq.get();
  dsp.positions = dpos.get();
  dsp.list_lens = dlist_lens.get();
  dsp.o = d_o.get();
  dsp.lse = d_lse.get();
  Workspace ws(SparseDecodeAttentionWorkspaceBytes(dsp));

  cudaStream_t stream;
  KVR_ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // The attention launcher's first call on a device sets a kernel attribute:
  // make it outside capture (over the still-uncomposed, poisoned lists with
  // length 0), as its header asks.
  dlist_lens.Poison(0);
  KVR_ASSERT_CUDA(SparseDecodeAttention(dsp, ws.get(), stream));
  KVR_ASSERT_CUDA(cudaStreamSynchronize(stream));

  cudaGraph_t graph;
  KVR_ASSERT_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  cudaError_t captured = AdvanceSeqLens(dadv, stream);
  if (captured == cudaSuccess) captured = AppendKv(dapp, stream);
  if (captured == cudaSuccess) captured = ComposeLists(dcl, stream);
  if (captured == cudaSuccess) captured = SparseDecodeAttention(dsp, ws.get(), stream);
  KVR_ASSERT_CUDA(cudaStreamEndCapture(stream, &graph));
  KVR_ASSERT_CUDA(captured);
  cudaGraphExec_t exec;
  KVR_ASSERT_CUDA(cudaGraphInstantiate(&exec, graph, 0));

  for (int32_t step = 0; step < steps; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const std::vector<uint16_t> ks = RandomHalf(rng, src_elems, dtype);
    const std::vector<uint16_t> vs = RandomHalf(rng, src_elems, dtype);
    const std::vector<float> q = RandomNormal(rng, dq.size(), 2.0f);
    dks.Upload(ks);
    dvs.Upload(vs);
    dq.Upload(q);
    d_o.Poison();
    d_lse.Poison();
    // The copies above run on the legacy stream, which does not order the
    // non-blocking `stream`: finish them before the replay.
    KVR_ASSERT_CUDA(cudaDeviceSynchronize());
    KVR_ASSERT_CUDA(cudaGraphLaunch(exec, stream));

    // The same step on the host.
    AdvanceSeqLensArgs hadv = adv;
    hadv.seq_lens = kv.seq_lens.data();
    ASSERT_TRUE(reference::AdvanceSeqLens(hadv));
    AppendKvArgs happ = app;
    happ.kv = kv.host;
    happ.k_src = ks.data();
    happ.v_src = vs.data();
    ASSERT_TRUE(reference::AppendKv(happ));
    std::vector<int32_t> positions(dpos.size(), -1), list_lens(dlist_lens.size());
    ComposeListsArgs hcl = cl;
    hcl.seq_lens = kv.seq_lens.data();
    hcl.selected = selected.data();
    hcl.positions = positions.data();
    hcl.list_lens = list_lens.data();
    ASSERT_TRUE(reference::ComposeLists(hcl));
    std::vector<float> o(dq.size()), lse(d_lse.size());
    SparseDecodeArgs hsp = sp;
    hsp.kv = kv.host;
    hsp.q = q.data();
    hsp.positions = positions.data();
    hsp.list_lens = list_lens.data();
    hsp.o = o.data();
    hsp.lse = lse.data();
    ASSERT_TRUE(reference::SparseDecodeAttention(hsp));

    KVR_ASSERT_CUDA(cudaStreamSynchronize(stream));
    EXPECT_EQ(kv.dseq_lens.Download(), kv.seq_lens);
    EXPECT_EQ(dlist_lens.Download(), list_lens);
    const std::vector<int32_t> got_pos = dpos.Download();
    for (size_t li = 0; li < list_lens.size(); ++li) {
      ASSERT_TRUE(std::equal(positions.begin() + li * max_len, positions.begin() + li * max_len + list_lens[li],
                             got_pos.begin() + li * max_len))
          << "list " << li;
    }
    EXPECT_LE(RelErr(d_o.Download(), o), kTol);
    EXPECT_EQ(LseMismatches(d_lse.Download(), lse), 0);
  }
  EXPECT_TRUE(kv.dk.Download() == kv.k) << "K pool differs after the steps";
  EXPECT_TRUE(kv.dv.Download() == kv.v) << "V pool differs after the steps";
  KVR_ASSERT_CUDA(cudaGraphExecDestroy(exec));
  KVR_ASSERT_CUDA(cudaGraphDestroy(graph));
  KVR_ASSERT_CUDA(cudaStreamDestroy(stream));
}

}  // namespace
}  // namespace kvrecall::gpu
