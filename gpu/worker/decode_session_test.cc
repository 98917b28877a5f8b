// DecodeSession on the CPU backend: every role against a float64 attention
// reference restricted to the same positions, the selections against the
// scores they come from, and offloaded sessions (through a real kvrecalld
// server on loopback) against GPU-resident ones.

#include "gpu/worker/decode_session.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/span_keys.h"
#include "common/status_macros.h"
#include "gmock/gmock.h"
#include "gpu/reference/half_convert.h"
#include "gpu/reference/reference.h"
#include "gtest/gtest.h"
#include "service/rpc/retrieval_rpc_service.h"
#include "service/rpc/server.h"
#include "service/store/tiered_store.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::worker {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

constexpr int32_t kLayers = 4, kHq = 4, kHkv = 2, kD = 64, kGroup = kHq / kHkv;
constexpr gpu::DType kDtype = gpu::DType::kBf16;
constexpr uint32_t kSeed = 20261205;  // every random input derives from it

ModelShape Shape() {
  ModelShape m;
  m.num_layers = kLayers;
  m.num_q_heads = kHq;
  m.num_kv_heads = kHkv;
  m.head_dim = kD;
  m.kv_dtype = kDtype;
  return m;
}

LayerSpec Full(int32_t k = 0) {
  LayerSpec s;
  s.role = LayerRole::kFull;
  s.budget.k = k;
  return s;
}
LayerSpec Reuse(int32_t source) {
  LayerSpec s;
  s.role = LayerRole::kReuse;
  s.source = source;
  return s;
}
LayerSpec Select(SelectWhere where, std::string kind, int32_t k, std::string knobs = "") {
  LayerSpec s;
  s.role = LayerRole::kSelect;
  s.where = where;
  s.kind = std::move(kind);
  s.budget.k = k;
  s.knobs = std::move(knobs);
  return s;
}

LayerPolicy Policy(std::vector<LayerSpec> layers, int32_t sinks, int32_t window) {
  LayerPolicy p;
  p.name = "test";
  p.sinks = sinks;
  p.window = window;
  p.layers = std::move(layers);
  return p;
}

// The K/V of every (layer, sequence, kv head, position) as bf16 bits, kept
// by the test as the ground truth.
struct Truth {
  int32_t batch = 0;
  // [layer][b][g] -> rows of kD bf16 bits, one per position.
  std::vector<std::vector<std::vector<std::vector<uint16_t>>>> k, v;

  float K(int l, int b, int g, int64_t p, int j) const {
    return gpu::reference::Bf16BitsToFloat(k[l][b][g][p * kD + j]);
  }
  float V(int l, int b, int g, int64_t p, int j) const {
    return gpu::reference::Bf16BitsToFloat(v[l][b][g][p * kD + j]);
  }
  int64_t Len(int l, int b) const { return static_cast<int64_t>(k[l][b][0].size()) / kD; }
};

uint16_t RandomBf16(std::mt19937& rng) {
  std::normal_distribution<float> dist;
  return gpu::reference::FloatToBf16Bits(dist(rng));
}

// Random prompt K/V of `lens[b]` positions for every layer; returns the
// [B, Hkv, T, d] buffer of one layer (T = max len) for LoadPrefixLayer.
Truth MakeTruth(const std::vector<int64_t>& lens, std::mt19937& rng) {
  Truth t;
  t.batch = static_cast<int32_t>(lens.size());
  t.k.assign(kLayers, std::vector<std::vector<std::vector<uint16_t>>>(t.batch, std::vector<std::vector<uint16_t>>(kHkv)));
  t.v = t.k;
  for (int l = 0; l < kLayers; ++l) {
    for (int b = 0; b < t.batch; ++b) {
      for (int g = 0; g < kHkv; ++g) {
        for (int64_t i = 0; i < lens[b] * kD; ++i) {
          t.k[l][b][g].push_back(RandomBf16(rng));
          t.v[l][b][g].push_back(RandomBf16(rng));
        }
      }
    }
  }
  return t;
}

