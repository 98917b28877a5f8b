// Retrieval on real attention through a real kvrecalld: the attn-dev capture
// (4 layers of kvr-tiny-llama over 8192 bytes of text) is stored as spans,
// its context opened, roar and loki indexes built from the prefill queries of
// the prefix, and every evaluated decode query's remote Attend, merged with
// the worker's local partial over the ranges it holds (sinks and a window),
// is checked against full causal attention:
//  - within the error the retrieved set's missing attention mass implies, and
//  - with the effort at maximum and every remote position requested, equal
//    to full attention to 1e-4.

#include <cmath>
#include <fstream>
#include <vector>

#include "absl/strings/str_format.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/retrieval_client.h"
#include "clients/cpp/span_keys.h"
#include "common/half.h"
#include "common/npy.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall {
namespace {

constexpr int kLayers = 4, kQHeads = 4, kKvHeads = 2, kDim = 128, kT = 8192;
constexpr int kDecode = 256;                 // the last positions are the decode queries
constexpr int kPrefix = kT - kDecode;        // prefill queries train the indexes
constexpr int kSinks = 4, kWindow = 64;      // what the worker attends to itself
constexpr int kCapturedLayers[kLayers] = {1, 3, 5, 7};
constexpr char kModel[] = "kvr-tiny-llama-attn-dev";

struct Capture {
  std::vector<float> q[kLayers];  // [kQHeads, kT, kDim]
  std::vector<float> k[kLayers];  // [kKvHeads, kT, kDim]
  std::vector<float> v[kLayers];
  std::vector<uint16_t> k16[kLayers], v16[kLayers];  // as stored (f16)
  std::vector<uint32_t> tokens;
};

bool LoadCapture(Capture* c) {
  const std::string dir = testing::SharedDir() + "/data/attn-dev";
  for (int l = 0; l < kLayers; ++l) {
    for (const char* what : {"q", "k", "v"}) {
      auto a = ReadNpy(absl::StrFormat("%s/layer%02d_%s.npy", dir, kCapturedLayers[l], what));
      if (!a.ok()) return false;
      std::vector<float> f(static_cast<size_t>(a->num_elements()));
      ConvertToFloat(a->data.data(), DType::kF16, f.size(), f.data());
      if (*what == 'q') c->q[l] = std::move(f);
      if (*what == 'k') {
        c->k[l] = std::move(f);
        c->k16[l].assign(a->as<uint16_t>(), a->as<uint16_t>() + a->num_elements());
      }
      if (*what == 'v') {
        c->v[l] = std::move(f);
        c->v16[l].assign(a->as<uint16_t>(), a->as<uint16_t>() + a->num_elements());
      }
    }
  }
  std::ifstream text(dir + "/window.txt", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(text)), std::istreambuf_iterator<char>());
  if (bytes.size() != kT) return false;
  for (unsigned char b : bytes) c->tokens.push_back(b);
  return true;
}

// Attention of query head h at layer l over `positions`, float64: (o, lse).
void Attention(const Capture& c, int l, int h, const float* q, const std::vector<int64_t>& pos,
               std::vector<double>* o, double* lse) {
  const int g = h / (kQHeads / kKvHeads);
  std::vector<double> s(pos.size());
  double m = -INFINITY;
  for (size_t i = 0; i < pos.size(); ++i) {
    const float* k = c.k[l].data() + (static_cast<size_t>(g) * kT + pos[i]) * kDim;
    double acc = 0;
    for (int j = 0; j < kDim; ++j) acc += double(q[j]) * k[j];
    s[i] = acc / std::sqrt(double(kDim));
    m = std::max(m, s[i]);
  }
  double sum = 0;
  for (double& x : s) sum += (x = std::exp(x - m));
  o->assign(kDim, 0.0);
  for (size_t i = 0; i < pos.size(); ++i) {
    const float* v = c.v[l].data() + (static_cast<size_t>(g) * kT + pos[i]) * kDim;
    for (int j = 0; j < kDim; ++j) (*o)[j] += s[i] / sum * v[j];
  }
  *lse = m + std::log(sum);
}

