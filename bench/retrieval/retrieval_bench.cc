// retrieval_bench: Attend latency of one decode layer of a Llama-3-8B-like
// geometry (32 query heads, 8 KV heads, head_dim 128, f16 K/V) over stored
// contexts of about 32K and 128K tokens, with k = 100 and 1% budgets, in-process
// and over loopback gRPC, against an exact full-context Attend (kind "all")
// measured in the same run. Also reports the quality of each retrieval
// (recall of the exact top-k, attention mass relative to the exact top-k).
//
// Keys, values and queries come from the real attn-dev captures (4 layers x
// 2 KV heads = the 8 KV heads), tiled to length by RoPE-shifted copies
// (bench/index/attention_eval.h), or with --data=synthetic from the
// attention-like generator. The prefill queries of every position train the
// roar graphs (causal), never the timed decode queries.
//
//   build/bin/retrieval_bench                      # 32K and 128K, all rows
//   build/bin/retrieval_bench --tokens=32768 --steps=50 --data_dir=/tmp/rb
//
// With --data_dir, spans and built indexes persist across runs (the second
// run skips the builds).

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "bench/index/attention_eval.h"
#include "bench/index/machine_info.h"
#include "common/checksum.h"
#include "common/half.h"
#include "common/logging.h"
#include "common/progress.h"
#include "common/span_hash.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/testing/synthetic_attention.h"
#include "kvrecall/v1/retrieval.grpc.pb.h"
#include "service/retrieval/retrieval_service.h"
#include "service/rpc/retrieval_rpc_service.h"
#include "service/rpc/rpc_metrics.h"
#include "service/rpc/tenant_auth.h"
#include "service/store/tiered_store.h"
#include "tests/testing/test_data.h"

ABSL_FLAG(std::string, tokens, "32768,131072", "context sizes, comma-separated");
ABSL_FLAG(int, steps, 40, "decode steps timed per row (each step = one Attend of all 32 heads)");
ABSL_FLAG(int, warmup, 5, "untimed steps before each row");
ABSL_FLAG(std::string, roar_params, "max_train=65536",
          "roar build params (docs/index.md); the training queries are sampled down to max_train");
ABSL_FLAG(std::string, data, "tiled",
          "tiled: the attn-dev captures tiled to length (RoPE-shifted copies); synthetic: "
          "index/testing/synthetic_attention.h");
ABSL_FLAG(std::string, capture_dir, "", "attn-dev directory (default ../shared/data/attn-dev)");
ABSL_FLAG(std::string, capture_layers, "1,3,5,7",
          "captured layers to tile; KV head g takes (layer, KV head) pair g mod 2 x layers");
ABSL_FLAG(std::string, efforts, "128,256", "roar ef values to time");
ABSL_FLAG(bool, grpc, true, "also time Attend over loopback gRPC");
ABSL_FLAG(std::string, data_dir, "", "store directory (default: a fresh temporary one)");
ABSL_FLAG(std::string, csv, "", "also write the rows to this CSV file");

