// DecodeSession on the CUDA backend against the same session on the CPU
// backend (float64 references), and a whole GPU-resident decode step
// captured in one CUDA graph and replayed. Skips without a CUDA device.

#include <cuda_runtime.h>

#include <cmath>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/status_macros.h"
#include "gpu/reference/half_convert.h"
#include "gpu/worker/decode_session.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::worker {
namespace {

constexpr int32_t kLayers = 4, kHq = 8, kHkv = 2, kD = 128, kBatch = 2;
constexpr uint32_t kSeed = 424242;

std::unique_ptr<Backend> CudaOrSkip() {
  auto b = CreateCudaBackend();
  if (!b.ok()) return nullptr;
  return *std::move(b);
}

LayerSpec Spec(LayerRole role, int32_t k = 0, std::string kind = "", std::string knobs = "", int32_t source = -1) {
  LayerSpec s;
  s.role = role;
  s.budget.k = k;
  if (role == LayerRole::kSelect) {
    s.where = SelectWhere::kLocal;
    s.kind = std::move(kind);
    s.knobs = std::move(knobs);
  }
  s.source = source;
  return s;
}

struct Inputs {
  std::vector<uint16_t> prefix_k, prefix_v;  // per layer [B, Hkv, T, d]
  std::vector<std::vector<float>> q;         // per layer [B, Hq, d]
  std::vector<std::vector<uint16_t>> k_new, v_new;  // per layer [B, Hkv, d]
};

std::vector<uint16_t> RandomBf16(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> dist;
  std::vector<uint16_t> out(n);
  for (auto& x : out) x = gpu::reference::FloatToBf16Bits(dist(rng));
  return out;
}

void DrawStep(std::mt19937& rng, Inputs* in) {
  std::normal_distribution<float> dist;
  in->q.assign(kLayers, std::vector<float>(kBatch * kHq * kD));
  in->k_new.clear();
  in->v_new.clear();
  for (int l = 0; l < kLayers; ++l) {
    for (float& x : in->q[l]) x = 3.0f * dist(rng);
    in->k_new.push_back(RandomBf16(rng, kBatch * kHkv * kD));
    in->v_new.push_back(RandomBf16(rng, kBatch * kHkv * kD));
  }
}

// A session with its inputs in backend memory.
class SessionRun {
 public:
  explicit SessionRun(std::unique_ptr<DecodeSession> s) : s_(std::move(s)), be_(s_->backend()) {}
  ~SessionRun() {
    for (void* p : mem_) be_->Free(p);
  }
  void* Put(const void* host, size_t bytes) {
    void* p = *be_->Allocate(bytes);
    mem_.push_back(p);
    EXPECT_TRUE(be_->CopyToBackend(p, host, bytes, nullptr).ok());
    EXPECT_TRUE(be_->Synchronize(nullptr).ok());
    return p;
  }
  absl::Status Load(const std::vector<int64_t>& lens, int64_t t, const Inputs& in, int layer_stride) {
    KVR_RETURN_IF_ERROR(s_->StartPrefix(lens));
    for (int l = 0; l < kLayers; ++l) {
      const size_t n = static_cast<size_t>(kBatch) * kHkv * t * kD;
      void* k = Put(in.prefix_k.data() + l * layer_stride, n * 2);
      void* v = Put(in.prefix_v.data() + l * layer_stride, n * 2);
      KVR_RETURN_IF_ERROR(s_->LoadPrefixLayer(l, k, v, t, kHkv * t * kD, t * kD, kD, stream_));
    }
    return be_->Synchronize(stream_);
  }
  // Stages one step's inputs; Step() then runs the layers on them.
  void Stage(const Inputs& in) {
    if (q_.empty()) {
      for (int l = 0; l < kLayers; ++l) {
        q_.push_back(Put(in.q[l].data(), in.q[l].size() * 4));
        k_.push_back(Put(in.k_new[l].data(), in.k_new[l].size() * 2));
        v_.push_back(Put(in.v_new[l].data(), in.v_new[l].size() * 2));
        out_.push_back(*be_->Allocate(in.q[l].size() * 4));
        mem_.push_back(out_.back());
      }
      return;
    }
    for (int l = 0; l < kLayers; ++l) {
      EXPECT_TRUE(be_->CopyToBackend(q_[l], in.q[l].data(), in.q[l].size() * 4, stream_).ok());
      EXPECT_TRUE(be_->CopyToBackend(k_[l], in.k_new[l].data(), in.k_new[l].size() * 2, stream_).ok());
      EXPECT_TRUE(be_->CopyToBackend(v_[l], in.v_new[l].data(), in.v_new[l].size() * 2, stream_).ok());
    }
    EXPECT_TRUE(be_->Synchronize(stream_).ok());
  }
  absl::Status Step() {
    for (int l = 0; l < kLayers; ++l) {
      KVR_RETURN_IF_ERROR(s_->AttendLayer(l, static_cast<const float*>(q_[l]), k_[l], v_[l],
                                          static_cast<float*>(out_[l]), stream_));
    }
    return absl::OkStatus();
  }
  std::vector<std::vector<float>> Outputs() {
    std::vector<std::vector<float>> out(kLayers, std::vector<float>(kBatch * kHq * kD));
    for (int l = 0; l < kLayers; ++l) {
      EXPECT_TRUE(be_->CopyToHost(out[l].data(), out_[l], out[l].size() * 4, stream_).ok());
    }
    EXPECT_TRUE(be_->Synchronize(stream_).ok());
    return out;
  }
  DecodeSession* session() { return s_.get(); }
  void set_stream(cudaStream_t s) { stream_ = s; }

