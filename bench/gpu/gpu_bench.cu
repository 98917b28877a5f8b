// gpu_bench: times every gpu/kernels launcher on the device, next to the two
// floors measured in the same run (bytes / device-to-device copy bandwidth,
// flops / FP32 FMA rate), and writes the rows that bench/gpu/torch_peers.py
// reruns with PyTorch peers to join into one table (docs/gpu.md).
//
//   gpu_bench --out DIR [--quick] [--filter SUBSTRING] [--sweep]
//
// Every launcher row runs the launcher's default choices (path "auto"). The
// shapes where a kernel was behind its peer (docs/gpu.md: dense attention
// with GQA group 8, LokiScore without top-k at 128K, sparse attention at
// batch 1 with >= 1K positions, sparse attention with GQA group 8) are also
// run on the previous path in the same run: "fma, merge kernel" (DecodeMath::kFma,
// DecodeMerge::kKernel) or "f32 scores"; batch-1 rows also on "fma, cluster
// merge". --quick runs only those shapes.
//
// --sweep only times the decode launchers at several num_splits
// (DIR/sweep.csv), the data behind PlanDecodeSplit.
// --filter runs only the configurations whose description ("sparse_attention
// b=8 ctx=131072 L=6553 page=16", "dense_attention b=1 ctx=32768 top=0",
// "merge_states J=16", "top_k rows=1 n=131072 k=2048", ...) contains it.
// Writes DIR/device.csv (device, machine, measured ceilings) and
// DIR/ours.csv (one row per kernel configuration). Each timing is the median
// of event-timed CUDA-graph replays of one launcher call, each preceded by an
// L2 flush (reading 256 MiB), after warm-up. Progress goes to stderr.

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gpu/kernels/decode_attention.h"
#include "gpu/kernels/kernel_args.h"
#include "gpu/kernels/loki_score.h"
#include "gpu/kernels/merge_states.h"
#include "gpu/kernels/quest_score.h"
#include "gpu/kernels/top_k.h"