namespace kvrecall {
namespace {

constexpr int32_t kQHeads = 32, kKvHeads = 8, kDim = 128, kGroup = kQHeads / kKvHeads;
constexpr int32_t kBlock = 256;
constexpr char kModel[] = "bench-llama3-8b-1layer";

struct Context {
  int64_t tokens = 0;
  Hash128 id;
  // Decode queries per step: [steps][kQHeads * kDim] f32.
  std::vector<std::vector<float>> steps;
};

store::ModelGeometry Geometry() {
  store::ModelGeometry m;
  m.model_id = kModel;
  m.num_layers = 1;
  m.num_q_heads = kQHeads;
  m.num_kv_heads = kKvHeads;
  m.head_dim = kDim;
  m.dtype = DType::kF16;
  m.block_tokens = kBlock;
  return m;
}

// Per KV head: keys, values, training queries and decode queries of its 4
// query heads, from the real captures tiled to length (--data=tiled) or
// from the synthetic generator (--data=synthetic).
struct HeadData {
  int64_t n = 0;
  std::vector<float> keys, values;   // [n, d]
  std::vector<float> training;       // [kGroup, n, d], position order per head
  std::vector<float> decode;         // [kGroup, steps, d]
};

absl::StatusOr<HeadData> MakeHeadData(int32_t g, int64_t tokens, int steps) {
  HeadData out;
  const std::string data = absl::GetFlag(FLAGS_data);
  if (data == "tiled") {
    // KV head g <- capture pair g mod (2 x layers): (layer, KV head g % 2); its
    // two query heads also stand in for query heads 2 and 3, at other decode steps.
    std::vector<int32_t> capture_layers;
    for (absl::string_view l : absl::StrSplit(absl::GetFlag(FLAGS_capture_layers), ',',
                                              absl::SkipEmpty())) {
      int32_t v;
      if (!absl::SimpleAtoi(l, &v)) return absl::InvalidArgumentError("bad --capture_layers");
      capture_layers.push_back(v);
    }
    if (capture_layers.empty()) return absl::InvalidArgumentError("empty --capture_layers");
    const int32_t pair = g % static_cast<int32_t>(2 * capture_layers.size());
    const std::string dir = absl::GetFlag(FLAGS_capture_dir).empty()
                                ? testing::SharedDir() + "/data/attn-dev"
                                : absl::GetFlag(FLAGS_capture_dir);
    const int64_t copies = std::max<int64_t>(1, tokens / (8192 - 2 * steps));
    KVR_ASSIGN_OR_RETURN(bench::EvalSet set,
                         bench::MakeTiledCapture(dir, capture_layers[pair / 2], pair % 2, 2 * steps, copies));
    out.n = set.num_keys;
    out.keys.resize(set.num_keys * kDim);
    ConvertToFloat(set.keys.data(), DType::kF16, out.keys.size(), out.keys.data());
    out.values = set.values;
    const int64_t group = set.num_training / set.num_keys;  // 2
    std::vector<float> train(set.num_training * kDim);
    ConvertToFloat(set.training.data(), set.training_dtype, train.size(), train.data());
    out.training.resize(static_cast<size_t>(kGroup) * out.n * kDim);
    out.decode.resize(static_cast<size_t>(kGroup) * steps * kDim);
    const int64_t per_head = set.num_queries / group;  // 2 * steps
    for (int32_t j = 0; j < kGroup; ++j) {
      const int64_t src = j % group;
      std::copy(train.begin() + src * out.n * kDim, train.begin() + (src + 1) * out.n * kDim,
                out.training.begin() + j * out.n * kDim);
      for (int st = 0; st < steps; ++st) {
        const int64_t row = src * per_head + (j < group ? st : steps + st);
        std::copy(set.queries.begin() + row * kDim, set.queries.begin() + (row + 1) * kDim,
                  out.decode.begin() + (j * steps + st) * kDim);
      }
    }
    return out;
  }
  if (data != "synthetic") return absl::InvalidArgumentError("--data must be tiled or synthetic");
  index::SyntheticAttentionOptions o;
  o.num_keys = tokens;
  o.dim = kDim;
  o.num_query_heads = kGroup;
  o.num_decode_queries = steps;
  o.seed = 1000 + 17 * g + tokens;
  KVR_ASSIGN_OR_RETURN(index::SyntheticAttention sa, index::GenerateSyntheticAttention(o));
  out.n = tokens;
  out.keys = std::move(sa.keys);
  out.values = std::move(sa.values);
  out.training = std::move(sa.prefill_queries);
  out.decode = std::move(sa.decode_queries);
  return out;
}

// Generates the context, stores its spans (unless already stored) and the
// prefill queries of every position, opens it. Decode queries are kept for
// the timed steps.
absl::StatusOr<Context> PrepareContext(store::TieredStore* store,
                                       retrieval::RetrievalService* service, int64_t tokens,
                                       int steps) {
  const auto m = Geometry();
  Context ctx;
  std::vector<uint16_t> keys, values;   // [h, t, d] in the model dtype
  std::vector<float> train;             // [t, Hq, d]
  ctx.steps.assign(steps, std::vector<float>(kQHeads * kDim));
  StageProgress progress(&std::cerr, "  generating", StderrProgressMode());
  for (int32_t g = 0; g < kKvHeads; ++g) {
    Progress head;
    head.stage = "KV heads";
    head.done = g;
    head.total = kKvHeads;
    head.fraction = static_cast<double>(g) / kKvHeads;
    progress.Update(head);
    KVR_ASSIGN_OR_RETURN(HeadData hd, MakeHeadData(g, tokens, steps));
    if (g == 0) {
      tokens = hd.n;
      keys.resize(static_cast<size_t>(kKvHeads) * tokens * kDim);
      values.resize(keys.size());
      train.resize(static_cast<size_t>(tokens) * kQHeads * kDim);
    }
    if (hd.n != tokens) return absl::InternalError("KV heads of different lengths");
    ConvertFromFloat(hd.keys.data(), tokens * kDim, m.dtype, keys.data() + g * tokens * kDim);
    ConvertFromFloat(hd.values.data(), tokens * kDim, m.dtype, values.data() + g * tokens * kDim);
    for (int32_t j = 0; j < kGroup; ++j) {
      const int32_t h = g * kGroup + j;
      for (int64_t t = 0; t < tokens; ++t) {
        const float* src = hd.training.data() + (j * tokens + t) * kDim;
        std::copy(src, src + kDim, train.data() + (t * kQHeads + h) * kDim);
      }
      for (int st = 0; st < steps; ++st) {
        const float* src = hd.decode.data() + (j * steps + st) * kDim;
        std::copy(src, src + kDim, ctx.steps[st].data() + h * kDim);
      }
    }
  }
  progress.Finish();
  ctx.tokens = tokens;
  // Spans: token ids are a deterministic function of the position, so the
  // chain (and the context id) is the same in every run.
  const std::string salt = absl::StrCat("bench-", absl::GetFlag(FLAGS_data), "-", tokens);
  std::vector<uint32_t> token_ids(tokens);
  for (int64_t t = 0; t < tokens; ++t) token_ids[t] = static_cast<uint32_t>(t * 2654435761u);
  const auto chain = ChainSpanHashes(kModel, salt, token_ids, kBlock,
                                     /*include_partial_tail=*/true);
  const auto have = store->Lookup("", kModel, chain);
  Hash128 parent = SpanRootHash(kModel, salt);
  for (size_t i = 0; i < chain.size(); ++i) {
    const int64_t begin = static_cast<int64_t>(i) * kBlock;
    const int32_t n = static_cast<int32_t>(std::min<int64_t>(kBlock, tokens - begin));
    if (static_cast<int32_t>(i) >= have.prefix_spans) {
      store::StoredSpan span;
      span.key.hash = chain[i];
      span.meta.model_id = kModel;
      span.meta.parent = parent;
      span.meta.num_tokens = n;
      span.payload.resize(m.SpanPayloadBytes(n));
      for (int32_t kv = 0; kv < 2; ++kv) {
        const auto& src = kv == 0 ? keys : values;
        for (int32_t h = 0; h < kKvHeads; ++h) {
          std::memcpy(span.payload.data() + m.PayloadOffset(n, 0, kv, h, 0),
                      src.data() + (h * tokens + begin) * kDim,
                      static_cast<size_t>(n) * kDim * 2);
        }
      }
      span.meta.payload_bytes = static_cast<int64_t>(span.payload.size());
      span.meta.payload_checksum = Checksum64(span.payload);
      store::PutOptions po;
      po.salt = salt;
      KVR_RETURN_IF_ERROR(store->Put(std::move(span), po).status());
    }
    parent = chain[i];
  }
  KVR_ASSIGN_OR_RETURN(auto opened, service->OpenContext("", kModel, chain, absl::InfiniteFuture()));
  ctx.id = opened.context;
  KVR_RETURN_IF_ERROR(service->AddQueries("", ctx.id, 0, 0, tokens, train));
  return ctx;
}

absl::Status EnsureIndex(retrieval::RetrievalService* service, const Context& ctx,
                         const std::string& kind, const std::string& params, double* build_s) {
  *build_s = 0;
  KVR_ASSIGN_OR_RETURN(auto existing, service->ListIndexes("", ctx.id));
  const std::string normalized = index::ParamMap::Parse(params)->ToString();
  int found = 0;
  for (const auto& info : existing) found += info.kind == kind && info.params == normalized;
  if (found == kKvHeads) return absl::OkStatus();
  retrieval::BuildIndexRequest req;
  req.context = ctx.id;
  req.kind = kind;
  req.params = params;
  KVR_ASSIGN_OR_RETURN(std::string op, service->BuildIndex(req));
  const absl::Time start = absl::Now();
  StageProgress progress(&std::cerr,
                         absl::StrFormat("  building %s over %d tokens", kind, ctx.tokens),
                         StderrProgressMode());
  while (true) {
    KVR_ASSIGN_OR_RETURN(auto info, service->WaitOperation(req.tenant, op,
                                                         absl::Now() + absl::Seconds(5)));
    Progress p;
    p.stage = info.stage;
    p.done = info.keys_indexed;
    p.total = info.keys_total;
    p.fraction = info.fraction;
    progress.Update(p);
    if (info.state == retrieval::OperationState::kDone) break;
    if (info.state == retrieval::OperationState::kFailed ||
        info.state == retrieval::OperationState::kCancelled) {
      progress.Clear();
      return info.error;
    }
  }
  progress.Finish();
  *build_s = absl::ToDoubleSeconds(absl::Now() - start);
  return absl::OkStatus();
}

struct Row {
  int64_t tokens = 0;
  std::string kind;
  std::string budget;  // "k=100", "1%", "all"
  int64_t effort = 0;
  std::string path;    // "in-process" or "grpc"
  double p50_us = 0, p99_us = 0;
  double keys_scanned_frac = 0;
  double recall = -1;        // of the exact top-k, per head, mean
  double mass_vs_exact = -1; // exp(lse_S - lse_exact_topk), mean: mass relative to the oracle
  double mass_total = -1;    // exp(lse_S - lse_all), mean: share of all attention
  double speedup = 0;        // vs the exact full-context Attend on the same path
};

double Percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return 0;
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5));
  return v[i];
}