// The decode queries of layer l at position t: [kQHeads, kDim].
std::vector<float> DecodeQueries(const Capture& c, int l, int t) {
  std::vector<float> q(kQHeads * kDim);
  for (int h = 0; h < kQHeads; ++h) {
    std::copy_n(c.q[l].data() + (static_cast<size_t>(h) * kT + t) * kDim, kDim,
                q.data() + h * kDim);
  }
  return q;
}

// Head h's remote partial (out, lse over what Attend retrieved) merged with
// the worker's local partial over the sinks and the window [window, t],
// against full causal attention over [0, t].
struct MergeCheck {
  double err = 0;       // |o_merged - o_full|
  double ref_norm = 0;  // |o_full|
  double out_norm = 0;  // |o_merged|
  double lse = 0;       // of the merged state
  double lse_full = 0;
};
MergeCheck MergeWithLocal(const Capture& c, int l, int h, const float* q, int t, int64_t window,
                          const client::AttendResult& remote) {
  std::vector<int64_t> local, visible;
  for (int64_t p = 0; p < kSinks; ++p) local.push_back(p);
  for (int64_t p = window; p <= t; ++p) local.push_back(p);
  for (int64_t p = 0; p <= t; ++p) visible.push_back(p);
  std::vector<double> o_local, o_full;
  double lse_local;
  MergeCheck r;
  Attention(c, l, h, q, local, &o_local, &lse_local);
  Attention(c, l, h, q, visible, &o_full, &r.lse_full);
  const double lr = remote.lse[h];
  const double mx = std::max(lr, lse_local);
  r.lse = mx + std::log(std::exp(lr - mx) + std::exp(lse_local - mx));
  const double wr = std::exp(lr - r.lse), wl = std::exp(lse_local - r.lse);
  for (int j = 0; j < kDim; ++j) {
    const double merged = wr * remote.out[h * kDim + j] + wl * o_local[j];
    r.err += (merged - o_full[j]) * (merged - o_full[j]);
    r.ref_norm += o_full[j] * o_full[j];
    r.out_norm += merged * merged;
  }
  r.err = std::sqrt(r.err);
  r.ref_norm = std::sqrt(r.ref_norm);
  r.out_norm = std::sqrt(r.out_norm);
  return r;
}

// The largest |v| among positions [0, t] of head h's KV head.
double MaxValueNorm(const Capture& c, int l, int h, int t) {
  const int g = h / (kQHeads / kKvHeads);
  double vmax = 0;
  for (int64_t p = 0; p <= t; ++p) {
    double n2 = 0;
    for (int j = 0; j < kDim; ++j) {
      const double x = c.v[l][(static_cast<size_t>(g) * kT + p) * kDim + j];
      n2 += x * x;
    }
    vmax = std::max(vmax, std::sqrt(n2));
  }
  return vmax;
}

class RetrievalAttnDevTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    capture_ = new Capture();
    if (!LoadCapture(capture_)) {
      delete capture_;
      capture_ = nullptr;
    }
  }
  static void TearDownTestSuite() { delete capture_; }

  static Capture* capture_;
};
Capture* RetrievalAttnDevTest::capture_ = nullptr;