namespace kvrecall::gpu::bench {
namespace {

#define BENCH_CHECK(expr)                                                                        \
  do {                                                                                           \
    const cudaError_t bench_e_ = (expr);                                                         \
    if (bench_e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(bench_e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

// Model geometry of the benchmark (Llama-3-8B attention): 32 query heads,
// 8 KV heads, head_dim 128, bf16.
constexpr int32_t kHq = 32;
constexpr int32_t kHkv = 8;
constexpr int32_t kD = 128;

__device__ __forceinline__ uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

// Approximately N(0, 1) values (sum of four uniforms), as bf16 or f32.
__global__ void FillNormalBf16(uint16_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = Mix(seed ^ (i * 0x9e3779b97f4a7c15ULL));
    const float u = ((h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48)) / 65536.0f;
    const float x = (u - 2.0f) * 1.7320508f;
    p[i] = static_cast<uint16_t>(__float_as_uint(x) >> 16);
  }
}

__global__ void FillNormalF32(float* p, size_t n, uint64_t seed, float stddev) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = Mix(seed ^ (i * 0x9e3779b97f4a7c15ULL));
    const float u = ((h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48)) / 65536.0f;
    p[i] = (u - 2.0f) * 1.7320508f * stddev;
  }
}

// Reads `n` words (the L2 flush: afterwards the L2 holds clean lines of this
// buffer, so no write-back of foreign data lands in the timed region).
__global__ void ReadFlushKernel(const uint4* p, size_t n, unsigned* sink) {
  unsigned x = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcg(p + i);
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (x == 0x12345678u) sink[0] = x;
}

// Device-to-device copy with 16-byte accesses (the bandwidth ceiling).
__global__ void CopyKernel(const uint4* __restrict__ src, uint4* __restrict__ dst, size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = __ldcs(src + i), b = __ldcs(src + i + stride), c = __ldcs(src + i + 2 * stride),
                d = __ldcs(src + i + 3 * stride);
    __stcs(dst + i, a);
    __stcs(dst + i + stride, b);
    __stcs(dst + i + 2 * stride, c);
    __stcs(dst + i + 3 * stride, d);
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

// FP32 FMA throughput: 8 independent chains per thread.
__global__ void FmaRateKernel(float* out, int iters, float a, float b) {
  float x[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) x[j] = threadIdx.x * 1e-3f + j;
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = fmaf(x[j], a, b);
  }
  float s = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += x[j];
  if (s == 12345.678f) out[0] = s;  // keeps the chains alive
}

template <typename T>
T* DeviceAlloc(size_t n) {
  void* p = nullptr;
  BENCH_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  return static_cast<T*>(p);
}

template <typename T>
T* Upload(const std::vector<T>& host) {
  T* p = DeviceAlloc<T>(host.size());
  BENCH_CHECK(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

void FillBf16(uint16_t* p, size_t n, uint64_t seed) {
  FillNormalBf16<<<4096, 256>>>(p, n, seed);
  BENCH_CHECK(cudaGetLastError());
}

void FillF32(float* p, size_t n, uint64_t seed, float stddev) {
  FillNormalF32<<<4096, 256>>>(p, n, seed, stddev);
  BENCH_CHECK(cudaGetLastError());
}

// Median device time of `fn` (which launches its work on stream()) in
// microseconds: `fn` is captured once into a CUDA graph and the graph
// replays are timed with events, so host launch overhead is not counted;
// the L2 is flushed before every replay by reading a 256 MiB buffer (5x the
// L2), which leaves it holding clean lines.
class Timer {
 public:
  Timer() {
    BENCH_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    BENCH_CHECK(cudaEventCreate(&start_));
    BENCH_CHECK(cudaEventCreate(&stop_));
    flush_ = DeviceAlloc<unsigned char>(kFlushBytes);
    BENCH_CHECK(cudaMemset(flush_, 1, kFlushBytes));
    sink_ = DeviceAlloc<unsigned>(1);
  }
  cudaStream_t stream() const { return stream_; }
  // graph = false times eager launches instead (host overhead included).
  double MedianUs(const std::function<cudaError_t()>& fn, int min_reps = 10, bool graph_replay = true) {
    for (int i = 0; i < 3; ++i) BENCH_CHECK(fn());  // warm-up (also sets kernel attributes)
    BENCH_CHECK(cudaStreamSynchronize(stream_));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    if (graph_replay) {
      BENCH_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
      const cudaError_t captured = fn();
      BENCH_CHECK(cudaStreamEndCapture(stream_, &graph));
      BENCH_CHECK(captured);
      BENCH_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    }
    std::vector<double> t;
    const auto wall0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 200; ++i) {
      ReadFlushKernel<<<1024, 256, 0, stream_>>>(reinterpret_cast<const uint4*>(flush_), kFlushBytes / 16, sink_);
      BENCH_CHECK(cudaGetLastError());
      BENCH_CHECK(cudaEventRecord(start_, stream_));
      BENCH_CHECK(graph_replay ? cudaGraphLaunch(exec, stream_) : fn());
      BENCH_CHECK(cudaEventRecord(stop_, stream_));
      BENCH_CHECK(cudaEventSynchronize(stop_));
      float ms = 0;
      BENCH_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
      t.push_back(ms * 1e3);
      const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
      if (static_cast<int>(t.size()) >= min_reps && wall > 0.3) break;
    }
    if (graph_replay) {
      BENCH_CHECK(cudaGraphExecDestroy(exec));
      BENCH_CHECK(cudaGraphDestroy(graph));
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }

 private:
  static constexpr size_t kFlushBytes = size_t{256} << 20;
  cudaStream_t stream_;
  cudaEvent_t start_, stop_;
  unsigned char* flush_;
  unsigned* sink_;
};

std::string CpuModel() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t c = line.find(':');
      return c == std::string::npos ? line : line.substr(c + 2);
    }
  }
  return "unknown";
}

// The launcher choices a row runs with.
struct Path {
  const char* name;
  DecodeMath math = DecodeMath::kAuto;
  DecodeMerge merge = DecodeMerge::kAuto;
  DType scores_dtype = DType::kF32;  // LokiScore
};
constexpr Path kAutoPath{"auto"};
constexpr Path kOldDecodePath{"fma, merge kernel", DecodeMath::kFma, DecodeMerge::kKernel};
// Batch-1 rows also run this, to separate the cluster merge from the tensor-core loop.
constexpr Path kFmaClusterPath{"fma, cluster merge", DecodeMath::kFma, DecodeMerge::kCluster};

struct Row {
  std::string kernel, variant, path = "auto";
  int64_t batch = 0, ctx = 0, tokens = 0, rows = 0, n = 0, k = 0, states = 0, page_size = 0, hq = kHq;
  double ours_us = 0, bytes = 0, flops = 0;
};

class Bench {
 public:
  Bench(std::string out_dir, bool quick, std::string filter, bool sweep)
      : out_dir_(std::move(out_dir)), quick_(quick), filter_(std::move(filter)), sweep_(sweep) {}

  void Run() {
    MeasureDevice();
    if (sweep_) {
      RunSweep();
      return;
    }
    RunSparse();
    RunDense();
    if (!quick_) {
      RunMerge();
      RunTopK();
    }
    RunLoki();
    if (!quick_) RunQuest();
    WriteRows();
    BENCH_CHECK(cudaDeviceSynchronize());
  }

 private:
  void Progress(const std::string& what) { std::fprintf(stderr, "[gpu_bench] %s\n", what.c_str()); }

  // Whether a configuration (described as "kernel key=value ...") runs under --filter.
  bool Want(const std::string& desc) const { return filter_.empty() || desc.find(filter_) != std::string::npos; }