retrieval::RetrieveRequest MakeRequest(const Context& ctx, const std::vector<float>& q,
                                       const std::string& kind, int32_t k, double budget,
                                       int64_t effort) {
  retrieval::RetrieveRequest r;
  r.context = ctx.id;
  r.layer = 0;
  r.queries = q;
  r.k = k;
  r.budget = budget;
  r.index.kind = kind;
  r.index.effort = effort;
  return r;
}

v1::AttendRequest MakeProto(const Context& ctx, const std::vector<float>& q,
                            const std::string& kind, int32_t k, double budget, int64_t effort) {
  v1::AttendRequest r;
  r.set_context(ctx.id.ToBytes());
  r.set_layer(0);
  auto* t = r.mutable_queries();
  t->set_dtype(v1::DTYPE_F32);
  t->add_shape(kQHeads);
  t->add_shape(kDim);
  t->set_data(reinterpret_cast<const char*>(q.data()), q.size() * sizeof(float));
  r.set_k(k);
  r.set_budget(budget);
  r.mutable_index()->set_kind(kind);
  r.mutable_index()->set_effort(effort);
  return r;
}

// The store, the retrieval service and (with --grpc) its loopback gRPC
// server and a stub; the in-process rows call the service directly.
struct Harness {
  std::unique_ptr<store::TieredStore> store;
  MetricsRegistry registry;
  std::unique_ptr<rpc::RpcMetrics> rpc_metrics;
  std::unique_ptr<rpc::TenantAuthenticator> auth;
  std::unique_ptr<rpc::RetrievalRpcService> rpc_service;
  retrieval::RetrievalService* service = nullptr;  // owned by rpc_service
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<v1::Retrieval::Stub> stub;       // null without --grpc
};

