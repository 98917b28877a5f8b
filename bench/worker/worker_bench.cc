// worker_bench: the attention of a whole decode step through DecodeSession
// on the GPU, for a Llama-3-8B-like geometry (32 layers, 32 query heads,
// 8 KV heads, d = 128, bf16, random K/V).
//
//   GPU-resident: dense (FULL at every layer: our DenseDecodeAttention) and
//     TidalDecode (arXiv 2410.05076) at a budget, per batch and context
//     length; each step captured once in a CUDA graph and replayed (median of
//     the replays, CUDA events). torch_sdpa_peer.py times PyTorch SDPA on the
//     same shapes in the same device command; run_device.sh joins the tables.
//   Offloaded (--offloaded): the prompt (16 GiB at 128K tokens) stored in a
//     kvrecalld started here, on this machine's CPUs; the GPU holds the sinks
//     and the window; seconds per token for the attention of all 32 layers,
//     with where the time went (SessionStats).
//
// Layers alias --pools KV pools round-robin (random K/V: the timing of a
// layer does not depend on which values it reads), which keeps batch 8 at
// 128K within GPU memory.

#include <cuda_runtime.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "bench/worker/random_fill.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/retrieval_client.h"
#include "clients/cpp/span_keys.h"
#include "common/npy.h"
#include "common/progress.h"
#include "common/status_macros.h"
#include "gpu/worker/decode_session.h"
#include "gpu/worker/policy.h"
#include "tests/testing/child_process.h"

ABSL_FLAG(std::vector<std::string>, contexts, std::vector<std::string>({"32768", "131072"}),
          "context lengths (tokens) of the GPU-resident rows");
ABSL_FLAG(std::vector<std::string>, batches, std::vector<std::string>({"1", "8"}),
          "batch sizes of the GPU-resident rows");
ABSL_FLAG(double, budget, 0.02, "TidalDecode token budget, a fraction of the context");
ABSL_FLAG(int32_t, reselect_layer, 13, "TidalDecode re-selection layer");
ABSL_FLAG(int32_t, pools, 4, "distinct KV pools the 32 layers alias");
ABSL_FLAG(int32_t, replays, 30, "timed graph replays per row");
ABSL_FLAG(bool, resident, true, "run the GPU-resident rows");
ABSL_FLAG(bool, offloaded, false, "run the offloaded rows (starts a kvrecalld)");
ABSL_FLAG(int64_t, offloaded_context, 131072, "context length of the offloaded rows");
ABSL_FLAG(std::vector<std::string>, offloaded_kinds, std::vector<std::string>({"quest"}),
          "index kinds kvrecalld selects with in the offloaded rows");
ABSL_FLAG(double, offloaded_budget, 0.01, "token budget of the offloaded selections");
ABSL_FLAG(int32_t, offloaded_window, 2048, "GPU-resident window of the offloaded rows");
ABSL_FLAG(int32_t, offloaded_steps, 20, "timed decode steps per offloaded row");
ABSL_FLAG(int32_t, layers, 32, "layers of the geometry (32: Llama-3-8B; fewer for small machines)");
ABSL_FLAG(std::string, backend, "cuda",
          "cuda, or cpu (offloaded rows only: the GPU's share runs on the CPU references)");
ABSL_FLAG(std::string, kvrecalld, "", "kvrecalld binary (default: next to this binary)");
ABSL_FLAG(std::string, out, "", "directory for worker_bench.csv (default: none)");