  void MeasureDevice() {
    cudaDeviceProp prop;
    BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
    sms_ = prop.multiProcessorCount;
    // Device-to-device copy, bytes read + written: the faster of an eager
    // cudaMemcpyAsync and a 16-byte copy kernel (a memcpy node in a graph
    // takes a slower path, so the memcpy is timed eagerly).
    const size_t bytes = size_t{2} << 30;
    unsigned char* a = DeviceAlloc<unsigned char>(bytes);
    unsigned char* b = DeviceAlloc<unsigned char>(bytes);
    BENCH_CHECK(cudaMemset(a, 1, bytes));
    const double memcpy_us = timer_.MedianUs(
        [&] { return cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, timer_.stream()); }, 10,
        /*graph_replay=*/false);
    const double kernel_us = timer_.MedianUs([&] {
      CopyKernel<<<sms_ * 8, 512, 0, timer_.stream()>>>(reinterpret_cast<const uint4*>(a), reinterpret_cast<uint4*>(b),
                                                        bytes / 16);
      return cudaGetLastError();
    });
    copy_gbps_ = 2.0 * bytes / std::min(memcpy_us, kernel_us) / 1e3;
    Progress("copy: cudaMemcpyAsync " + std::to_string(2.0 * bytes / memcpy_us / 1e3) + " GB/s, copy kernel " +
             std::to_string(2.0 * bytes / kernel_us / 1e3) + " GB/s");
    BENCH_CHECK(cudaFree(a));
    BENCH_CHECK(cudaFree(b));
    // FP32 FMA rate.
    float* sink = DeviceAlloc<float>(1);
    const int iters = 1 << 14;
    const int blocks = sms_ * 8, threads = 256;
    const double fma_us = timer_.MedianUs([&] {
      FmaRateKernel<<<blocks, threads, 0, timer_.stream()>>>(sink, iters, 0.999f, 1e-4f);
      return cudaGetLastError();
    });
    fma_tflops_ = 2.0 * 8 * iters * static_cast<double>(blocks) * threads / fma_us / 1e6;
    BENCH_CHECK(cudaFree(sink));
    std::ofstream f(out_dir_ + "/device.csv");
    f << "name,sms,l2_bytes,copy_gbps,fma_tflops,cpu_model,cpu_cores\n";
    f << '"' << prop.name << "\"," << sms_ << ',' << prop.l2CacheSize << ',' << copy_gbps_ << ',' << fma_tflops_
      << ",\"" << CpuModel() << "\"," << std::thread::hardware_concurrency() << '\n';
    Progress(std::string("device ") + prop.name + ": copy " + std::to_string(copy_gbps_) + " GB/s, FP32 FMA " +
             std::to_string(fma_tflops_) + " TFLOP/s");
  }

  // A paged bf16 KV pool of `pool_tokens` tokens, [pages, page_size, kHkv, kD].
  struct Pool {
    uint16_t* k = nullptr;
    uint16_t* v = nullptr;
    int64_t tokens = 0;
  };
  void EnsurePool(int64_t tokens) {
    if (pool_.tokens >= tokens) return;
    if (pool_.k != nullptr) {
      BENCH_CHECK(cudaFree(pool_.k));
      BENCH_CHECK(cudaFree(pool_.v));
    }
    const size_t elems = static_cast<size_t>(tokens) * kHkv * kD;
    pool_.k = DeviceAlloc<uint16_t>(elems);
    pool_.v = DeviceAlloc<uint16_t>(elems);
    FillBf16(pool_.k, elems, 1);
    FillBf16(pool_.v, elems, 2);
    pool_.tokens = tokens;
    Progress("KV pool of " + std::to_string(tokens) + " tokens (" + std::to_string(2.0 * elems * 2 / 1e9) + " GB)");
  }

  // Page table [batch, ctx / page_size] of distinct random pages of the pool.
  std::vector<int32_t> RandomPageTable(int64_t batch, int64_t ctx, int32_t page_size, int64_t pool_pages) {
    const int64_t per_seq = (ctx + page_size - 1) / page_size;
    std::vector<int32_t> all(pool_pages);
    std::iota(all.begin(), all.end(), 0);
    // Partial Fisher-Yates: the first batch * per_seq entries.
    for (int64_t i = 0; i < batch * per_seq; ++i) std::swap(all[i], all[i + rng_() % (pool_pages - i)]);
    all.resize(batch * per_seq);
    return all;
  }

  PagedKvCache MakeCache(int32_t page_size, const int32_t* page_table, int32_t max_pages, const int32_t* seq_lens) {
    PagedKvCache kv;
    kv.k = pool_.k;
    kv.v = pool_.v;
    kv.dtype = DType::kBf16;
    kv.head_dim = kD;
    kv.num_kv_heads = kHkv;
    kv.page_size = page_size;
    kv.num_pages = static_cast<int32_t>(pool_.tokens / page_size);
    SetNhdStrides(&kv);
    kv.page_table = page_table;
    kv.max_pages_per_seq = max_pages;
    kv.seq_lens = seq_lens;
    return kv;
  }

  // Sparse rows behind their peer before DecodeMath::kMma / DecodeMerge::kCluster:
  // batch 1 with >= 1K positions, and GQA group 8.
  static bool SparseCompared(int64_t batch, int64_t L, int32_t page_size, int32_t hq) {
    return page_size == 16 && ((batch == 1 && L >= 1024 && hq == kHq) || (batch == 8 && hq == 64));
  }