 private:
  std::unique_ptr<DecodeSession> s_;
  Backend* be_;
  cudaStream_t stream_ = nullptr;
  std::vector<void*> mem_, q_, k_, v_, out_;
};

// Compares the CUDA run's outputs with the CPU run's, head by head, skipping
// heads whose (source) selection differs (a near-tie decided differently by
// f32 and float64 arithmetic); returns the heads compared.
int Compare(const LayerPolicy& p, DecodeSession* cpu, DecodeSession* gpu,
            const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b,
            const std::string& where) {
  int compared = 0;
  for (int l = 0; l < kLayers; ++l) {
    const LayerSpec& s = p.layers[l];
    const int32_t src = s.role == LayerRole::kReuse ? s.source : l;
    std::vector<std::vector<std::vector<int64_t>>> sa, sb;
    if (s.role != LayerRole::kFull) {
      sa = *cpu->Selection(src, nullptr);
      sb = *gpu->Selection(src, nullptr);
    }
    for (int bh = 0; bh < kBatch * kHq; ++bh) {
      if (!sa.empty()) {
        const auto& x = sa[bh / kHq][bh % kHq];
        const auto& y = sb[bh / kHq][bh % kHq];
        if (std::set<int64_t>(x.begin(), x.end()) != std::set<int64_t>(y.begin(), y.end())) continue;
      }
      double num = 0, den = 0;
      for (int j = 0; j < kD; ++j) {
        const double d = a[l][bh * kD + j] - b[l][bh * kD + j];
        num += d * d;
        den += static_cast<double>(a[l][bh * kD + j]) * a[l][bh * kD + j];
      }
      EXPECT_LT(std::sqrt(num / den), 2e-3) << where << " layer " << l << " row " << bh;
      ++compared;
    }
  }
  return compared;
}

std::vector<float> Basis(std::mt19937& rng) {
  // Orthonormal rows by Gram-Schmidt.
  std::normal_distribution<double> dist;
  std::vector<float> out;
  for (int g = 0; g < kHkv; ++g) {
    std::vector<std::vector<double>> rows;
    while (static_cast<int>(rows.size()) < kD) {
      std::vector<double> r(kD);
      for (double& x : r) x = dist(rng);
      for (const auto& p : rows) {
        double dot = 0;
        for (int j = 0; j < kD; ++j) dot += r[j] * p[j];
        for (int j = 0; j < kD; ++j) r[j] -= dot * p[j];
      }
      double n = 0;
      for (double x : r) n += x * x;
      for (double& x : r) x /= std::sqrt(n);
      rows.push_back(r);
    }
    for (const auto& r : rows) out.insert(out.end(), r.begin(), r.end());
  }
  return out;
}

TEST(DecodeSessionCudaTest, CudaBackendMatchesCpuBackendForEveryRole) {
  if (CudaOrSkip() == nullptr) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(kSeed);
  const std::vector<float> basis = Basis(rng);
  const int32_t k = 40;
  std::vector<std::pair<std::string, std::vector<LayerSpec>>> policies = {
      {"tidal", {Spec(LayerRole::kFull), Spec(LayerRole::kFull, k), Spec(LayerRole::kReuse, 0, "", "", 1),
                 Spec(LayerRole::kReuse, 0, "", "", 1)}},
      {"exact+loki", {Spec(LayerRole::kSelect, k, "exact"), Spec(LayerRole::kReuse, 0, "", "", 0),
                      Spec(LayerRole::kSelect, k, "loki", "rank=32"), Spec(LayerRole::kReuse, 0, "", "", 2)}},
      {"quest", {Spec(LayerRole::kFull), Spec(LayerRole::kSelect, k, "quest", "page=16"),
                 Spec(LayerRole::kReuse, 0, "", "", 1), Spec(LayerRole::kFull)}},
  };
  const int64_t t = 1000;
  const std::vector<int64_t> lens = {1000, 913};
  for (const auto& [name, layers] : policies) {
    SCOPED_TRACE(name);
    SessionOptions o;
    o.model = {kLayers, kHq, kHkv, kD, gpu::DType::kBf16};
    o.batch_size = kBatch;
    o.capacity_tokens = 1100;
    o.policy.sinks = 4;
    o.policy.window = 32;
    o.policy.layers = layers;
    o.loki_components.assign(kLayers, {});
    for (int l = 0; l < kLayers; ++l) {
      if (layers[l].kind == "loki") o.loki_components[l] = basis;
    }
    Inputs in;
    const size_t per_layer = static_cast<size_t>(kBatch) * kHkv * t * kD;
    in.prefix_k = RandomBf16(rng, per_layer * kLayers);
    in.prefix_v = RandomBf16(rng, per_layer * kLayers);
    KVR_ASSERT_OK_AND_ASSIGN(auto cpu_s, DecodeSession::Create(o, CreateCpuBackend()));
    KVR_ASSERT_OK_AND_ASSIGN(auto gpu_s, DecodeSession::Create(o, CudaOrSkip()));
    SessionRun cpu(std::move(cpu_s)), gpu(std::move(gpu_s));
    KVR_ASSERT_OK(cpu.Load(lens, t, in, static_cast<int>(per_layer)));
    KVR_ASSERT_OK(gpu.Load(lens, t, in, static_cast<int>(per_layer)));
    int compared = 0;
    for (int step = 0; step < 4; ++step) {
      DrawStep(rng, &in);
      cpu.Stage(in);
      gpu.Stage(in);
      KVR_ASSERT_OK(cpu.Step());
      KVR_ASSERT_OK(gpu.Step());
      compared += Compare(o.policy, cpu.session(), gpu.session(), cpu.Outputs(), gpu.Outputs(),
                          "step " + std::to_string(step));
    }
    EXPECT_GT(compared, 4 * kLayers * kBatch * kHq * 9 / 10);  // near-ties are rare
  }
}

TEST(DecodeSessionCudaTest, WholeResidentStepCapturesInOneGraph) {
  if (CudaOrSkip() == nullptr) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(kSeed + 1);
  SessionOptions o;
  o.model = {kLayers, kHq, kHkv, kD, gpu::DType::kBf16};
  o.batch_size = kBatch;
  o.capacity_tokens = 700;
  o.graph_safe = true;
  o.policy.sinks = 4;
  o.policy.window = 16;
  o.policy.layers = {Spec(LayerRole::kFull), Spec(LayerRole::kFull, 24), Spec(LayerRole::kReuse, 0, "", "", 1),
                     Spec(LayerRole::kSelect, 24, "exact")};
  const int64_t t = 600;
  Inputs in;
  const size_t per_layer = static_cast<size_t>(kBatch) * kHkv * t * kD;
  in.prefix_k = RandomBf16(rng, per_layer * kLayers);
  in.prefix_v = RandomBf16(rng, per_layer * kLayers);
  KVR_ASSERT_OK_AND_ASSIGN(auto cpu_s, DecodeSession::Create(o, CreateCpuBackend()));
  KVR_ASSERT_OK_AND_ASSIGN(auto gpu_s, DecodeSession::Create(o, CudaOrSkip()));
  SessionRun cpu(std::move(cpu_s)), gpu(std::move(gpu_s));
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  gpu.set_stream(stream);
  KVR_ASSERT_OK(cpu.Load({600, 577}, t, in, static_cast<int>(per_layer)));
  KVR_ASSERT_OK(gpu.Load({600, 577}, t, in, static_cast<int>(per_layer)));
  DrawStep(rng, &in);  // the same inputs every step (a replay reads the same buffers)
  cpu.Stage(in);
  gpu.Stage(in);
  // The first step outside capture (kernel attributes), then capture one step.
  KVR_ASSERT_OK(cpu.Step());
  KVR_ASSERT_OK(gpu.Step());
  Compare(o.policy, cpu.session(), gpu.session(), cpu.Outputs(), gpu.Outputs(), "eager step");
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const absl::Status captured = gpu.Step();
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  KVR_ASSERT_OK(captured);
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int replay = 0; replay < 3; ++replay) {
    KVR_ASSERT_OK(cpu.Step());
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const int compared = Compare(o.policy, cpu.session(), gpu.session(), cpu.Outputs(), gpu.Outputs(),
                                 "replay " + std::to_string(replay));
    EXPECT_GT(compared, kLayers * kBatch * kHq * 9 / 10);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace kvrecall::worker