std::vector<uint16_t> PrefixBuffer(const Truth& t, const std::vector<std::vector<std::vector<uint16_t>>>& layer,
                                   int64_t max_len) {
  std::vector<uint16_t> out(static_cast<size_t>(t.batch) * kHkv * max_len * kD, 0);
  for (int b = 0; b < t.batch; ++b) {
    for (int g = 0; g < kHkv; ++g) {
      std::copy(layer[b][g].begin(), layer[b][g].end(), out.begin() + ((b * kHkv + g) * max_len) * kD);
    }
  }
  return out;
}

// Float64 attention of q (kD floats) over `positions` of (layer, b, g).
std::vector<double> Attention(const Truth& t, int l, int b, int g, const float* q,
                              const std::vector<int64_t>& positions) {
  std::vector<double> logits;
  double m = -INFINITY;
  for (int64_t p : positions) {
    double dot = 0;
    for (int j = 0; j < kD; ++j) dot += static_cast<double>(q[j]) * t.K(l, b, g, p, j);
    logits.push_back(dot / std::sqrt(static_cast<double>(kD)));
    m = std::max(m, logits.back());
  }
  double sum = 0;
  for (double x : logits) sum += std::exp(x - m);
  std::vector<double> o(kD, 0.0);
  for (size_t i = 0; i < positions.size(); ++i) {
    const double w = std::exp(logits[i] - m) / sum;
    for (int j = 0; j < kD; ++j) o[j] += w * t.V(l, b, g, positions[i], j);
  }
  return o;
}