  void RunSparse() {
    const int64_t max_batch = quick_ ? 8 : 64;
    EnsurePool(max_batch * 131072);
    struct Cfg {
      int64_t ctx;
      double budget;
      int64_t batch;
      int32_t page_size;
      int32_t hq = kHq;
    };
    std::vector<Cfg> cfgs;
    for (int64_t ctx : {32768, 131072}) {
      for (double budget : {0.01, 0.05, 0.10}) {
        for (int64_t batch : {1, 8, 32, 64}) {
          if (batch <= max_batch) cfgs.push_back({ctx, budget, batch, 16});
        }
      }
    }
    for (int32_t ps : {1, 256}) cfgs.push_back({131072, 0.05, 8, ps});
    for (int64_t batch : {8, 32}) {
      if (batch <= max_batch) cfgs.push_back({131072, 0.05, batch, 16, 64});  // GQA group 8
    }
    for (const Cfg& c : cfgs) {
      const int64_t L = static_cast<int64_t>(c.ctx * c.budget);
      const bool compared = SparseCompared(c.batch, L, c.page_size, c.hq);
      if (quick_ && !compared) continue;
      if (!Want("sparse_attention b=" + std::to_string(c.batch) + " ctx=" + std::to_string(c.ctx) +
                " L=" + std::to_string(L) + " page=" + std::to_string(c.page_size) + " hq=" + std::to_string(c.hq))) {
        continue;
      }
      const int64_t pool_pages = pool_.tokens / c.page_size;
      const std::vector<int32_t> pt = RandomPageTable(c.batch, c.ctx, c.page_size, pool_pages);
      const int32_t max_pages = static_cast<int32_t>((c.ctx + c.page_size - 1) / c.page_size);
      std::vector<int32_t> lens(c.batch, static_cast<int32_t>(c.ctx));
      // Per (sequence, KV head): L distinct random positions, unordered (as a top-k emits them).
      std::vector<int32_t> pos(static_cast<size_t>(c.batch) * kHkv * L);
      std::vector<int32_t> all(c.ctx);
      std::iota(all.begin(), all.end(), 0);
      for (int64_t li = 0; li < c.batch * kHkv; ++li) {
        for (int64_t i = 0; i < L; ++i) std::swap(all[i], all[i + rng_() % (c.ctx - i)]);
        std::copy(all.begin(), all.begin() + L, pos.begin() + li * L);
      }
      int32_t* d_pt = Upload(pt);
      int32_t* d_lens = Upload(lens);
      int32_t* d_pos = Upload(pos);
      float* d_q = DeviceAlloc<float>(c.batch * c.hq * kD);
      FillF32(d_q, c.batch * c.hq * kD, 3, 1.0f);
      float* d_o = DeviceAlloc<float>(c.batch * c.hq * kD);
      float* d_lse = DeviceAlloc<float>(c.batch * c.hq);
      SparseDecodeArgs a;
      a.kv = MakeCache(c.page_size, d_pt, max_pages, d_lens);
      a.batch_size = static_cast<int32_t>(c.batch);
      a.num_q_heads = c.hq;
      a.q = d_q;
      a.positions = d_pos;
      a.max_list_len = static_cast<int32_t>(L);
      a.o = d_o;
      a.lse = d_lse;
      std::vector<Path> paths = {kAutoPath};
      if (compared && c.batch == 1) paths.push_back(kFmaClusterPath);
      if (compared) paths.push_back(kOldDecodePath);
      for (const Path& path : paths) {
        a.math = path.math;
        a.merge = path.merge;
        void* ws = DeviceAlloc<unsigned char>(SparseDecodeAttentionWorkspaceBytes(a));
        Row r;
        r.kernel = "sparse_attention";
        r.variant = "page" + std::to_string(c.page_size);
        r.path = path.name;
        r.batch = c.batch;
        r.ctx = c.ctx;
        r.tokens = L;
        r.page_size = c.page_size;
        r.hq = c.hq;
        r.ours_us = timer_.MedianUs([&] { return SparseDecodeAttention(a, ws, timer_.stream()); });
        r.bytes = static_cast<double>(c.batch) * kHkv * L * (2.0 * kD * 2 + 4) + c.batch * c.hq * (kD * 8.0 + 4);
        r.flops = 4.0 * c.batch * c.hq * L * kD;
        Add(r);
        BENCH_CHECK(cudaFree(ws));
      }
      for (void* p : {static_cast<void*>(d_pt), static_cast<void*>(d_lens), static_cast<void*>(d_pos),
                      static_cast<void*>(d_q), static_cast<void*>(d_o), static_cast<void*>(d_lse)}) {
        BENCH_CHECK(cudaFree(p));
      }
    }
  }