// Registers the attn-dev model, stores the capture as one chain of spans
// (durable) and opens it as a context, into `ctx`.
void StoreCapture(const Capture& c, client::KvStoreClient& kv, client::RetrievalClient& rc,
                  Hash128* ctx) {
  v1::ModelGeometry m;
  m.set_model_id(kModel);
  m.set_num_layers(kLayers);
  m.set_num_q_heads(kQHeads);
  m.set_num_kv_heads(kKvHeads);
  m.set_head_dim(kDim);
  m.set_dtype(v1::DTYPE_F16);
  m.set_keys_post_rope(true);
  m.set_block_tokens(256);
  KVR_ASSERT_OK(kv.RegisterModel(m).status());

  // The sequence layout [layer][K|V][kv_head][token][d], f16, as captured.
  std::string seq;
  for (int l = 0; l < kLayers; ++l) {
    seq.append(reinterpret_cast<const char*>(c.k16[l].data()), c.k16[l].size() * 2);
    seq.append(reinterpret_cast<const char*>(c.v16[l].data()), c.v16[l].size() * 2);
  }
  KVR_ASSERT_OK_AND_ASSIGN(auto spans, client::SequenceToSpans(m, "", c.tokens, seq, true));
  std::vector<client::SpanToPut> put;
  std::vector<Hash128> chain;
  for (const auto& s : spans) {
    put.push_back({s.hash, s.parent, static_cast<int32_t>(s.token_ids.size()), s.token_ids,
                   s.payload, true});
    chain.push_back(s.hash);
  }
  KVR_ASSERT_OK(kv.PutSpans(kModel, put).status());
  KVR_ASSERT_OK_AND_ASSIGN(auto opened, rc.OpenContext(kModel, chain));
  ASSERT_EQ(opened.num_tokens(), kT);
  KVR_ASSERT_OK_AND_ASSIGN(*ctx, Hash128::FromBytes(opened.context()));
}

// Training queries: the prefill queries of the prefix only, every layer.
void AddPrefixQueries(const Capture& c, client::RetrievalClient& rc, const Hash128& ctx) {
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> nhd(static_cast<size_t>(kPrefix) * kQHeads * kDim);
    for (int t = 0; t < kPrefix; ++t) {
      for (int h = 0; h < kQHeads; ++h) {
        std::copy_n(c.q[l].data() + (static_cast<size_t>(h) * kT + t) * kDim, kDim,
                    nhd.data() + (static_cast<size_t>(t) * kQHeads + h) * kDim);
      }
    }
    KVR_ASSERT_OK(rc.AddQueries(ctx, l, 0, kQHeads, kDim, nhd).status());
  }
}

// Over decode steps after the prefix, `kind` retrieval merged with the
// worker's local partial (sinks and window) is within the bound its
// attention mass gives of full attention, and holds most of the exact top-100
// mass.
void CheckMergedAttention(const Capture& c, client::RetrievalClient& rc, const Hash128& ctx,
                          const char* kind) {
  double mass_ratio_sum = 0, worst_excess = 0;
  int evaluated = 0;
  for (int l = 0; l < kLayers; ++l) {
    for (int t = kPrefix; t < kT; t += 16) {
      const std::vector<float> q = DecodeQueries(c, l, t);
      // The worker holds the sinks and its window [t - 63, t]; positions after
      // t are not visible to this query at all.
      const int64_t window = t - kWindow + 1;
      client::RetrieveOptions o;
      o.k = 100;
      o.kind = kind;
      o.exclude = {{0, kSinks}, {window, kT}};
      KVR_ASSERT_OK_AND_ASSIGN(client::AttendResult remote, rc.Attend(ctx, l, q, kQHeads, o));
      client::RetrieveOptions exact = o;
      exact.kind = "all";
      KVR_ASSERT_OK_AND_ASSIGN(client::AttendResult oracle, rc.Attend(ctx, l, q, kQHeads, exact));
      for (int h = 0; h < kQHeads; ++h) {
        const MergeCheck m = MergeWithLocal(c, l, h, q.data() + h * kDim, t, window, remote);
        // The merged set holds mass P = exp(lse - lse_full) of the full attention;
        // o_S - o* = (1 - P)(o_S - o_rest), so |o_S - o*| <= (1 - P)(|o_S| + max|v|).
        const double mass = std::exp(m.lse - m.lse_full);
        ASSERT_LE(mass, 1 + 1e-4) << kind << " layer " << l << " t " << t << " head " << h;
        const double bound = (1 - std::min(1.0, mass)) * (m.out_norm + MaxValueNorm(c, l, h, t)) +
                             1e-4 * m.ref_norm;
        EXPECT_LE(m.err, bound)
            << kind << " layer " << l << " t " << t << " head " << h << " mass " << mass;
        worst_excess = std::max(worst_excess, m.err / bound);
        mass_ratio_sum += std::exp(double(remote.lse[h]) - oracle.lse[h]);
        ++evaluated;
      }
    }
  }
  const double mass_ratio = mass_ratio_sum / evaluated;
  std::printf("%s: %d (query, head) pairs; retrieved mass / exact top-100 mass = %.4f; "
              "worst error / bound = %.3f\n",
              kind, evaluated, mass_ratio, worst_excess);
  EXPECT_GE(mass_ratio, 0.9) << kind;
}