absl::StatusOr<std::unique_ptr<Harness>> StartHarness() {
  auto h = std::make_unique<Harness>();
  std::string dir = absl::GetFlag(FLAGS_data_dir);
  if (dir.empty()) dir = testing::MakeTempDir("retrieval-bench");
  store::TieredStoreOptions so;
  so.data_dir = dir;
  so.memory_capacity_bytes = int64_t{12} << 30;
  so.disk_capacity_bytes = int64_t{16} << 30;
  KVR_ASSIGN_OR_RETURN(h->store, store::TieredStore::Open(so));
  auto registered = h->store->RegisterModel(Geometry());
  if (!registered.ok() && !absl::IsAlreadyExists(registered)) return registered;

  h->rpc_metrics = std::make_unique<rpc::RpcMetrics>(&h->registry);
  h->auth = rpc::TenantAuthenticator::Disabled();
  KVR_ASSIGN_OR_RETURN(auto service_owned, retrieval::RetrievalService::Create(
                                               h->store.get(), retrieval::RetrievalOptions()));
  h->rpc_service = std::make_unique<rpc::RetrievalRpcService>(
      std::move(service_owned), h->auth.get(), h->rpc_metrics.get(), rpc::RetrievalRpcOptions());
  h->service = h->rpc_service->retrieval();
  if (!absl::GetFlag(FLAGS_grpc)) return h;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(h->rpc_service.get());
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.SetMaxSendMessageSize(64 << 20);
  h->server = builder.BuildAndStart();
  if (h->server == nullptr) return absl::UnavailableError("cannot start the gRPC server");
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  h->stub = v1::Retrieval::NewStub(grpc::CreateCustomChannel(
      absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials(), args));
  return h;
}