  // Times the sparse and dense launchers at several num_splits for a few
  // shapes (the choice of PlanDecodeSplit); writes DIR/sweep.csv.
  void RunSweep() {
    EnsurePool(int64_t{32} * 131072);
    std::ofstream f(out_dir_ + "/sweep.csv");
    f << "kernel,batch,ctx,tokens,num_splits,us\n";
    struct Cfg {
      bool dense;
      int64_t batch, ctx, tokens;
      std::vector<int32_t> splits;
    };
    const std::vector<Cfg> cfgs = {
        {false, 8, 131072, 6553, {0, 7, 8, 12, 16, 24, 33, 52}},
        {false, 1, 131072, 13107, {0, 13, 33, 52, 66, 80, 103, 132}},
        {false, 32, 131072, 1310, {0, 2, 3, 4, 5, 8, 11}},
        {false, 32, 32768, 327, {0, 1, 2, 3}},
        {true, 1, 32768, 32768, {0, 32, 48, 64, 66, 96, 128, 256}},
        {true, 8, 32768, 32768, {0, 32, 48, 64, 96, 128}},
    };
    const int32_t page_size = 16;
    for (const Cfg& c : cfgs) {
      const std::vector<int32_t> pt = RandomPageTable(c.batch, c.ctx, page_size, pool_.tokens / page_size);
      const int32_t max_pages = static_cast<int32_t>(c.ctx / page_size);
      std::vector<int32_t> lens(c.batch, static_cast<int32_t>(c.ctx));
      std::vector<int32_t> pos(static_cast<size_t>(c.batch) * kHkv * c.tokens);
      std::vector<int32_t> all(c.ctx);
      std::iota(all.begin(), all.end(), 0);
      for (int64_t li = 0; li < c.batch * kHkv; ++li) {
        for (int64_t i = 0; i < c.tokens; ++i) std::swap(all[i], all[i + rng_() % (c.ctx - i)]);
        std::copy(all.begin(), all.begin() + c.tokens, pos.begin() + li * c.tokens);
      }
      int32_t* d_pt = Upload(pt);
      int32_t* d_lens = Upload(lens);
      int32_t* d_pos = Upload(pos);
      float* d_q = DeviceAlloc<float>(c.batch * kHq * kD);
      FillF32(d_q, c.batch * kHq * kD, 3, 1.0f);
      float* d_o = DeviceAlloc<float>(c.batch * kHq * kD);
      float* d_lse = DeviceAlloc<float>(c.batch * kHq);
      float* d_scores = DeviceAlloc<float>(c.dense ? c.batch * kHq * c.ctx : 1);
      for (int32_t splits : c.splits) {
        double us;
        if (c.dense) {
          DenseDecodeArgs a;
          a.kv = MakeCache(page_size, d_pt, max_pages, d_lens);
          a.batch_size = static_cast<int32_t>(c.batch);
          a.num_q_heads = kHq;
          a.q = d_q;
          a.max_seq_len = static_cast<int32_t>(c.ctx);
          a.num_splits = splits;
          a.o = d_o;
          a.lse = d_lse;
          a.scores = d_scores;
          void* ws = DeviceAlloc<unsigned char>(DenseDecodeAttentionWorkspaceBytes(a));
          us = timer_.MedianUs([&] { return DenseDecodeAttention(a, ws, timer_.stream()); });
          BENCH_CHECK(cudaFree(ws));
        } else {
          SparseDecodeArgs a;
          a.kv = MakeCache(page_size, d_pt, max_pages, d_lens);
          a.batch_size = static_cast<int32_t>(c.batch);
          a.num_q_heads = kHq;
          a.q = d_q;
          a.positions = d_pos;
          a.max_list_len = static_cast<int32_t>(c.tokens);
          a.num_splits = splits;
          a.o = d_o;
          a.lse = d_lse;
          void* ws = DeviceAlloc<unsigned char>(SparseDecodeAttentionWorkspaceBytes(a));
          us = timer_.MedianUs([&] { return SparseDecodeAttention(a, ws, timer_.stream()); });
          BENCH_CHECK(cudaFree(ws));
        }
        f << (c.dense ? "dense" : "sparse") << ',' << c.batch << ',' << c.ctx << ',' << c.tokens << ',' << splits
          << ',' << us << '\n';
        const double bytes = static_cast<double>(c.batch) * kHkv * c.tokens * 2.0 * kD * 2;
        std::fprintf(stderr, "[sweep] %s b=%ld ctx=%ld L=%ld splits=%d: %.1f us (%.0f GB/s)\n",
                     c.dense ? "dense" : "sparse", static_cast<long>(c.batch), static_cast<long>(c.ctx),
                     static_cast<long>(c.tokens), splits, us, bytes / us / 1e3);
      }
      for (void* p : {static_cast<void*>(d_pt), static_cast<void*>(d_lens), static_cast<void*>(d_pos),
                      static_cast<void*>(d_q), static_cast<void*>(d_o), static_cast<void*>(d_lse),
                      static_cast<void*>(d_scores)}) {
        BENCH_CHECK(cudaFree(p));
      }
    }
  }