// At maximum effort, asking `kind` for every remote position gives full
// attention.
void CheckMaxEffortIsFullAttention(const Capture& c, client::RetrievalClient& rc,
                                   const Hash128& ctx, const char* kind) {
  for (int l = 0; l < kLayers; ++l) {
    const int t = kT - 1 - 37 * l;
    const std::vector<float> q = DecodeQueries(c, l, t);
    const int64_t window = t - kWindow + 1;
    client::RetrieveOptions o;
    o.kind = kind;
    o.effort = int64_t{1} << 40;
    o.exclude = {{0, kSinks}, {window, kT}};
    o.k = static_cast<int32_t>(window - kSinks);
    KVR_ASSERT_OK_AND_ASSIGN(client::AttendResult remote, rc.Attend(ctx, l, q, kQHeads, o));
    for (int h = 0; h < kQHeads; ++h) {
      const MergeCheck m = MergeWithLocal(c, l, h, q.data() + h * kDim, t, window, remote);
      EXPECT_LT(m.err / m.ref_norm, 1e-4) << kind << " layer " << l << " head " << h;
      EXPECT_NEAR(m.lse, m.lse_full, 1e-4 * std::abs(m.lse_full)) << kind << " layer " << l;
    }
  }
}

TEST_F(RetrievalAttnDevTest, AttendMergedWithLocalPartialMatchesFullAttention) {
  if (capture_ == nullptr) KVR_SKIP_WITHOUT_SHARED_DATA("no attn-dev capture under " << testing::SharedDir());
  const Capture& c = *capture_;
  testing::DaemonProcess daemon(testing::MakeTempDir("retrieval-attn-dev") + "/data", {});
  KVR_ASSERT_OK(daemon.Start());
  client::ClientOptions co;
  co.target = daemon.address();
  co.deadline_ms = 600000;
  KVR_ASSERT_OK_AND_ASSIGN(auto kv, client::KvStoreClient::Create(co));
  KVR_ASSERT_OK_AND_ASSIGN(auto rc, client::RetrievalClient::Create(co));
  Hash128 ctx;
  ASSERT_NO_FATAL_FAILURE(StoreCapture(c, *kv, *rc, &ctx));
  ASSERT_NO_FATAL_FAILURE(AddPrefixQueries(c, *rc, ctx));
  for (const char* kind : {"roar", "loki"}) {
    KVR_ASSERT_OK_AND_ASSIGN(v1::Operation op, rc->BuildIndex(ctx, kind));
    KVR_ASSERT_OK_AND_ASSIGN(op, rc->WaitOperation(op.id(), absl::Minutes(10)));
    ASSERT_EQ(op.state(), v1::OPERATION_STATE_DONE) << kind << ": " << op.error_message();
  }
  for (const char* kind : {"roar", "loki"}) {
    ASSERT_NO_FATAL_FAILURE(CheckMergedAttention(c, *rc, ctx, kind));
  }
  for (const char* kind : {"roar", "loki"}) {
    ASSERT_NO_FATAL_FAILURE(CheckMaxEffortIsFullAttention(c, *rc, ctx, kind));
  }
  KVR_EXPECT_OK(daemon.Stop());
}

}  // namespace
}  // namespace kvrecall