namespace kvrecall::bench {
namespace {

using ::kvrecall::testing::ChildProcess;
using ::kvrecall::testing::WaitForPortFile;

constexpr int32_t kHq = 32, kHkv = 8, kD = 128;

// Layers of the geometry (--layers; 32 = Llama-3-8B).
int32_t kLayers = 32;

#define CUDA_OK(expr)                                                                  \
  do {                                                                                 \
    const cudaError_t e_ = (expr);                                                     \
    if (e_ != cudaSuccess) {                                                           \
      return absl::InternalError(absl::StrCat(#expr, ": ", cudaGetErrorString(e_)));  \
    }                                                                                  \
  } while (0)

worker::ModelShape Shape() {
  worker::ModelShape m;
  m.num_layers = kLayers;
  m.num_q_heads = kHq;
  m.num_kv_heads = kHkv;
  m.head_dim = kD;
  m.kv_dtype = gpu::DType::kBf16;
  return m;
}

std::string SelfDir() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string p(buf, n);
  return p.substr(0, p.rfind('/'));
}

std::string CpuName() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      return std::string(absl::StripAsciiWhitespace(line.substr(line.find(':') + 1)));
    }
  }
  return "unknown CPU";
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Device buffers freed at scope exit.
struct DeviceMem {
  void* p = nullptr;
  ~DeviceMem() {
    if (p != nullptr) cudaFree(p);
  }
};

struct Row {
  std::string mode, policy;
  int64_t context = 0;
  int32_t batch = 0;
  double ms_per_step = 0;
  std::string note;
};

// --------------------------------------------------------- GPU-resident

absl::StatusOr<double> TimeResident(const worker::LayerPolicy& policy, int64_t context, int32_t batch) {
  worker::SessionOptions o;
  o.model = Shape();
  o.policy = policy;
  o.batch_size = batch;
  o.capacity_tokens = context + 256;
  o.page_size = 16;
  o.graph_safe = true;
  o.kv_pool_count = absl::GetFlag(FLAGS_pools);
  KVR_ASSIGN_OR_RETURN(auto backend, worker::CreateCudaBackend());
  KVR_ASSIGN_OR_RETURN(auto s, worker::DecodeSession::Create(o, std::move(backend)));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  KVR_RETURN_IF_ERROR(s->StartPrefix(std::vector<int64_t>(batch, context)));
  {
    const int64_t n = static_cast<int64_t>(batch) * kHkv * context * kD;
    DeviceMem k, v;
    CUDA_OK(cudaMalloc(&k.p, n * 2));
    CUDA_OK(cudaMalloc(&v.p, n * 2));
    for (int32_t l = 0; l < std::min(kLayers, o.kv_pool_count); ++l) {
      CUDA_OK(FillRandomBf16(static_cast<uint16_t*>(k.p), n, 2 * l + 1, 1.0f, stream));
      CUDA_OK(FillRandomBf16(static_cast<uint16_t*>(v.p), n, 2 * l + 2, 1.0f, stream));
      KVR_RETURN_IF_ERROR(s->LoadPrefixLayer(l, k.p, v.p, context, kHkv * context * kD,
                                             context * kD, kD, stream));
    }
    CUDA_OK(cudaStreamSynchronize(stream));
  }
  DeviceMem q, kn, vn, out;
  const int64_t nq = static_cast<int64_t>(batch) * kHq * kD, nkv = static_cast<int64_t>(batch) * kHkv * kD;
  CUDA_OK(cudaMalloc(&q.p, nq * 4 * kLayers));
  CUDA_OK(cudaMalloc(&kn.p, nkv * 2));
  CUDA_OK(cudaMalloc(&vn.p, nkv * 2));
  CUDA_OK(cudaMalloc(&out.p, nq * 4));
  CUDA_OK(FillRandomF32(static_cast<float*>(q.p), nq * kLayers, 77, 3.0f, stream));
  CUDA_OK(FillRandomBf16(static_cast<uint16_t*>(kn.p), nkv, 78, 1.0f, stream));
  CUDA_OK(FillRandomBf16(static_cast<uint16_t*>(vn.p), nkv, 79, 1.0f, stream));
  auto step = [&]() -> absl::Status {
    for (int32_t l = 0; l < kLayers; ++l) {
      KVR_RETURN_IF_ERROR(s->AttendLayer(l, static_cast<const float*>(q.p) + l * nq, kn.p, vn.p,
                                         static_cast<float*>(out.p), stream));
    }
    return absl::OkStatus();
  };
  KVR_RETURN_IF_ERROR(step());  // first launches set kernel attributes: outside capture
  CUDA_OK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const absl::Status captured = step();
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  KVR_RETURN_IF_ERROR(captured);
  cudaGraphExec_t exec;
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  CUDA_OK(cudaEventCreate(&a));
  CUDA_OK(cudaEventCreate(&b));
  std::vector<double> ms;
  const int replays = absl::GetFlag(FLAGS_replays);
  for (int r = 0; r < replays + 3; ++r) {
    CUDA_OK(cudaEventRecord(a, stream));
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaEventRecord(b, stream));
    CUDA_OK(cudaEventSynchronize(b));
    float t = 0;
    CUDA_OK(cudaEventElapsedTime(&t, a, b));
    if (r >= 3) ms.push_back(t);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaStreamDestroy(stream);
  return Median(ms);
}

absl::Status RunResident(std::vector<Row>* rows) {
  worker::LayerPolicy dense;
  dense.name = "dense";
  dense.sinks = 0;
  dense.window = 1;
  dense.layers.assign(kLayers, worker::LayerSpec());
  worker::TidalDecodeOptions t;
  t.num_layers = kLayers;
  t.reselect_layer = absl::GetFlag(FLAGS_reselect_layer);
  t.budget = worker::Budget{0, absl::GetFlag(FLAGS_budget)};
  KVR_ASSIGN_OR_RETURN(worker::LayerPolicy tidal, worker::TidalDecodePolicy(t));
  for (const std::string& cs : absl::GetFlag(FLAGS_contexts)) {
    int64_t context = 0;
    if (!absl::SimpleAtoi(cs, &context)) return absl::InvalidArgumentError("bad --contexts");
    for (const std::string& bs : absl::GetFlag(FLAGS_batches)) {
      int32_t batch = 0;
      if (!absl::SimpleAtoi(bs, &batch)) return absl::InvalidArgumentError("bad --batches");
      for (const auto* p : {&dense, &tidal}) {
        KVR_ASSIGN_OR_RETURN(double ms, TimeResident(*p, context, batch));
        rows->push_back(Row{"gpu-resident", p == &dense ? "dense (ours)" : "tidaldecode", context,
                            batch, ms, p == &dense ? "" : PolicySummary(*p)});
        std::fprintf(stderr, "worker_bench: %s T=%ld B=%d: %.3f ms/step\n", rows->back().policy.c_str(),
                     static_cast<long>(context), batch, ms);
      }
    }
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------- offloaded

absl::StatusOr<int> StartDaemon(ChildProcess* proc, const std::string& dir, int64_t memory_bytes) {
  std::string bin = absl::GetFlag(FLAGS_kvrecalld);
  if (bin.empty()) bin = SelfDir() + "/kvrecalld";
  KVR_RETURN_IF_ERROR(proc->Spawn({bin, "--listen=127.0.0.1:0", "--port_file=" + dir + "/port",
                                   "--data_dir=" + dir + "/data",
                                   absl::StrCat("--memory_capacity_bytes=", memory_bytes),
                                   absl::StrCat("--disk_capacity_bytes=", int64_t{1} << 30),
                                   "--index_build_threads=2", "--persist_indexes=false"},
                                  dir + "/kvrecalld.log"));
  absl::StatusOr<int> port = WaitForPortFile(*proc, dir + "/port", absl::Seconds(60));
  if (!port.ok()) {
    return absl::UnavailableError(absl::StrCat("kvrecalld did not start (", port.status().message(),
                                               "); see ", dir, "/kvrecalld.log"));
  }
  return *port;
}

// Backend memory for the offloaded rows, filled with the same counter-based
// random values on either backend (random_fill.h).
class Mem {
 public:
  Mem(worker::Backend* be, size_t bytes) : be_(be), bytes_(bytes) {
    auto p = be->Allocate(bytes);
    p_ = p.ok() ? *p : nullptr;
  }
  ~Mem() {
    if (p_ != nullptr) be_->Free(p_);
  }
  void* get() const { return p_; }
  absl::Status FillBf16(uint64_t seed, cudaStream_t stream) {
    if (p_ == nullptr) return absl::ResourceExhaustedError("allocation failed");
    const int64_t n = static_cast<int64_t>(bytes_ / 2);
    if (be_->is_device()) {
      CUDA_OK(FillRandomBf16(static_cast<uint16_t*>(p_), n, seed, 1.0f, stream));
      return absl::OkStatus();
    }
    FillRandomBf16Host(static_cast<uint16_t*>(p_), n, seed, 1.0f);
    return absl::OkStatus();
  }
  absl::Status FillF32(uint64_t seed, float scale, cudaStream_t stream) {
    if (p_ == nullptr) return absl::ResourceExhaustedError("allocation failed");
    const int64_t n = static_cast<int64_t>(bytes_ / 4);
    if (be_->is_device()) {
      CUDA_OK(FillRandomF32(static_cast<float*>(p_), n, seed, scale, stream));
      return absl::OkStatus();
    }
    FillRandomF32Host(static_cast<float*>(p_), n, seed, scale);
    return absl::OkStatus();
  }

 private:
  worker::Backend* be_;
  void* p_ = nullptr;
  size_t bytes_;
};

// Stores a random prompt of `tokens` tokens (all layers) as spans, the K/V
// of layer l being the values of seeds (2l+1, 2l+2) as [Hkv, tokens, d];
// returns the chain.
absl::StatusOr<std::vector<Hash128>> StorePrompt(client::KvStoreClient* kv, const v1::ModelGeometry& model,
                                                 int64_t tokens, worker::Backend* be, cudaStream_t stream) {
  const int64_t block = model.block_tokens();
  const int64_t layer_elems = static_cast<int64_t>(kHkv) * tokens * kD;
  // Sequence layout [L][K|V][Hkv][T][d], bf16.
  std::string seq(static_cast<size_t>(kLayers) * 2 * layer_elems * 2, '\0');
  Mem buf(be, layer_elems * 2);
  for (int32_t l = 0; l < kLayers; ++l) {
    for (int kv_i = 0; kv_i < 2; ++kv_i) {
      KVR_RETURN_IF_ERROR(buf.FillBf16(2 * l + 1 + kv_i, stream));
      KVR_RETURN_IF_ERROR(be->CopyToHost(seq.data() + (static_cast<size_t>(l) * 2 + kv_i) * layer_elems * 2,
                                         buf.get(), layer_elems * 2, stream));
    }
  }
  KVR_RETURN_IF_ERROR(be->Synchronize(stream));
  std::vector<uint32_t> ids(tokens);
  std::mt19937 rng(5);
  for (auto& t : ids) t = rng() % 256;
  KVR_ASSIGN_OR_RETURN(std::vector<client::OwnedSpan> spans,
                       client::SequenceToSpans(model, "", ids, seq, /*include_partial_tail=*/true));
  seq.clear();
  seq.shrink_to_fit();
  std::vector<Hash128> chain;
  const absl::Time start = absl::Now();
  StageProgress progress(&std::cerr, "worker_bench: storing the prompt", StderrProgressMode());
  for (size_t i = 0; i < spans.size(); i += 16) {
    std::vector<client::SpanToPut> put;
    for (size_t j = i; j < std::min(spans.size(), i + 16); ++j) {
      put.push_back(client::SpanToPut{spans[j].hash, spans[j].parent,
                                      static_cast<int32_t>(spans[j].token_ids.size()), spans[j].token_ids,
                                      spans[j].payload, false});
      chain.push_back(spans[j].hash);
    }
    KVR_RETURN_IF_ERROR(kv->PutSpans(model.model_id(), put).status());
    Progress p;
    p.stage = "spans";
    p.done = static_cast<int64_t>(std::min(spans.size(), i + 16));
    p.total = static_cast<int64_t>(spans.size());
    p.fraction = static_cast<double>(p.done) / static_cast<double>(p.total);
    progress.Update(p);
  }
  progress.Clear();
  std::fprintf(stderr, "worker_bench: stored the prompt in %.1f s (%ld spans of %ld tokens)\n",
               absl::ToDoubleSeconds(absl::Now() - start), static_cast<long>(spans.size()),
               static_cast<long>(block));
  return chain;
}

// One offloaded row: a policy and how reused selections travel.
struct Variant {
  std::string name;
  worker::LayerPolicy policy;
  worker::ReuseTransfer transfer;
};

// Per --offloaded_kinds kind: every layer selecting remotely, and
// TidalDecode with remote selection reusing by positions and by fetched rows.
absl::StatusOr<std::vector<Variant>> OffloadedVariants() {
  const double budget = absl::GetFlag(FLAGS_offloaded_budget);
  const int32_t window = absl::GetFlag(FLAGS_offloaded_window);
  std::vector<Variant> variants;
  for (const std::string& kind : absl::GetFlag(FLAGS_offloaded_kinds)) {
    worker::LayerSpec sel;
    sel.role = worker::LayerRole::kSelect;
    sel.where = worker::SelectWhere::kRemote;
    sel.kind = kind;
    sel.budget.fraction = budget;
    KVR_ASSIGN_OR_RETURN(worker::LayerPolicy every, worker::UniformSelectPolicy(kLayers, sel, 0, 4, window));
    variants.push_back({absl::StrCat("every layer selects (", kind, ")"), every,
                        worker::ReuseTransfer::kAttendByPositions});
    worker::TidalDecodeOptions t;
    t.num_layers = kLayers;
    t.num_full = 0;
    t.select_layer = 0;
    t.reselect_layer = std::min(absl::GetFlag(FLAGS_reselect_layer), kLayers - 1);
    t.budget = worker::Budget{0, budget};
    t.sinks = 4;
    t.window = window;
    t.remote_kind = kind;
    KVR_ASSIGN_OR_RETURN(worker::LayerPolicy tidal, worker::TidalDecodePolicy(t));
    variants.push_back({absl::StrCat("tidaldecode with remote selection (", kind, "); reuse by positions"),
                        tidal, worker::ReuseTransfer::kAttendByPositions});
    variants.push_back({absl::StrCat("tidaldecode with remote selection (", kind, "); reuse by fetched rows"),
                        tidal, worker::ReuseTransfer::kFetchRows});
  }
  return variants;
}

// The stored prompt every variant decodes over.
struct OffloadedPrompt {
  client::ClientOptions client;
  std::string model_id;
  int64_t tokens = 0;
  std::vector<Hash128> chain;
};

// A decode session of `var` over the prompt: opens its contexts (and
// builds the indexes), loads the prompt's K/V, then times
// --offloaded_steps decode steps after 3 untimed ones.
absl::StatusOr<Row> RunVariant(const Variant& var, const OffloadedPrompt& prompt, worker::Backend* be,
                               cudaStream_t stream) {
  const std::string backend_name = absl::GetFlag(FLAGS_backend);
  const int64_t tokens = prompt.tokens;
  worker::SessionOptions o;
  o.model = Shape();
  o.policy = var.policy;
  o.mode = worker::KvMode::kOffloaded;
  o.capacity_tokens = tokens + 1024;
  o.client = prompt.client;
  o.model_id = prompt.model_id;
  o.reuse_transfer = var.transfer;
  KVR_ASSIGN_OR_RETURN(auto backend, worker::CreateBackend(backend_name));
  KVR_ASSIGN_OR_RETURN(auto s, worker::DecodeSession::Create(o, std::move(backend)));
  const absl::Time build_start = absl::Now();
  StageProgress progress(&std::cerr, "worker_bench: opening", StderrProgressMode());
  const absl::Status started =
      s->StartPrefix({tokens}, {prompt.chain}, [&](const Progress& p) { return progress.Update(p); });
  progress.Clear();
  KVR_RETURN_IF_ERROR(started);
  std::fprintf(stderr, "worker_bench: contexts opened and indexes ready in %.1f s\n",
               absl::ToDoubleSeconds(absl::Now() - build_start));
  const int64_t layer_elems = static_cast<int64_t>(kHkv) * tokens * kD;
  Mem pk(be, layer_elems * 2), pv(be, layer_elems * 2);
  for (int32_t l = 0; l < kLayers; ++l) {
    KVR_RETURN_IF_ERROR(pk.FillBf16(2 * l + 1, stream));
    KVR_RETURN_IF_ERROR(pv.FillBf16(2 * l + 2, stream));
    KVR_RETURN_IF_ERROR(s->LoadPrefixLayer(l, pk.get(), pv.get(), tokens, layer_elems, tokens * kD, kD, stream));
  }
  const int64_t nq = static_cast<int64_t>(kHq) * kD, nkv = static_cast<int64_t>(kHkv) * kD;
  Mem q(be, nq * 4 * kLayers), kn(be, nkv * 2), vn(be, nkv * 2), out(be, nq * 4);
  std::vector<double> step_ms;
  const int steps = absl::GetFlag(FLAGS_offloaded_steps);
  for (int st = 0; st < steps + 3; ++st) {
    if (st == 3) s->ResetStats();
    KVR_RETURN_IF_ERROR(q.FillF32(100 + st, 3.0f, stream));
    KVR_RETURN_IF_ERROR(kn.FillBf16(1000 + st, stream));
    KVR_RETURN_IF_ERROR(vn.FillBf16(2000 + st, stream));
    KVR_RETURN_IF_ERROR(be->Synchronize(stream));
    const absl::Time t0 = absl::Now();
    for (int32_t l = 0; l < kLayers; ++l) {
      KVR_RETURN_IF_ERROR(s->AttendLayer(l, static_cast<const float*>(q.get()) + l * nq, kn.get(), vn.get(),
                                         static_cast<float*>(out.get()), stream));
    }
    KVR_RETURN_IF_ERROR(be->Synchronize(stream));
    if (st >= 3) step_ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
  }
  const worker::SessionStats& ss = s->stats();
  const double n = std::max<int64_t>(1, ss.steps);
  const std::string note = absl::StrFormat(
      "per token: %.0f calls; rpc wait %.1f ms (server %.1f ms: search %.1f, attention %.1f); "
      "queries to host %.2f ms; states to GPU %.2f ms; appends %.2f ms; fetch wait %.1f ms; "
      "sent %.0f KiB; received %.0f KiB",
      ss.remote_calls / n, ss.rpc_wait_us / n / 1000, ss.server_us / n / 1000,
      ss.server_search_us / n / 1000, ss.server_attend_us / n / 1000, ss.query_download_us / n / 1000,
      ss.state_upload_us / n / 1000, ss.append_us / n / 1000, ss.gather_wait_us / n / 1000,
      ss.bytes_sent / n / 1024, ss.bytes_received / n / 1024);
  std::fprintf(stderr, "worker_bench: %s: %.2f ms/token; %s\n", var.name.c_str(), Median(step_ms),
               note.c_str());
  return Row{absl::StrCat("offloaded (", backend_name, ")"), var.name, tokens, 1, Median(step_ms), note};
}

// The offloaded rows: a kvrecalld holding the prompt, then every variant.
absl::Status RunOffloaded(std::vector<Row>* rows) {
  const int64_t tokens = absl::GetFlag(FLAGS_offloaded_context);
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<worker::Backend> mem_backend,
                       worker::CreateBackend(absl::GetFlag(FLAGS_backend)));
  worker::Backend* be = mem_backend.get();
  char tmpl[] = "/tmp/kvrecall-worker-bench-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return absl::InternalError(absl::StrCat("mkdtemp: ", std::strerror(errno)));
  const std::string dir = tmpl;
  const int64_t prompt_bytes = static_cast<int64_t>(kLayers) * 2 * kHkv * tokens * kD * 2;
  ChildProcess daemon;
  // The memory tier is sharded: room for the prompt with a shard's worth of slack.
  KVR_ASSIGN_OR_RETURN(int port, StartDaemon(&daemon, dir, prompt_bytes * 3 / 2 + (int64_t{2} << 30)));
  OffloadedPrompt prompt;
  prompt.client.target = absl::StrCat("127.0.0.1:", port);
  prompt.client.deadline_ms = 600000;
  prompt.tokens = tokens;
  KVR_ASSIGN_OR_RETURN(auto kv, client::KvStoreClient::Create(prompt.client));
  v1::ModelGeometry model;
  model.set_model_id("llama3-8b-like");
  model.set_num_layers(kLayers);
  model.set_num_q_heads(kHq);
  model.set_num_kv_heads(kHkv);
  model.set_head_dim(kD);
  model.set_dtype(v1::DTYPE_BF16);
  model.set_keys_post_rope(true);
  model.set_block_tokens(256);
  KVR_RETURN_IF_ERROR(kv->RegisterModel(model).status());
  prompt.model_id = model.model_id();
  cudaStream_t stream = nullptr;
  if (be->is_device()) CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  KVR_ASSIGN_OR_RETURN(prompt.chain, StorePrompt(kv.get(), model, tokens, be, stream));
  KVR_ASSIGN_OR_RETURN(const std::vector<Variant> variants, OffloadedVariants());
  for (const Variant& var : variants) {
    KVR_ASSIGN_OR_RETURN(Row row, RunVariant(var, prompt, be, stream));
    rows->push_back(std::move(row));
  }
  if (stream != nullptr) cudaStreamDestroy(stream);
  daemon.Stop().IgnoreError();  // its exit is not part of the results
  return absl::OkStatus();
}

// The machine line printed above the table.
std::string MachineLine(bool cpu, const cudaDeviceProp& prop) {
  return absl::StrFormat("# worker_bench on %s, host %s, %u hardware threads, %d layers",
                         cpu ? "no GPU (cpu backend)"
                             : absl::StrFormat("%s (%d SMs, %.0f GiB)", prop.name, prop.multiProcessorCount,
                                               prop.totalGlobalMem / 1073741824.0),
                         CpuName(), std::thread::hardware_concurrency(), kLayers);
}

// The rows as CSV on stdout and, with --out, in <out>/worker_bench.csv.
void WriteRows(const std::vector<Row>& rows) {
  std::printf("mode,policy,context,batch,ms_per_step,note\n");
  for (const Row& r : rows) {
    std::printf("%s,%s,%ld,%d,%.4f,\"%s\"\n", r.mode.c_str(), r.policy.c_str(), static_cast<long>(r.context),
                r.batch, r.ms_per_step, r.note.c_str());
  }
  if (absl::GetFlag(FLAGS_out).empty()) return;
  std::ofstream f(absl::GetFlag(FLAGS_out) + "/worker_bench.csv");
  f << "mode,policy,context,batch,ms_per_step,note\n";
  for (const Row& r : rows) {
    f << r.mode << "," << r.policy << "," << r.context << "," << r.batch << "," << r.ms_per_step << ",\""
      << r.note << "\"\n";
  }
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage("worker_bench: decode-step attention through the decode worker");
  absl::ParseCommandLine(argc, argv);
  kLayers = absl::GetFlag(FLAGS_layers);
  const bool cpu = absl::GetFlag(FLAGS_backend) == "cpu";
  cudaDeviceProp prop{};
  if (!cpu && cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::fprintf(stderr, "worker_bench: no CUDA device (--backend=cpu runs the offloaded rows on the CPU)\n");
    return 1;
  }
  std::printf("%s\n", MachineLine(cpu, prop).c_str());
  std::vector<Row> rows;
  absl::Status s;
  if (absl::GetFlag(FLAGS_resident) && !cpu) s = RunResident(&rows);
  if (s.ok() && absl::GetFlag(FLAGS_offloaded)) s = RunOffloaded(&rows);
  WriteRows(rows);
  if (!s.ok()) {
    std::fprintf(stderr, "worker_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace kvrecall::bench

int main(int argc, char** argv) { return kvrecall::bench::Main(argc, argv); }