  void RunDense() {
    struct Cfg {
      int64_t ctx, batch;
      int32_t top_k;
      int32_t hq = kHq;
    };
    std::vector<Cfg> cfgs;
    for (int64_t ctx : {32768, 131072}) {
      for (int64_t batch : {1, 8, 32}) {
        if (quick_ && batch > 8) continue;
        cfgs.push_back({ctx, batch, 0});
        cfgs.push_back({ctx, batch, 2048});
      }
    }
    cfgs.push_back({32768, 8, 0, 64});  // GQA group 8
    for (const Cfg& c : cfgs) {
      // Behind its peer before DecodeMath::kMma: GQA group 8.
      const bool compared = c.hq == 64;
      if (quick_ && !compared) continue;
      if (!Want("dense_attention b=" + std::to_string(c.batch) + " ctx=" + std::to_string(c.ctx) +
                " top=" + std::to_string(c.top_k) + " hq=" + std::to_string(c.hq))) {
        continue;
      }
      EnsurePool(c.batch * c.ctx);
      const int32_t page_size = 16;
      const std::vector<int32_t> pt = RandomPageTable(c.batch, c.ctx, page_size, pool_.tokens / page_size);
      const int32_t max_pages = static_cast<int32_t>(c.ctx / page_size);
      std::vector<int32_t> lens(c.batch, static_cast<int32_t>(c.ctx));
      int32_t* d_pt = Upload(pt);
      int32_t* d_lens = Upload(lens);
      float* d_q = DeviceAlloc<float>(c.batch * c.hq * kD);
      FillF32(d_q, c.batch * c.hq * kD, 4, 1.0f);
      float* d_o = DeviceAlloc<float>(c.batch * c.hq * kD);
      float* d_lse = DeviceAlloc<float>(c.batch * c.hq);
      float* d_scores = DeviceAlloc<float>(c.batch * c.hq * c.ctx);
      int32_t* d_top = DeviceAlloc<int32_t>(c.batch * c.hq * std::max(c.top_k, 1));
      DenseDecodeArgs a;
      a.kv = MakeCache(page_size, d_pt, max_pages, d_lens);
      a.batch_size = static_cast<int32_t>(c.batch);
      a.num_q_heads = c.hq;
      a.q = d_q;
      a.max_seq_len = static_cast<int32_t>(c.ctx);
      a.o = d_o;
      a.lse = d_lse;
      a.scores = d_scores;
      a.top_k = c.top_k;
      a.top_k_positions = d_top;
      std::vector<Path> paths = {kAutoPath};
      if (compared) paths.push_back(kOldDecodePath);
      for (const Path& path : paths) {
        a.math = path.math;
        a.merge = path.merge;
        void* ws = DeviceAlloc<unsigned char>(DenseDecodeAttentionWorkspaceBytes(a));
        Row r;
        r.kernel = "dense_attention";
        r.variant = c.top_k > 0 ? "scores+top" + std::to_string(c.top_k) : "scores";
        r.path = path.name;
        r.batch = c.batch;
        r.ctx = c.ctx;
        r.tokens = c.ctx;
        r.k = c.top_k;
        r.page_size = page_size;
        r.hq = c.hq;
        r.ours_us = timer_.MedianUs([&] { return DenseDecodeAttention(a, ws, timer_.stream()); });
        r.bytes = static_cast<double>(c.batch) * kHkv * c.ctx * 2.0 * kD * 2 + c.batch * c.hq * c.ctx * 4.0;
        r.flops = 4.0 * c.batch * c.hq * c.ctx * kD;
        Add(r);
        BENCH_CHECK(cudaFree(ws));
      }
      for (void* p : {static_cast<void*>(d_pt), static_cast<void*>(d_lens), static_cast<void*>(d_q),
                      static_cast<void*>(d_o), static_cast<void*>(d_lse), static_cast<void*>(d_scores),
                      static_cast<void*>(d_top)}) {
        BENCH_CHECK(cudaFree(p));
      }
    }
  }

  void RunMerge() {
    const int32_t heads = 64 * kHq;
    for (int32_t j : {2, 16, 128}) {
      if (!Want("merge_states J=" + std::to_string(j))) continue;
      float* o_states = DeviceAlloc<float>(static_cast<size_t>(j) * heads * kD);
      float* lse_states = DeviceAlloc<float>(static_cast<size_t>(j) * heads);
      FillF32(o_states, static_cast<size_t>(j) * heads * kD, 5, 1.0f);
      FillF32(lse_states, static_cast<size_t>(j) * heads, 6, 3.0f);
      float* o = DeviceAlloc<float>(static_cast<size_t>(heads) * kD);
      float* lse = DeviceAlloc<float>(heads);
      MergeStatesArgs a;
      a.o_states = o_states;
      a.lse_states = lse_states;
      a.num_states = j;
      a.num_heads = heads;
      a.head_dim = kD;
      a.o_state_stride = static_cast<int64_t>(heads) * kD;
      a.o_head_stride = kD;
      a.lse_state_stride = heads;
      a.lse_head_stride = 1;
      a.o = o;
      a.lse = lse;
      Row r;
      r.kernel = "merge_states";
      r.variant = "f32";
      r.rows = heads;
      r.states = j;
      r.ours_us = timer_.MedianUs([&] { return MergeStates(a, nullptr, timer_.stream()); });
      r.bytes = (static_cast<double>(j) + 1) * heads * (kD + 1) * 4.0;
      r.flops = 2.0 * j * heads * kD;
      Add(r);
      for (void* p : {static_cast<void*>(o_states), static_cast<void*>(lse_states), static_cast<void*>(o),
                      static_cast<void*>(lse)}) {
        BENCH_CHECK(cudaFree(p));
      }
    }
  }