// Comma-separated integers >= `min` of flag `name`.
absl::StatusOr<std::vector<int64_t>> ParseList(const std::string& text, const char* name,
                                               int64_t min) {
  std::vector<int64_t> out;
  for (absl::string_view s : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(s, &v) || v < min) {
      return absl::InvalidArgumentError(absl::StrCat("bad --", name));
    }
    out.push_back(v);
  }
  return out;
}

// One row's request: kind, k or budget fraction, effort.
struct AttendConfig {
  std::string kind, budget;
  int32_t k;
  double frac;
  int64_t effort;
};

std::vector<AttendConfig> ConfigsFor(int64_t tokens, const std::vector<int64_t>& efforts) {
  const int32_t k1 = static_cast<int32_t>(std::ceil(0.01 * tokens));
  std::vector<AttendConfig> configs = {{"all", "all", 0, 0, 0}};
  for (int64_t ef : efforts) configs.push_back({"roar", "k=100", 100, 0, std::max<int64_t>(ef, 100)});
  // The 1% budget needs ef >= k: the same multiples of k as the k=100 rows.
  for (int64_t ef : efforts) {
    configs.push_back({"roar", "1%", 0, 0.01, std::max<int64_t>(k1, ef * k1 / efforts[0])});
  }
  configs.push_back({"all", "exact k=100", 100, 0, 0});
  return configs;
}

// Per step: lse over everything and over the exact top-100 / top-1%, and
// those exact positions per head.
struct Oracle {
  std::vector<std::vector<float>> lse_all, lse_k100, lse_k1;
  std::vector<std::vector<std::vector<int64_t>>> top100, top1;
};

absl::StatusOr<Oracle> ComputeOracle(retrieval::RetrievalService* service, const Context& ctx) {
  const int32_t k1 = static_cast<int32_t>(std::ceil(0.01 * ctx.tokens));
  const size_t n = ctx.steps.size();
  Oracle o;
  o.lse_all.resize(n);
  o.lse_k100.resize(n);
  o.lse_k1.resize(n);
  o.top100.resize(n);
  o.top1.resize(n);
  for (size_t s = 0; s < n; ++s) {
    KVR_ASSIGN_OR_RETURN(auto full, service->Attend(MakeRequest(ctx, ctx.steps[s], "all", 0, 0, 0)));
    o.lse_all[s] = full.state.lse;
    KVR_ASSIGN_OR_RETURN(auto e100, service->Attend(MakeRequest(ctx, ctx.steps[s], "all", 100, 0, 0)));
    o.lse_k100[s] = e100.state.lse;
    o.top100[s] = e100.ids;
    KVR_ASSIGN_OR_RETURN(auto e1, service->Attend(MakeRequest(ctx, ctx.steps[s], "all", k1, 0, 0)));
    o.lse_k1[s] = e1.state.lse;
    o.top1[s] = e1.ids;
  }
  return o;
}

// One decode step's Attend on a path (0: in-process, 1: gRPC).
struct StepResult {
  std::vector<float> lse;
  std::vector<std::vector<int64_t>> ids;
  int64_t keys_scanned = 0;
  double us = 0;
};