double RelError(const float* got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (int j = 0; j < kD; ++j) {
    num += (got[j] - want[j]) * (got[j] - want[j]);
    den += want[j] * want[j];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

std::vector<int64_t> SinksAndWindow(int64_t t, int32_t sinks, int32_t window) {
  std::vector<int64_t> out;
  for (int64_t p = 0; p < std::min<int64_t>(sinks, t); ++p) out.push_back(p);
  for (int64_t p = std::max<int64_t>(sinks, t - window); p < t; ++p) out.push_back(p);
  return out;
}

// A random orthonormal basis per KV head ([Hkv, d, d], rows the axes).
std::vector<float> RandomBasis(std::mt19937& rng) {
  std::normal_distribution<double> dist;
  std::vector<float> out;
  for (int g = 0; g < kHkv; ++g) {
    std::vector<std::vector<double>> rows;
    while (static_cast<int>(rows.size()) < kD) {
      std::vector<double> r(kD);
      for (double& x : r) x = dist(rng);
      for (const auto& prev : rows) {
        double dot = 0;
        for (int j = 0; j < kD; ++j) dot += r[j] * prev[j];
        for (int j = 0; j < kD; ++j) r[j] -= dot * prev[j];
      }
      double n = 0;
      for (double x : r) n += x * x;
      n = std::sqrt(n);
      if (n < 1e-6) continue;
      for (double& x : r) x /= n;
      rows.push_back(r);
    }
    for (const auto& r : rows) {
      for (double x : r) out.push_back(static_cast<float>(x));
    }
  }
  return out;
}

// Drives a session and the truth through decode steps with the same random
// inputs; per step and layer, hands the outputs to `check`.
class Driver {
 public:
  Driver(DecodeSession* s, Truth* t, uint32_t seed) : s_(s), t_(t), rng_(seed) {}

  // One step: for each layer, draws q, k_new, v_new, appends them to the
  // truth and runs the layer; outputs[l] = [B, Hq, d].
  absl::Status Step(std::vector<std::vector<float>>* outputs, std::vector<std::vector<float>>* queries) {
    const int B = t_->batch;
    std::normal_distribution<float> dist;
    outputs->assign(kLayers, std::vector<float>(static_cast<size_t>(B) * kHq * kD));
    queries->assign(kLayers, std::vector<float>(static_cast<size_t>(B) * kHq * kD));
    for (int l = 0; l < kLayers; ++l) {
      for (float& x : (*queries)[l]) x = 3.0f * dist(rng_);
      std::vector<uint16_t> kn(static_cast<size_t>(B) * kHkv * kD), vn(kn.size());
      for (auto& x : kn) x = RandomBf16(rng_);
      for (auto& x : vn) x = RandomBf16(rng_);
      for (int b = 0; b < B; ++b) {
        for (int g = 0; g < kHkv; ++g) {
          auto& kr = t_->k[l][b][g];
          auto& vr = t_->v[l][b][g];
          kr.insert(kr.end(), kn.begin() + (b * kHkv + g) * kD, kn.begin() + (b * kHkv + g + 1) * kD);
          vr.insert(vr.end(), vn.begin() + (b * kHkv + g) * kD, vn.begin() + (b * kHkv + g + 1) * kD);
        }
      }
      absl::Status st = s_->AttendLayer(l, (*queries)[l].data(), kn.data(), vn.data(),
                                        (*outputs)[l].data(), nullptr);
      if (!st.ok()) return st;
    }
    return absl::OkStatus();
  }

 private:
  DecodeSession* s_;
  Truth* t_;
  std::mt19937 rng_;
};

absl::StatusOr<std::unique_ptr<DecodeSession>> StartResident(const SessionOptions& o, Truth* truth,
                                                             const std::vector<int64_t>& lens) {
  KVR_ASSIGN_OR_RETURN(auto s, DecodeSession::Create(o, CreateCpuBackend()));
  KVR_RETURN_IF_ERROR(s->StartPrefix(lens));
  const int64_t max_len = *std::max_element(lens.begin(), lens.end());
  for (int l = 0; l < kLayers; ++l) {
    const std::vector<uint16_t> k = PrefixBuffer(*truth, truth->k[l], max_len);
    const std::vector<uint16_t> v = PrefixBuffer(*truth, truth->v[l], max_len);
    KVR_RETURN_IF_ERROR(s->LoadPrefixLayer(l, k.data(), v.data(), max_len, kHkv * max_len * kD,
                                           max_len * kD, kD, nullptr));
  }
  return s;
}

// ------------------------------------------------------------- validation

TEST(DecodeSessionTest, RejectsPoliciesThatDoNotFitTheModelOrMode) {
  SessionOptions o;
  o.model = Shape();
  o.capacity_tokens = 64;
  o.policy = Policy({Full(), Full(), Full()}, 4, 8);
  EXPECT_THAT(DecodeSession::Create(o, CreateCpuBackend()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("3 layers")));
  o.policy = Policy({Full(), Select(SelectWhere::kRemote, "roar", 8), Reuse(1), Full()}, 4, 8);
  EXPECT_THAT(DecodeSession::Create(o, CreateCpuBackend()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 1: a remote selection")));
  o.mode = KvMode::kOffloaded;
  o.model_id = "m";
  o.policy = Policy({Full(), Select(SelectWhere::kLocal, "exact", 8), Reuse(1), Full()}, 4, 8);
  EXPECT_THAT(DecodeSession::Create(o, CreateCpuBackend()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 1: a local selection")));
  o.mode = KvMode::kGpuResident;
  o.policy = Policy({Full(), Select(SelectWhere::kLocal, "loki", 8), Reuse(1), Full()}, 4, 8);
  EXPECT_THAT(DecodeSession::Create(o, CreateCpuBackend()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 1: loki selection needs")));
  o.policy = Policy({Full(), Reuse(0), Full(), Full()}, 4, 8);
  EXPECT_THAT(DecodeSession::Create(o, CreateCpuBackend()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 1")));
}

TEST(DecodeSessionTest, LayersRunInOrderAfterThePrefix) {
  SessionOptions o;
  o.model = Shape();
  o.capacity_tokens = 64;
  o.policy = Policy({Full(), Full(), Full(), Full()}, 4, 8);
  KVR_ASSERT_OK_AND_ASSIGN(auto s, DecodeSession::Create(o, CreateCpuBackend()));
  std::vector<float> q(kHq * kD, 0.5f), out(kHq * kD);
  std::vector<uint16_t> kv(kHkv * kD, 0);
  EXPECT_THAT(s->AttendLayer(0, q.data(), kv.data(), kv.data(), out.data(), nullptr),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("StartPrefix")));
  EXPECT_THAT(s->StartPrefix({64}), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("room")));
  KVR_ASSERT_OK(s->StartPrefix({62}));
  EXPECT_THAT(s->AttendLayer(1, q.data(), kv.data(), kv.data(), out.data(), nullptr),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("expected layer 0")));
  for (int step = 0; step < 2; ++step) {
    for (int l = 0; l < kLayers; ++l) {
      KVR_ASSERT_OK(s->AttendLayer(l, q.data(), kv.data(), kv.data(), out.data(), nullptr));
    }
  }
  EXPECT_EQ(s->seq_lens()[0], 64);
  EXPECT_THAT(s->AttendLayer(0, q.data(), kv.data(), kv.data(), out.data(), nullptr),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("full")));
}

// ---------------------------------------------------------- GPU-resident

struct RoleCase {
  std::string name;
  LayerPolicy policy;
};

// Every role of a GPU-resident session, two sequences of different lengths,
// over several decode steps: each output equals float64 attention over the
// positions the role names (everything; or sinks ∪ window ∪ the selection),
// and each selection is a top-k of the scores it is defined by.
TEST(DecodeSessionTest, EveryResidentRoleMatchesAttentionOverItsPositions) {
  const int32_t sinks = 4, window = 8, k = 12;
  std::mt19937 rng(kSeed);
  const std::vector<float> basis = RandomBasis(rng);
  const std::vector<RoleCase> cases = {
      {"tidal", Policy({Full(), Full(k), Reuse(1), Reuse(1)}, sinks, window)},
      {"exact", Policy({Select(SelectWhere::kLocal, "exact", k), Reuse(0), Full(),
                        Select(SelectWhere::kLocal, "exact", k)}, sinks, window)},
      {"loki", Policy({Full(), Select(SelectWhere::kLocal, "loki", k, "rank=16"), Reuse(1),
                       Select(SelectWhere::kLocal, "loki", k, "rank=32")}, sinks, window)},
      {"quest", Policy({Full(), Select(SelectWhere::kLocal, "quest", k, "page=8"), Reuse(1), Full()},
                       sinks, window)},
  };
  for (const RoleCase& c : cases) {
    for (bool graph_safe : {false, true}) {
      SCOPED_TRACE(c.name + (graph_safe ? " graph_safe" : ""));
      SessionOptions o;
      o.model = Shape();
      o.batch_size = 2;
      o.capacity_tokens = 200;
      o.page_size = 16;
      o.policy = c.policy;
      o.graph_safe = graph_safe;
      o.loki_components.assign(kLayers, {});
      for (int l = 0; l < kLayers; ++l) {
        if (c.policy.layers[l].kind == "loki") o.loki_components[l] = basis;
      }
      const std::vector<int64_t> lens = {150, 171};
      Truth truth = MakeTruth(lens, rng);
      KVR_ASSERT_OK_AND_ASSIGN(auto s, StartResident(o, &truth, lens));
      Driver driver(s.get(), &truth, rng());
      for (int step = 0; step < 5; ++step) {
        std::vector<std::vector<float>> out, q;
        KVR_ASSERT_OK(driver.Step(&out, &q));
        for (int l = 0; l < kLayers; ++l) {
          const LayerSpec& spec = c.policy.layers[l];
          const int32_t sel_layer = spec.role == LayerRole::kReuse ? spec.source : l;
          std::vector<std::vector<std::vector<int64_t>>> sel;
          if (spec.role != LayerRole::kFull) {
            KVR_ASSERT_OK_AND_ASSIGN(sel, s->Selection(sel_layer, nullptr));
          }
          for (int b = 0; b < 2; ++b) {
            const int64_t t = truth.Len(l, b);
            ASSERT_EQ(t, s->seq_lens()[b]);
            for (int h = 0; h < kHq; ++h) {
              const float* qh = q[l].data() + (b * kHq + h) * kD;
              std::vector<int64_t> positions;
              if (spec.role == LayerRole::kFull) {
                for (int64_t p = 0; p < t; ++p) positions.push_back(p);
              } else {
                positions = SinksAndWindow(t, sinks, window);
                const auto& chosen = sel[b][h];
                const int64_t t_min = std::min(truth.Len(l, 0), truth.Len(l, 1));
                const LayerSpec& src = c.policy.layers[sel_layer];
                const int64_t want = std::min<int64_t>(k, t_min - sinks - window);
                if (src.kind == "quest") {
                  EXPECT_LE(static_cast<int64_t>(chosen.size()), (want + 7) / 8 * 8);
                } else {
                  EXPECT_EQ(static_cast<int64_t>(chosen.size()), want);
                }
                std::set<int64_t> distinct(positions.begin(), positions.end());
                for (int64_t p : chosen) {
                  EXPECT_GE(p, sinks);
                  EXPECT_LT(p, t - window);
                  EXPECT_TRUE(distinct.insert(p).second) << "position " << p << " twice";
                  positions.push_back(p);
                }
              }
              const std::vector<double> ref = Attention(truth, l, b, h / kGroup, qh, positions);
              EXPECT_LT(RelError(out[l].data() + (b * kHq + h) * kD, ref), 1e-5)
                  << "step " << step << " layer " << l << " seq " << b << " head " << h;
            }
          }
          // The layer's own selection is a top-k of its scores.
          if (!c.policy.Selects(l)) continue;
          KVR_ASSERT_OK_AND_ASSIGN(auto own, s->Selection(l, nullptr));
          for (int b = 0; b < 2; ++b) {
            const int64_t t = truth.Len(l, b);
            for (int h = 0; h < kHq; ++h) {
              const float* qh = q[l].data() + (b * kHq + h) * kD;
              const int g = h / kGroup;
              const std::string kind = spec.role == LayerRole::kFull ? "exact" : spec.kind;
              // Candidate scores by the layer's kind, over [sinks, t - window).
              std::vector<float> row;
              int unit = 1;
              if (kind == "quest") unit = 8;
              const int64_t lo = sinks, hi = t - window;
              if (kind == "quest") {
                for (int64_t pg = lo / unit; pg * unit < hi; ++pg) {
                  double bound = 0;
                  for (int j = 0; j < kD; ++j) {
                    double mx = -INFINITY, mn = INFINITY;
                    for (int64_t p = pg * unit; p < std::min<int64_t>((pg + 1) * unit, t); ++p) {
                      mx = std::max<double>(mx, truth.K(l, b, g, p, j));
                      mn = std::min<double>(mn, truth.K(l, b, g, p, j));
                    }
                    bound += std::max(qh[j] * mx, qh[j] * mn);
                  }
                  row.push_back(static_cast<float>(bound));
                }
              } else {
                const int rank = kind == "loki" ? (spec.knobs == "rank=16" ? 16 : 32) : kD;
                for (int64_t p = lo; p < hi; ++p) {
                  double dot = 0;
                  if (kind == "loki") {
                    for (int r = 0; r < rank; ++r) {
                      double qa = 0, ka = 0;
                      for (int j = 0; j < kD; ++j) {
                        const double axis = basis[(g * kD + r) * kD + j];
                        qa += axis * qh[j];
                        ka += axis * truth.K(l, b, g, p, j);
                      }
                      // The session stores rotated keys in the KV dtype.
                      ka = gpu::reference::Bf16BitsToFloat(gpu::reference::FloatToBf16Bits(static_cast<float>(ka)));
                      dot += qa * ka;
                    }
                  } else {
                    for (int j = 0; j < kD; ++j) dot += static_cast<double>(qh[j]) * truth.K(l, b, g, p, j);
                  }
                  row.push_back(static_cast<float>(dot));
                }
              }
              // Selected columns (pages or positions) relative to the candidates.
              std::set<int32_t> cols;
              for (int64_t p : own[b][h]) cols.insert(static_cast<int32_t>(p / unit - lo / unit));
              std::vector<int32_t> sel(cols.begin(), cols.end());
              if (sel.empty()) continue;
              const double tol = kind == "loki" ? 2e-2 : 1e-3;
              EXPECT_EQ(gpu::reference::CheckTopKSelection(row.data(), static_cast<int32_t>(row.size()),
                                                           sel.data(), static_cast<int32_t>(sel.size()), tol),
                        "")
                  << "layer " << l << " seq " << b << " head " << h;
            }
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------- offloaded

// A real server on a loopback port with the retrieval service, holding the
// prompts of two sequences as stored spans.
class OffloadedTest : public ::testing::Test {
 protected:
  static constexpr int32_t kBlock = 32;

  void SetUp() override {
    rpc::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.store.data_dir = kvrecall::testing::MakeTempDir("worker-offloaded");
    options.store.memory_capacity_bytes = 256 << 20;
    KVR_ASSERT_OK_AND_ASSIGN(
        server_, rpc::Server::Create(options, &store::TieredStore::Open,
                                     {rpc::RetrievalServiceFactory(retrieval::RetrievalOptions(),
                                                                   rpc::RetrievalRpcOptions())}));
    client_options_.target = server_->address();
    KVR_ASSERT_OK_AND_ASSIGN(kv_, client::KvStoreClient::Create(client_options_));
    KVR_ASSERT_OK(kv_->RegisterModel(Geometry()).status());
  }

  static v1::ModelGeometry Geometry() {
    v1::ModelGeometry g;
    g.set_model_id("worker-model");
    g.set_num_layers(kLayers);
    g.set_num_q_heads(kHq);
    g.set_num_kv_heads(kHkv);
    g.set_head_dim(kD);
    g.set_dtype(v1::DTYPE_BF16);
    g.set_keys_post_rope(true);
    g.set_block_tokens(kBlock);
    return g;
  }

  // Stores sequence b of `truth` (its prompt) as spans; returns the chain.
  std::vector<Hash128> Store(const Truth& truth, int b, uint32_t salt_seed) {
    const int64_t t = truth.Len(0, b);
    std::vector<uint32_t> ids(t);
    for (int64_t i = 0; i < t; ++i) ids[i] = static_cast<uint32_t>((i * 31 + salt_seed) % 256);
    // Sequence layout [L][K|V][Hkv][T][d].
    std::string seq;
    for (int l = 0; l < kLayers; ++l) {
      for (const auto* kv : {&truth.k, &truth.v}) {
        for (int g = 0; g < kHkv; ++g) {
          const auto& rows = (*kv)[l][b][g];
          seq.append(reinterpret_cast<const char*>(rows.data()), rows.size() * 2);
        }
      }
    }
    auto spans = client::SequenceToSpans(Geometry(), "", ids, seq, /*include_partial_tail=*/true);
    EXPECT_TRUE(spans.ok()) << spans.status();
    std::vector<client::SpanToPut> put;
    std::vector<Hash128> chain;
    for (const auto& s : *spans) {
      put.push_back(client::SpanToPut{s.hash, s.parent, static_cast<int32_t>(s.token_ids.size()),
                                      s.token_ids, s.payload, false});
      chain.push_back(s.hash);
    }
    auto r = kv_->PutSpans(Geometry().model_id(), put);
    EXPECT_TRUE(r.ok()) << r.status();
    return chain;
  }

  std::unique_ptr<rpc::Server> server_;
  client::ClientOptions client_options_;
  std::unique_ptr<client::KvStoreClient> kv_;
};

// The same decode through an offloaded session (remote "flat" index, remote
// exact full attention) and a GPU-resident one (local exact selection):
// every layer's output agrees to the merge's rounding and the selections are
// equal, with reuse by positions and by fetched rows, past several appends
// of decoded tokens to kvrecalld.
TEST_F(OffloadedTest, OffloadedAndResidentSessionsAgree) {
  const int32_t sinks = 4, window = 8, k = 10;
  for (ReuseTransfer transfer : {ReuseTransfer::kAttendByPositions, ReuseTransfer::kFetchRows}) {
    SCOPED_TRACE(transfer == ReuseTransfer::kFetchRows ? "fetch rows" : "attend by positions");
    std::mt19937 rng(kSeed + static_cast<int>(transfer));
    const std::vector<int64_t> lens = {100, 77};
    Truth truth = MakeTruth(lens, rng);
    Truth remote_truth = truth;
    const std::vector<std::vector<Hash128>> chains = {Store(truth, 0, rng()), Store(truth, 1, rng())};

    SessionOptions res;
    res.model = Shape();
    res.batch_size = 2;
    res.capacity_tokens = 160;
    res.page_size = 16;
    res.policy = Policy({Full(k), Reuse(0), Select(SelectWhere::kLocal, "exact", k), Reuse(2)}, sinks, window);
    SessionOptions off = res;
    off.mode = KvMode::kOffloaded;
    off.policy.layers[2] = Select(SelectWhere::kRemote, "flat", k);
    off.client = client_options_;
    off.model_id = Geometry().model_id();
    off.reuse_transfer = transfer;
    off.append_chunk = 3;

    KVR_ASSERT_OK_AND_ASSIGN(auto resident, StartResident(res, &truth, lens));
    KVR_ASSERT_OK_AND_ASSIGN(auto offloaded, DecodeSession::Create(off, CreateCpuBackend()));
    std::vector<Progress> progress;
    KVR_ASSERT_OK(offloaded->StartPrefix(lens, chains, [&](const Progress& p) {
      progress.push_back(p);
      return true;
    }));
    EXPECT_FALSE(progress.empty());  // the flat index of layer 2 was built
    const int64_t max_len = *std::max_element(lens.begin(), lens.end());
    for (int l = 0; l < kLayers; ++l) {
      const std::vector<uint16_t> kb = PrefixBuffer(remote_truth, remote_truth.k[l], max_len);
      const std::vector<uint16_t> vb = PrefixBuffer(remote_truth, remote_truth.v[l], max_len);
      KVR_ASSERT_OK(offloaded->LoadPrefixLayer(l, kb.data(), vb.data(), max_len, kHkv * max_len * kD,
                                               max_len * kD, kD, nullptr));
    }
    Driver a(resident.get(), &truth, 99), b(offloaded.get(), &remote_truth, 99);
    for (int step = 0; step < 12; ++step) {
      std::vector<std::vector<float>> out_a, out_b, q_a, q_b;
      KVR_ASSERT_OK(a.Step(&out_a, &q_a));
      KVR_ASSERT_OK(b.Step(&out_b, &q_b));
      for (int l = 0; l < kLayers; ++l) {
        for (size_t i = 0; i < out_a[l].size(); i += kD) {
          double num = 0, den = 0;
          for (int j = 0; j < kD; ++j) {
            num += std::pow(out_a[l][i + j] - out_b[l][i + j], 2);
            den += std::pow(out_a[l][i + j], 2);
          }
          EXPECT_LT(std::sqrt(num / den), 1e-5) << "step " << step << " layer " << l << " row " << i / kD;
        }
        if (!res.policy.Selects(l)) continue;
        KVR_ASSERT_OK_AND_ASSIGN(auto sel_a, resident->Selection(l, nullptr));
        KVR_ASSERT_OK_AND_ASSIGN(auto sel_b, offloaded->Selection(l, nullptr));
        for (int s = 0; s < 2; ++s) {
          for (int h = 0; h < kHq; ++h) {
            std::set<int64_t> x(sel_a[s][h].begin(), sel_a[s][h].end());
            std::set<int64_t> y(sel_b[s][h].begin(), sel_b[s][h].end());
            EXPECT_EQ(x, y) << "step " << step << " layer " << l;
          }
        }
      }
    }
    const SessionStats& st = offloaded->stats();
    EXPECT_EQ(st.steps, 12);
    EXPECT_GT(st.append_us, 0);  // decoded tokens went to kvrecalld
    EXPECT_GT(st.remote_calls, 0);
    EXPECT_GT(st.bytes_received, 0);
  }
}

TEST_F(OffloadedTest, StartPrefixChecksTheStoredPrefix) {
  std::mt19937 rng(5);
  const std::vector<int64_t> lens = {70};
  Truth truth = MakeTruth(lens, rng);
  const auto chain = Store(truth, 0, 3);
  SessionOptions o;
  o.model = Shape();
  o.capacity_tokens = 128;
  o.mode = KvMode::kOffloaded;
  o.policy = Policy({Full(), Select(SelectWhere::kRemote, "all", 8), Reuse(1), Full()}, 4, 8);
  o.client = client_options_;
  o.model_id = Geometry().model_id();
  KVR_ASSERT_OK_AND_ASSIGN(auto s, DecodeSession::Create(o, CreateCpuBackend()));
  EXPECT_THAT(s->StartPrefix({70}), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("span hashes")));
  EXPECT_THAT(s->StartPrefix({71}, {chain}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("holds 70 tokens")));
  KVR_EXPECT_OK(s->StartPrefix({70}, {chain}));
}

}  // namespace
}  // namespace kvrecall::worker