  void RunTopK() {
    struct Cfg {
      int64_t rows, n;
      int32_t k;
    };
    std::vector<Cfg> cfgs = {{1, 131072, 2048},  {8, 131072, 2048},  {32, 131072, 2048}, {64, 131072, 2048},
                             {32, 32768, 256},   {32, 32768, 2048},  {1, 1048576, 8192}, {8, 1048576, 8192},
                             {256, 131072, 2048}};
    for (const Cfg& c : cfgs) {
      if (!Want("top_k rows=" + std::to_string(c.rows) + " n=" + std::to_string(c.n) + " k=" + std::to_string(c.k))) {
        continue;
      }
      float* scores = DeviceAlloc<float>(c.rows * c.n);
      FillF32(scores, c.rows * c.n, 7, 1.0f);
      int32_t* idx = DeviceAlloc<int32_t>(c.rows * c.k);
      float* vals = DeviceAlloc<float>(c.rows * c.k);
      TopKArgs a;
      a.scores = scores;
      a.num_rows = static_cast<int32_t>(c.rows);
      a.num_cols = static_cast<int32_t>(c.n);
      a.k = c.k;
      a.indices = idx;
      a.values = vals;
      void* ws = DeviceAlloc<unsigned char>(TopKWorkspaceBytes(a));
      Row r;
      r.kernel = "top_k";
      r.variant = "f32";
      r.rows = c.rows;
      r.n = c.n;
      r.k = c.k;
      r.ours_us = timer_.MedianUs([&] { return TopK(a, ws, timer_.stream()); });
      r.bytes = static_cast<double>(c.rows) * c.n * 4.0 + c.rows * c.k * 8.0;
      r.flops = 0;
      Add(r);
      for (void* p : {static_cast<void*>(scores), static_cast<void*>(idx), static_cast<void*>(vals), ws}) {
        BENCH_CHECK(cudaFree(p));
      }
    }
  }

  void RunLoki() {
    const int32_t rank = 32;
    for (int64_t ctx : {32768, 131072}) {
      for (int64_t batch : {1, 16}) {
        for (int32_t k : {0, 2048}) {
          // Behind its peer (a bf16 matmul) with f32 scores: scores only at 128K.
          const bool compared = k == 0 && ctx == 131072;
          if (quick_ && !compared) continue;
          if (!Want("loki_score b=" + std::to_string(batch) + " ctx=" + std::to_string(ctx) + " k=" + std::to_string(k))) {
            continue;
          }
          const size_t key_elems = static_cast<size_t>(batch) * kHkv * ctx * rank;
          uint16_t* keys = DeviceAlloc<uint16_t>(key_elems);
          FillBf16(keys, key_elems, 8);
          float* q = DeviceAlloc<float>(batch * kHq * rank);
          FillF32(q, batch * kHq * rank, 9, 1.0f);
          std::vector<int32_t> lens(batch, static_cast<int32_t>(ctx));
          int32_t* d_lens = Upload(lens);
          float* scores = DeviceAlloc<float>(batch * kHq * ctx);  // also holds 16-bit scores
          int32_t* top = DeviceAlloc<int32_t>(batch * kHq * std::max(k, 1));
          LokiScoreArgs a;
          a.q = q;
          a.keys = keys;
          a.rank = rank;
          a.head_dim = kD;
          a.batch_size = static_cast<int32_t>(batch);
          a.num_q_heads = kHq;
          a.num_kv_heads = kHkv;
          a.head_stride = ctx * rank;
          a.seq_stride = a.head_stride * kHkv;
          a.seq_lens = d_lens;
          a.max_seq_len = static_cast<int32_t>(ctx);
          a.scores = scores;
          a.k = k;
          a.top_k_positions = top;
          // Scores only: f32 (the launcher's default) and bf16 (as the peer writes them).
          std::vector<Path> paths = {Path{"f32 scores"}};
          if (k == 0) paths.push_back(Path{"bf16 scores", DecodeMath::kAuto, DecodeMerge::kAuto, DType::kBf16});
          for (const Path& path : paths) {
            a.scores_dtype = path.scores_dtype;
            void* ws = DeviceAlloc<unsigned char>(LokiScoreWorkspaceBytes(a));
            Row r;
            r.kernel = "loki_score";
            r.variant = k > 0 ? "r32+top" + std::to_string(k) : "r32";
            r.path = path.name;
            r.batch = batch;
            r.ctx = ctx;
            r.k = k;
            r.ours_us = timer_.MedianUs([&] { return LokiScore(a, ws, timer_.stream()); });
            r.bytes = static_cast<double>(key_elems) * 2 + batch * kHq * ctx * (DTypeBytes(path.scores_dtype) * 1.0);
            r.flops = 2.0 * batch * kHq * ctx * rank;
            Add(r);
            BENCH_CHECK(cudaFree(ws));
          }
          for (void* p : {static_cast<void*>(keys), static_cast<void*>(q), static_cast<void*>(d_lens),
                          static_cast<void*>(scores), static_cast<void*>(top)}) {
            BENCH_CHECK(cudaFree(p));
          }
        }
      }
    }
  }