absl::StatusOr<StepResult> AttendStep(const Harness& h, const Context& ctx,
                                      const std::vector<float>& q, const AttendConfig& c,
                                      int path) {
  StepResult r;
  const auto t0 = std::chrono::steady_clock::now();
  if (path == 0) {
    KVR_ASSIGN_OR_RETURN(auto reply,
                         h.service->Attend(MakeRequest(ctx, q, c.kind, c.k, c.frac, c.effort)));
    r.lse = std::move(reply.state.lse);
    r.ids = std::move(reply.ids);
    r.keys_scanned = reply.stats.keys_scanned;
  } else {
    grpc::ClientContext cc;
    cc.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    v1::AttendResponse resp;
    grpc::Status st = h.stub->Attend(&cc, MakeProto(ctx, q, c.kind, c.k, c.frac, c.effort), &resp);
    if (!st.ok()) return absl::InternalError(st.error_message());
    r.lse.assign(resp.lse_natural().begin(), resp.lse_natural().end());
    for (const auto& head : resp.heads()) {
      r.ids.emplace_back(head.positions().begin(), head.positions().end());
    }
    r.keys_scanned = resp.stats().keys_scanned();
  }
  r.us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

// Times every step of `ctx` (the first `warmup` untimed) for one config and
// path, with quality against the oracle. Speedup is filled by the caller.
absl::StatusOr<Row> MeasureRow(const Harness& h, const Context& ctx, const Oracle& oracle,
                               const AttendConfig& c, int path, int warmup) {
  Row row;
  row.tokens = ctx.tokens;
  row.kind = c.kind;
  row.budget = c.budget;
  row.effort = c.effort;
  row.path = path == 0 ? "in-process" : "grpc";
  std::vector<double> lat;
  double scanned = 0, recall = 0, mass_rel = 0, mass_tot = 0;
  int measured = 0;
  for (size_t s = 0; s < ctx.steps.size(); ++s) {
    KVR_ASSIGN_OR_RETURN(const StepResult r, AttendStep(h, ctx, ctx.steps[s], c, path));
    if (static_cast<int>(s) < warmup) continue;
    lat.push_back(r.us);
    ++measured;
    scanned += static_cast<double>(r.keys_scanned) / (static_cast<double>(ctx.tokens) * kQHeads);
    if (c.k == 0 && c.frac == 0) continue;
    const bool is_k100 = c.k == 100;
    const auto& truth = is_k100 ? oracle.top100[s] : oracle.top1[s];
    const auto& lse_exact = is_k100 ? oracle.lse_k100[s] : oracle.lse_k1[s];
    for (int head = 0; head < kQHeads; ++head) {
      std::vector<int64_t> a = r.ids[head], b = truth[head];
      std::sort(a.begin(), a.end());
      std::sort(b.begin(), b.end());
      std::vector<int64_t> both;
      std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
      recall += static_cast<double>(both.size()) / static_cast<double>(b.size());
      mass_rel += std::exp(double(r.lse[head]) - lse_exact[head]);
      mass_tot += std::exp(double(r.lse[head]) - oracle.lse_all[s][head]);
    }
  }
  row.p50_us = Percentile(lat, 0.5);
  row.p99_us = Percentile(lat, 0.99);
  row.keys_scanned_frac = scanned / measured;
  if (c.k > 0 || c.frac > 0) {
    row.recall = recall / (measured * kQHeads);
    row.mass_vs_exact = mass_rel / (measured * kQHeads);
    row.mass_total = mass_tot / (measured * kQHeads);
  }
  return row;
}

// Every row of one context size.
absl::Status RunContext(const Harness& h, int64_t tokens, const std::vector<int64_t>& efforts,
                        int steps, int warmup, std::vector<Row>* rows) {
  std::fprintf(stderr, "context of %lld tokens: generating and storing\n",
               static_cast<long long>(tokens));
  KVR_ASSIGN_OR_RETURN(Context ctx, PrepareContext(h.store.get(), h.service, tokens, steps + warmup));
  tokens = ctx.tokens;  // tiled contexts are whole copies of the capture
  double build_s = 0;
  const std::string roar_params = absl::GetFlag(FLAGS_roar_params);
  KVR_RETURN_IF_ERROR(EnsureIndex(h.service, ctx, "roar", roar_params, &build_s));
  if (build_s > 0) {
    std::printf("roar build over %lld tokens x %d KV heads (%s): %.1f s\n",
                static_cast<long long>(tokens), kKvHeads, roar_params.c_str(), build_s);
  }
  KVR_ASSIGN_OR_RETURN(const Oracle oracle, ComputeOracle(h.service, ctx));
  double full_p50[2] = {0, 0};
  for (const AttendConfig& c : ConfigsFor(tokens, efforts)) {
    for (int path = 0; path < (h.stub ? 2 : 1); ++path) {
      KVR_ASSIGN_OR_RETURN(Row row, MeasureRow(h, ctx, oracle, c, path, warmup));
      if (c.kind == "all" && c.k == 0) full_p50[path] = row.p50_us;
      row.speedup = full_p50[path] / row.p50_us;
      rows->push_back(row);
    }
  }
  return h.service->CloseContext("", ctx.id);
}

// The table on stdout and, with --csv, the rows as CSV.
void PrintRows(const std::vector<Row>& rows, int steps) {
  std::printf(
      "\nAttend, one layer: 32 q heads x 8 KV heads x d 128, f16 K/V (%s); %d decode steps per row\n",
      absl::GetFlag(FLAGS_data).c_str(), steps);
  std::printf("%-8s %-6s %-12s %-6s %-10s %10s %10s %9s %7s %8s %8s %8s %s\n", "tokens", "kind",
              "budget", "ef", "path", "p50_us", "p99_us", "scanned", "recall", "mass/ex",
              "mass", "speedup", "grpc_overhead");
  std::FILE* csv = nullptr;
  if (!absl::GetFlag(FLAGS_csv).empty()) {
    csv = std::fopen(absl::GetFlag(FLAGS_csv).c_str(), "w");
    if (csv != nullptr) {
      std::fprintf(csv,
                   "tokens,kind,budget,effort,path,p50_us,p99_us,keys_scanned_frac,recall,"
                   "mass_vs_exact,mass_total,speedup_vs_full\n");
    }
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    std::string overhead;
    if (r.path == "grpc" && i > 0 && rows[i - 1].path == "in-process") {
      overhead = absl::StrFormat("%.1f%%", 100.0 * (r.p50_us - rows[i - 1].p50_us) / r.p50_us);
    }
    std::printf("%-8lld %-6s %-12s %-6lld %-10s %10.0f %10.0f %8.2f%% %7s %8s %8s %7.1fx %s\n",
                static_cast<long long>(r.tokens), r.kind.c_str(), r.budget.c_str(),
                static_cast<long long>(r.effort), r.path.c_str(), r.p50_us, r.p99_us,
                100 * r.keys_scanned_frac,
                r.recall < 0 ? "-" : absl::StrFormat("%.3f", r.recall).c_str(),
                r.mass_vs_exact < 0 ? "-" : absl::StrFormat("%.3f", r.mass_vs_exact).c_str(),
                r.mass_total < 0 ? "-" : absl::StrFormat("%.3f", r.mass_total).c_str(), r.speedup,
                overhead.c_str());
    if (csv != nullptr) {
      std::fprintf(csv, "%lld,%s,%s,%lld,%s,%.1f,%.1f,%.5f,%.4f,%.4f,%.4f,%.2f\n",
                   static_cast<long long>(r.tokens), r.kind.c_str(), r.budget.c_str(),
                   static_cast<long long>(r.effort), r.path.c_str(), r.p50_us, r.p99_us,
                   r.keys_scanned_frac, r.recall, r.mass_vs_exact, r.mass_total, r.speedup);
    }
  }
  if (csv != nullptr) std::fclose(csv);
  std::printf(
      "\nspeedup = p50 of the exact full-context Attend (kind all) / p50 of the row, same path.\n"
      "recall = share of the exact top-k per head; mass/ex = retrieved attention mass / mass of "
      "the exact top-k;\nmass = share of all attention mass; grpc_overhead = (grpc p50 - "
      "in-process p50) / grpc p50.\n");
}

absl::Status Run() {
  std::printf("retrieval_bench on %s\n", bench::MachineDescription().c_str());
  KVR_ASSIGN_OR_RETURN(const std::vector<int64_t> sizes,
                       ParseList(absl::GetFlag(FLAGS_tokens), "tokens", 1024));
  KVR_ASSIGN_OR_RETURN(const std::vector<int64_t> efforts,
                       ParseList(absl::GetFlag(FLAGS_efforts), "efforts", 1));
  if (efforts.empty()) return absl::InvalidArgumentError("bad --efforts");
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<Harness> h, StartHarness());
  const int steps = absl::GetFlag(FLAGS_steps), warmup = absl::GetFlag(FLAGS_warmup);
  std::vector<Row> rows;
  for (int64_t tokens : sizes) {
    KVR_RETURN_IF_ERROR(RunContext(*h, tokens, efforts, steps, warmup, &rows));
  }
  if (h->server) h->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  PrintRows(rows, steps);
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvrecall

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::Status s = kvrecall::Run();
  if (!s.ok()) {
    std::fprintf(stderr, "retrieval_bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