  void RunQuest() {
    const int32_t page = 16;
    for (int64_t ctx : {32768, 131072}) {
      for (int64_t batch : {1, 16}) {
        const int32_t k = 128;  // pages: 2048 tokens
        if (!Want("quest_score b=" + std::to_string(batch) + " ctx=" + std::to_string(ctx))) continue;
        const int64_t pages = ctx / page;
        const size_t meta_elems = static_cast<size_t>(batch) * kHkv * pages * kD;
        uint16_t* pmax = DeviceAlloc<uint16_t>(meta_elems);
        uint16_t* pmin = DeviceAlloc<uint16_t>(meta_elems);
        FillBf16(pmax, meta_elems, 10);
        FillBf16(pmin, meta_elems, 11);
        float* q = DeviceAlloc<float>(batch * kHq * kD);
        FillF32(q, batch * kHq * kD, 12, 1.0f);
        std::vector<int32_t> np(batch, static_cast<int32_t>(pages));
        int32_t* d_np = Upload(np);
        float* scores = DeviceAlloc<float>(batch * kHq * pages);
        int32_t* top = DeviceAlloc<int32_t>(batch * kHq * k);
        QuestScoreArgs a;
        a.q = q;
        a.page_max = pmax;
        a.page_min = pmin;
        a.head_dim = kD;
        a.batch_size = static_cast<int32_t>(batch);
        a.num_q_heads = kHq;
        a.num_kv_heads = kHkv;
        a.head_stride = pages * kD;
        a.seq_stride = a.head_stride * kHkv;
        a.num_pages = d_np;
        a.max_pages = static_cast<int32_t>(pages);
        a.scores = scores;
        a.k = k;
        a.top_k_pages = top;
        void* ws = DeviceAlloc<unsigned char>(QuestScoreWorkspaceBytes(a));
        Row r;
        r.kernel = "quest_score";
        r.variant = "page16+top128";
        r.batch = batch;
        r.ctx = ctx;
        r.n = pages;
        r.k = k;
        r.page_size = page;
        r.ours_us = timer_.MedianUs([&] { return QuestScore(a, ws, timer_.stream()); });
        r.bytes = static_cast<double>(meta_elems) * 4 + batch * kHq * pages * 4.0;
        r.flops = 3.0 * batch * kHq * pages * kD;
        Add(r);
        for (void* p : {static_cast<void*>(pmax), static_cast<void*>(pmin), static_cast<void*>(q),
                        static_cast<void*>(d_np), static_cast<void*>(scores), static_cast<void*>(top), ws}) {
          BENCH_CHECK(cudaFree(p));
        }
      }
    }
  }

  void Add(const Row& r) {
    const double bw_floor = r.bytes / (copy_gbps_ * 1e3);
    std::fprintf(stderr, "[gpu_bench] %-16s %-14s %-17s b=%-3ld ctx=%-7ld L=%-6ld rows=%-4ld n=%-8ld k=%-5ld J=%-4ld: %9.1f us, %6.0f GB/s (%.0f%% of copy)\n",
                 r.kernel.c_str(), r.variant.c_str(), r.path.c_str(), static_cast<long>(r.batch), static_cast<long>(r.ctx),
                 static_cast<long>(r.tokens), static_cast<long>(r.rows), static_cast<long>(r.n),
                 static_cast<long>(r.k), static_cast<long>(r.states), r.ours_us, r.bytes / r.ours_us / 1e3,
                 100.0 * bw_floor / r.ours_us);
    rows_.push_back(r);
  }

  void WriteRows() {
    std::ofstream f(out_dir_ + "/ours.csv");
    f << "kernel,variant,path,batch,ctx,tokens,rows,n,k,states,page_size,hq,hkv,d,ours_us,bytes,flops\n";
    for (const Row& r : rows_) {
      f << r.kernel << ',' << r.variant << ",\"" << r.path << "\"," << r.batch << ',' << r.ctx << ',' << r.tokens << ',' << r.rows << ','
        << r.n << ',' << r.k << ',' << r.states << ',' << r.page_size << ',' << r.hq << ',' << kHkv << ',' << kD << ','
        << r.ours_us << ',' << r.bytes << ',' << r.flops << '\n';
    }
  }

  std::string out_dir_;
  bool quick_;
  std::string filter_;
  bool sweep_;
  Timer timer_;
  std::mt19937_64 rng_{2024};
  int sms_ = 0;
  double copy_gbps_ = 0, fma_tflops_ = 0;
  Pool pool_;
  std::vector<Row> rows_;
};

}  // namespace
}  // namespace kvrecall::gpu::bench

int main(int argc, char** argv) {
  std::string out = ".";
  std::string filter;
  bool quick = false;
  bool sweep = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--out" && i + 1 < argc) {
      out = argv[++i];
    } else if (arg == "--quick") {
      quick = true;
    } else if (arg == "--sweep") {
      sweep = true;
    } else if (arg == "--filter" && i + 1 < argc) {
      filter = argv[++i];
    } else {
      std::fprintf(stderr, "usage: gpu_bench [--out DIR] [--quick] [--filter SUBSTRING] [--sweep]\n");
      return 2;
    }
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "gpu_bench: no CUDA device\n");
    return 1;
  }
  kvrecall::gpu::bench::Bench(out, quick, filter, sweep).Run();
  return 0;
}
