#include "gpu/worker/decode_session.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "clients/cpp/retrieval_client.h"
#include "common/status_macros.h"

namespace kvrecall::worker {
namespace {

using gpu::DType;

int64_t MicrosSince(absl::Time start) { return absl::ToInt64Microseconds(absl::Now() - start); }

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A block of backend memory, freed with its backend. Move-only.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend* backend, void* p, size_t bytes) : backend_(backend), p_(p), bytes_(bytes) {}
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(backend_, o.backend_);
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() {
    if (p_ != nullptr) backend_->Free(p_);
  }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(p_);
  }
  size_t bytes() const { return bytes_; }

 private:
  Backend* backend_ = nullptr;
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

absl::StatusOr<Buffer> Alloc(Backend* backend, size_t bytes) {
  KVR_ASSIGN_OR_RETURN(void* p, backend->Allocate(bytes));
  return Buffer(backend, p, bytes);
}

// Host memory for transfers (pinned with CUDA). Move-only.
class HostBuffer {
 public:
  HostBuffer() = default;
  HostBuffer(Backend* backend, void* p, size_t bytes) : backend_(backend), p_(p), bytes_(bytes) {}
  HostBuffer(HostBuffer&& o) noexcept { *this = std::move(o); }
  HostBuffer& operator=(HostBuffer&& o) noexcept {
    std::swap(backend_, o.backend_);
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~HostBuffer() {
    if (p_ != nullptr) backend_->FreeHost(p_);
  }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(p_);
  }
  size_t bytes() const { return bytes_; }

 private:
  Backend* backend_ = nullptr;
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

absl::StatusOr<HostBuffer> AllocHost(Backend* backend, size_t bytes) {
  KVR_ASSIGN_OR_RETURN(void* p, backend->AllocateHost(bytes));
  return HostBuffer(backend, p, bytes);
}

// The integer value of `key` in "key=value,..." knobs, or `fallback`.
absl::StatusOr<int64_t> KnobInt(absl::string_view knobs, absl::string_view key, int64_t fallback) {
  for (absl::string_view part : absl::StrSplit(knobs, ',', absl::SkipEmpty())) {
    std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
    if (kv.first != key) continue;
    int64_t v = 0;
    if (!absl::SimpleAtoi(kv.second, &v)) {
      return absl::InvalidArgumentError(absl::StrCat("knob ", key, "=", kv.second, " is not an integer"));
    }
    return v;
  }
  return fallback;
}

v1::DType ToProtoDType(DType d) { return d == DType::kBf16 ? v1::DTYPE_BF16 : v1::DTYPE_F16; }

}  // namespace

absl::Status ValidatePolicyForSession(const SessionOptions& o) {
  const ModelShape& m = o.model;
  if (m.num_layers < 1 || m.num_kv_heads < 1 || m.num_q_heads < 1 ||
      m.num_q_heads % m.num_kv_heads != 0 || m.num_q_heads / m.num_kv_heads > 8) {
    return absl::InvalidArgumentError(
        "model: num_layers >= 1 and num_q_heads = num_kv_heads * group (group 1..8) are required");
  }
  if (m.head_dim != 64 && m.head_dim != 128) return absl::InvalidArgumentError("model: head_dim must be 64 or 128");
  if (m.kv_dtype != DType::kBf16 && m.kv_dtype != DType::kF16) {
    return absl::InvalidArgumentError("model: kv_dtype must be bf16 or f16");
  }
  KVR_RETURN_IF_ERROR(ValidatePolicy(o.policy));
  const LayerPolicy& p = o.policy;
  if (p.num_layers() != m.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("the policy has ", p.num_layers(),
                                                   " layers; the model has ", m.num_layers));
  }
  int64_t quest_page = 0;
  for (int32_t l = 0; l < p.num_layers(); ++l) {
    const LayerSpec& s = p.layers[l];
    if (s.role != LayerRole::kSelect) continue;
    const bool offloaded = o.mode == KvMode::kOffloaded;
    if (offloaded && s.where == SelectWhere::kLocal) {
      return absl::InvalidArgumentError(absl::StrCat(
          "layer ", l, ": a local selection (", s.kind,
          ") needs every key on the GPU; in offloaded mode select remotely"));
    }
    if (!offloaded && s.where == SelectWhere::kRemote) {
      return absl::InvalidArgumentError(absl::StrCat(
          "layer ", l, ": a remote selection (", s.kind,
          ") needs kvrecalld; a GPU-resident session selects locally (exact, loki, quest)"));
    }
    if (s.where != SelectWhere::kLocal) continue;
    if (s.kind == "loki") {
      KVR_ASSIGN_OR_RETURN(int64_t rank, KnobInt(s.knobs, "rank", 32));
      if (rank != 16 && rank != 32 && rank != 64) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", l, ": loki rank must be 16, 32 or 64"));
      }
      const size_t want = static_cast<size_t>(m.num_kv_heads) * m.head_dim * m.head_dim;
      if (static_cast<int32_t>(o.loki_components.size()) <= l || o.loki_components[l].size() != want) {
        return absl::InvalidArgumentError(absl::StrCat(
            "layer ", l, ": loki selection needs the layer's basis, ", m.num_kv_heads, " x ",
            m.head_dim, " x ", m.head_dim, " f32 (loki_components[", l, "])"));
      }
    } else if (s.kind == "quest") {
      KVR_ASSIGN_OR_RETURN(int64_t page, KnobInt(s.knobs, "page", 16));
      if (page < 1 || page > 1024) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", l, ": quest page must be in [1, 1024]"));
      }
      if (quest_page != 0 && page != quest_page) {
        return absl::InvalidArgumentError(absl::StrCat(
            "layer ", l, ": every quest layer of a session must use the same page size (",
            quest_page, ")"));
      }
      quest_page = page;
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------

struct DecodeSession::Impl {
  // Per-layer state.
  struct Layer {
    int32_t pool = 0;  // index into k_pools / v_pools
    // SELECT(local, loki): rotated key plane [B, Hkv, C, rank] (kv dtype) and
    // the transposed bases [Hkv, d, d] f32.
    int32_t loki_rank = 0;
    Buffer loki_plane, loki_matrices;
    // SELECT(local, quest): page bounds [B, Hkv, max_quest_pages, d] (kv dtype).
    Buffer quest_max, quest_min;
    // Layers that select: k in units (1 token, or a Quest page).
    int32_t unit = 1;
    int64_t max_k = 0;     // largest k (units) at capacity
    int64_t list_cap = 0;  // sinks + window + max_k * unit
    // GPU-resident: lists [B, Hq, list_cap] and lengths [B, Hq].
    Buffer lists, lens;
    // Offloaded: the remote selection per (sequence, query head).
    std::vector<std::vector<std::vector<int64_t>>> remote_sel;
  };

  // ReuseTransfer::kFetchRows: the rows of one source layer's selection for
  // the layers that reuse it, fetched by one GatherKv per sequence.
  struct Fetch {
    int32_t layer_begin = 0, layer_end = 0;  // layers fetched
    int64_t rows_cap = 0;                    // staging rows per (sequence, kv head)
    int64_t list_cap = 0;                    // max list length per query head
    std::vector<std::vector<std::vector<int64_t>>> union_pos;  // [b][g], sorted
    Buffer k, v;                             // one layer's rows [B * rows_cap, Hkv, d]
    Buffer table, lens;                      // [B, rows_cap] page ids, [B] = rows_cap
    Buffer lists, list_lens;                 // [B, Hq, list_cap] row indices, [B, Hq]
    HostBuffer host_k, host_v;               // [L_f, B, rows_cap, Hkv, d]
    absl::Mutex mu;
    absl::CondVar cv;
    std::vector<int64_t> arrived ABSL_GUARDED_BY(mu);  // [L_f * B] rows arrived
    std::vector<bool> finished ABSL_GUARDED_BY(mu);    // [B] the sequence's GatherKv returned
    std::vector<int64_t> expected;                     // [B] rows per layer
    absl::Status status ABSL_GUARDED_BY(mu);
    std::vector<std::thread> threads;

    void Join() {
      for (auto& t : threads) t.join();
      threads.clear();
    }
    ~Fetch() { Join(); }
  };

  Impl(const SessionOptions& options, Backend* backend, std::vector<int64_t>* lens,
       SessionStats* session_stats)
      : o(options), be(backend), host_lens(*lens), stats(*session_stats) {}
  ~Impl() {
    for (auto& f : fetches) {
      if (f != nullptr) f->Join();
    }
    for (auto& st : streams) {
      if (st != nullptr) st->Finish().IgnoreError();  // closing: the server's status is moot
    }
  }

  absl::Status Init();
  absl::Status StartPrefix(const std::vector<int64_t>& prefix_tokens,
                           const std::vector<std::vector<Hash128>>& chains,
                           const ProgressCallback& progress);
  absl::Status LoadPrefixLayer(int32_t layer, const void* k, const void* v, int64_t num_tokens,
                               int64_t batch_stride, int64_t head_stride, int64_t token_stride,
                               void* stream);
  absl::Status AttendLayer(int32_t layer, const float* q, const void* k_new, const void* v_new,
                           float* out, void* stream);
  absl::StatusOr<std::vector<std::vector<std::vector<int64_t>>>> Selection(int32_t layer,
                                                                           void* stream);

 private:
  gpu::PagedKvCache Kv(int32_t layer) const;
  int64_t Cols() const;
  int64_t MinLen() const { return *std::min_element(host_lens.begin(), host_lens.end()); }
  int64_t ResolveTokens(int32_t layer) const;
  absl::StatusOr<void*> Workspace(size_t bytes);
  absl::Status SizeWorkspace();
  absl::Status BeginStep(void* stream);
  absl::Status SelectFromScores(int32_t layer, int64_t ncols, int64_t k_units, void* stream);
  absl::Status SparseOverLists(int32_t kv_layer, int32_t list_layer, const float* q, float* o,
                               void* stream);
  absl::Status AttendResident(int32_t layer, const float* q, float* out, void* stream);
  absl::Status AttendOffloaded(int32_t layer, const float* q, float* out, void* stream);
  std::vector<std::pair<int64_t, int64_t>> RemoteExclude(int32_t b) const;
  absl::Status AppendToServer(int32_t b, void* stream);
  absl::Status OpenRemote(const std::vector<std::vector<Hash128>>& chains,
                          const ProgressCallback& progress);
  absl::Status StartFetch(int32_t source, void* stream);
  absl::Status AttendFetched(int32_t layer, int32_t source, const float* q, float* o, void* stream);

 public:
  const SessionOptions& o;
  Backend* const be;
  std::vector<int64_t>& host_lens;
  SessionStats& stats;

  std::vector<Layer> layers;
  int32_t L = 0, hq = 0, hkv = 0, d = 0, group = 0, batch = 0, page = 0;
  int64_t capacity = 0, pages_per_seq = 0, num_pages = 0;
  static constexpr int64_t kElem = 2;  // bf16 / f16
  int32_t sinks = 0, window = 1;
  int32_t quest_page = 0;
  int64_t max_quest_pages = 0;
  int32_t next_layer = 0;
  bool started = false;

  std::vector<int32_t> host_table;  // [B, pages_per_seq], -1 where not resident
  Buffer page_table, seq_lens, zeros, quest_pages;
  std::vector<Buffer> k_pools, v_pools;
  Buffer scores;                    // [B, Hq, C] f32
  Buffer top_k;                     // [B, Hq, max k] int32
  Buffer q_proj;                    // [B, Hq, 64] f32
  Buffer scratch_o;                 // [B, Hq, d] f32
  Buffer states_o, states_lse;      // [2, B, Hq, d] / [2, B, Hq] f32
  int64_t resident_cap = 1;
  Buffer resident_lists, resident_lens;  // [B, Hkv, resident_cap] / [B, Hkv]
  Buffer workspace;

  // Offloaded mode.
  std::unique_ptr<client::RetrievalClient> client;
  std::vector<Hash128> contexts;
  std::vector<int64_t> server_tokens;  // positions each context holds
  std::vector<std::unique_ptr<client::AttendStream>> streams;
  HostBuffer host_q, host_o, host_lse;  // [B, Hq, d], [B, Hq, d], [B, Hq]
  int32_t append_chunk = 1;
  uint64_t next_request_id = 1;
  std::vector<std::unique_ptr<Fetch>> fetches;  // by source layer
};

DecodeSession::DecodeSession(const SessionOptions& options, std::unique_ptr<Backend> backend)
    : options_(options),
      backend_(std::move(backend)),
      impl_(std::make_unique<Impl>(options_, backend_.get(), &host_lens_, &stats_)) {}

DecodeSession::~DecodeSession() = default;

absl::StatusOr<std::unique_ptr<DecodeSession>> DecodeSession::Create(
    const SessionOptions& options, std::unique_ptr<Backend> backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("a backend is required");
  KVR_RETURN_IF_ERROR(ValidatePolicyForSession(options));
  if (options.batch_size < 1 || options.batch_size > 256) {
    return absl::InvalidArgumentError("batch_size must be in [1, 256]");
  }
  if (options.capacity_tokens < 2 || options.capacity_tokens > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError("capacity_tokens must be in [2, 2^30]");
  }
  if (options.page_size < 1 || options.page_size > 256) {
    return absl::InvalidArgumentError("page_size must be in [1, 256]");
  }
  if (options.kv_pool_count < 0) return absl::InvalidArgumentError("kv_pool_count must be >= 0");
  if (options.append_chunk < 0 || options.append_chunk > options.policy.window) {
    return absl::InvalidArgumentError(
        absl::StrCat("append_chunk must be in [0, window = ", options.policy.window, "]"));
  }
  if (options.mode == KvMode::kOffloaded && options.model_id.empty()) {
    return absl::InvalidArgumentError("offloaded mode needs model_id (the stored spans' model)");
  }
  std::unique_ptr<DecodeSession> s(new DecodeSession(options, std::move(backend)));
  KVR_RETURN_IF_ERROR(s->impl_->Init());
  return s;
}

absl::Status DecodeSession::StartPrefix(const std::vector<int64_t>& prefix_tokens,
                                        const std::vector<std::vector<Hash128>>& chains,
                                        const ProgressCallback& progress) {
  return impl_->StartPrefix(prefix_tokens, chains, progress);
}

absl::Status DecodeSession::LoadPrefixLayer(int32_t layer, const void* k, const void* v,
                                            int64_t num_tokens, int64_t batch_stride,
                                            int64_t head_stride, int64_t token_stride,
                                            void* stream) {
  return impl_->LoadPrefixLayer(layer, k, v, num_tokens, batch_stride, head_stride, token_stride,
                                stream);
}

absl::Status DecodeSession::AttendLayer(int32_t layer, const float* q, const void* k_new,
                                        const void* v_new, float* out, void* stream) {
  return impl_->AttendLayer(layer, q, k_new, v_new, out, stream);
}

absl::StatusOr<std::vector<std::vector<std::vector<int64_t>>>> DecodeSession::Selection(
    int32_t layer, void* stream) {
  return impl_->Selection(layer, stream);
}

// ------------------------------------------------------------------ setup

absl::Status DecodeSession::Impl::Init() {
  const ModelShape& m = o.model;
  const LayerPolicy& p = o.policy;
  L = m.num_layers;
  hq = m.num_q_heads;
  hkv = m.num_kv_heads;
  d = m.head_dim;
  group = hq / hkv;
  batch = o.batch_size;
  page = o.page_size;
  capacity = o.capacity_tokens;
  pages_per_seq = CeilDiv(capacity, page);
  sinks = p.sinks;
  window = p.window;
  append_chunk = o.append_chunk > 0 ? o.append_chunk : std::max(1, window / 2);
  const int64_t B = batch, C = capacity;
  host_lens.assign(B, 0);

  KVR_ASSIGN_OR_RETURN(seq_lens, Alloc(be, B * sizeof(int32_t)));
  KVR_ASSIGN_OR_RETURN(zeros, Alloc(be, B * sizeof(int32_t)));
  KVR_RETURN_IF_ERROR(be->Memset(seq_lens.get(), 0, B * sizeof(int32_t), nullptr));
  KVR_RETURN_IF_ERROR(be->Memset(zeros.get(), 0, B * sizeof(int32_t), nullptr));

  // Roles: units, budgets at capacity, Loki and Quest state.
  const int32_t pools = o.kv_pool_count > 0 ? std::min(o.kv_pool_count, L) : L;
  layers.resize(L);
  int64_t max_k_all = 0;
  bool need_scores = false;
  for (int32_t l = 0; l < L; ++l) {
    const LayerSpec& spec = p.layers[l];
    Layer& layer = layers[l];
    layer.pool = l % pools;
    if (!p.Selects(l)) continue;
    if (spec.role == LayerRole::kSelect && spec.kind == "quest") {
      KVR_ASSIGN_OR_RETURN(int64_t qp, KnobInt(spec.knobs, "page", 16));
      quest_page = static_cast<int32_t>(qp);
      layer.unit = quest_page;
    }
    const int64_t candidates = std::max<int64_t>(0, C - sinks - window);
    const int64_t k_tokens = std::min(spec.budget.Resolve(C), candidates);
    layer.max_k = CeilDiv(k_tokens, layer.unit);
    layer.list_cap = sinks + window + layer.max_k * layer.unit;
    max_k_all = std::max(max_k_all, layer.max_k);
    if (o.mode == KvMode::kGpuResident) {
      KVR_ASSIGN_OR_RETURN(layer.lists, Alloc(be, B * hq * layer.list_cap * sizeof(int32_t)));
      KVR_ASSIGN_OR_RETURN(layer.lens, Alloc(be, B * hq * sizeof(int32_t)));
      need_scores = true;
    } else {
      layer.remote_sel.assign(B, std::vector<std::vector<int64_t>>(hq));
    }
    if (spec.role != LayerRole::kSelect || spec.where != SelectWhere::kLocal) continue;
    if (spec.kind == "loki") {
      KVR_ASSIGN_OR_RETURN(int64_t rank, KnobInt(spec.knobs, "rank", 32));
      layer.loki_rank = static_cast<int32_t>(rank);
      KVR_ASSIGN_OR_RETURN(layer.loki_plane, Alloc(be, B * hkv * C * rank * kElem));
      // ProjectRows multiplies rows by [d, cols] matrices: the transposed components.
      const std::vector<float>& comp = o.loki_components[l];
      std::vector<float> t(comp.size());
      for (int64_t g = 0; g < hkv; ++g) {
        for (int64_t i = 0; i < d; ++i) {
          for (int64_t j = 0; j < d; ++j) t[(g * d + i) * d + j] = comp[(g * d + j) * d + i];
        }
      }
      KVR_ASSIGN_OR_RETURN(layer.loki_matrices, Alloc(be, t.size() * sizeof(float)));
      KVR_RETURN_IF_ERROR(
          be->CopyToBackend(layer.loki_matrices.get(), t.data(), t.size() * sizeof(float), nullptr));
      KVR_RETURN_IF_ERROR(be->Synchronize(nullptr));
    } else if (spec.kind == "quest") {
      max_quest_pages = CeilDiv(C, quest_page);
      const size_t bytes = static_cast<size_t>(B * hkv * max_quest_pages * d * kElem);
      KVR_ASSIGN_OR_RETURN(layer.quest_max, Alloc(be, bytes));
      KVR_ASSIGN_OR_RETURN(layer.quest_min, Alloc(be, bytes));
    }
  }
  if (quest_page > 0) {
    KVR_ASSIGN_OR_RETURN(quest_pages, Alloc(be, B * sizeof(int32_t)));
    KVR_RETURN_IF_ERROR(be->Memset(quest_pages.get(), 0, B * sizeof(int32_t), nullptr));
  }

  // Paged KV pools. GPU-resident: a page for every position. Offloaded: the
  // pages of the sinks and of [prompt - window, capacity), assigned by
  // StartPrefix; the pool is sized for the worst case.
  num_pages = B * pages_per_seq;
  if (o.mode == KvMode::kOffloaded) {
    num_pages = B * std::min(pages_per_seq, CeilDiv(sinks, page) + CeilDiv(window, page) + 1 +
                                                CeilDiv(C, page));
  }
  host_table.assign(B * pages_per_seq, -1);
  if (o.mode == KvMode::kGpuResident) {
    for (int64_t i = 0; i < B * pages_per_seq; ++i) host_table[i] = static_cast<int32_t>(i);
  }
  KVR_ASSIGN_OR_RETURN(page_table, Alloc(be, host_table.size() * sizeof(int32_t)));
  KVR_RETURN_IF_ERROR(be->CopyToBackend(page_table.get(), host_table.data(),
                                        host_table.size() * sizeof(int32_t), nullptr));
  const size_t pool_bytes = static_cast<size_t>(num_pages) * page * hkv * d * kElem;
  for (int32_t i = 0; i < pools; ++i) {
    KVR_ASSIGN_OR_RETURN(Buffer k, Alloc(be, pool_bytes));
    KVR_ASSIGN_OR_RETURN(Buffer v, Alloc(be, pool_bytes));
    KVR_RETURN_IF_ERROR(be->Memset(k.get(), 0, pool_bytes, nullptr));
    KVR_RETURN_IF_ERROR(be->Memset(v.get(), 0, pool_bytes, nullptr));
    k_pools.push_back(std::move(k));
    v_pools.push_back(std::move(v));
  }

  if (need_scores) {
    KVR_ASSIGN_OR_RETURN(scores, Alloc(be, B * hq * C * sizeof(float)));
    KVR_ASSIGN_OR_RETURN(top_k, Alloc(be, B * hq * std::max<int64_t>(1, max_k_all) * sizeof(int32_t)));
    KVR_ASSIGN_OR_RETURN(q_proj, Alloc(be, B * hq * 64 * sizeof(float)));
  }
  KVR_ASSIGN_OR_RETURN(scratch_o, Alloc(be, B * hq * d * sizeof(float)));
  KVR_ASSIGN_OR_RETURN(states_o, Alloc(be, 2 * B * hq * d * sizeof(float)));
  KVR_ASSIGN_OR_RETURN(states_lse, Alloc(be, 2 * B * hq * sizeof(float)));
  resident_cap = std::max<int64_t>(1, sinks + window);
  KVR_ASSIGN_OR_RETURN(resident_lists, Alloc(be, B * hkv * resident_cap * sizeof(int32_t)));
  KVR_ASSIGN_OR_RETURN(resident_lens, Alloc(be, B * hkv * sizeof(int32_t)));
  KVR_RETURN_IF_ERROR(be->Synchronize(nullptr));
  KVR_RETURN_IF_ERROR(SizeWorkspace());

  if (o.mode == KvMode::kOffloaded) {
    KVR_ASSIGN_OR_RETURN(client, client::RetrievalClient::Create(o.client));
    KVR_ASSIGN_OR_RETURN(host_q, AllocHost(be, B * hq * d * sizeof(float)));
    KVR_ASSIGN_OR_RETURN(host_o, AllocHost(be, B * hq * d * sizeof(float)));
    KVR_ASSIGN_OR_RETURN(host_lse, AllocHost(be, B * hq * sizeof(float)));
    fetches.resize(L);
  }
  return absl::OkStatus();
}

gpu::PagedKvCache DecodeSession::Impl::Kv(int32_t layer) const {
  gpu::PagedKvCache kv;
  kv.k = k_pools[layers[layer].pool].get();
  kv.v = v_pools[layers[layer].pool].get();
  kv.dtype = o.model.kv_dtype;
  kv.head_dim = d;
  kv.num_kv_heads = hkv;
  kv.page_size = page;
  kv.num_pages = static_cast<int32_t>(num_pages);
  gpu::SetNhdStrides(&kv);
  kv.page_table = page_table.get<int32_t>();
  kv.max_pages_per_seq = static_cast<int32_t>(pages_per_seq);
  kv.seq_lens = seq_lens.get<int32_t>();
  return kv;
}

// Score columns of this step: the longest sequence, or the capacity when a
// captured step must stay exact at later lengths.
int64_t DecodeSession::Impl::Cols() const {
  if (o.graph_safe) return capacity;
  return std::max<int64_t>(1, *std::max_element(host_lens.begin(), host_lens.end()));
}

// Positions a selecting layer chooses this step (before rounding to units):
// its budget of the context, at most the candidates [sinks, T - window) of
// the shortest sequence.
int64_t DecodeSession::Impl::ResolveTokens(int32_t layer) const {
  const int64_t t = MinLen();
  const int64_t candidates = t - sinks - window;
  if (candidates <= 0) return 0;
  return std::min({o.policy.layers[layer].budget.Resolve(t), candidates,
                   layers[layer].max_k * layers[layer].unit});
}

absl::StatusOr<void*> DecodeSession::Impl::Workspace(size_t bytes) {
  if (bytes == 0) return nullptr;
  if (bytes > workspace.bytes()) {
    if (o.graph_safe) {
      return absl::InternalError(absl::StrCat("a kernel needs ", bytes, " workspace bytes; ",
                                              workspace.bytes(), " were sized at creation"));
    }
    KVR_RETURN_IF_ERROR(be->Synchronize(nullptr));
    workspace = Buffer();
    KVR_ASSIGN_OR_RETURN(workspace, Alloc(be, bytes));
  }
  return workspace.get();
}

// Sizes the workspace for the largest shapes the session will launch, so
// that steps (and captured graphs) never allocate.
absl::Status DecodeSession::Impl::SizeWorkspace() {
  size_t need = 0;
  const float* q = scratch_o.get<float>();  // any valid pointer: sizing reads no data
  gpu::DenseDecodeArgs dense;
  dense.kv = Kv(0);
  dense.batch_size = batch;
  dense.num_q_heads = hq;
  dense.q = q;
  dense.o = scratch_o.get<float>();
  dense.max_seq_len = static_cast<int32_t>(capacity);
  need = std::max(need, be->DenseDecodeWorkspaceBytes(dense));
  for (int32_t l = 0; l < L; ++l) {
    const Layer& layer = layers[l];
    if (layer.list_cap == 0) continue;
    gpu::SparseDecodeArgs sp;
    sp.kv = Kv(l);
    sp.batch_size = batch;
    sp.num_q_heads = hq;
    sp.q = q;
    sp.lists_per_kv_head = false;
    sp.positions = zeros.get<int32_t>();
    sp.max_list_len = static_cast<int32_t>(layer.list_cap);
    sp.o = scratch_o.get<float>();
    need = std::max(need, be->SparseDecodeWorkspaceBytes(sp));
    if (layer.max_k > 0 && scores.get() != nullptr) {
      gpu::TopKArgs t;
      t.scores = scores.get<float>();
      t.num_rows = batch * hq;
      t.num_cols = static_cast<int32_t>(layer.unit > 1 ? max_quest_pages : capacity);
      t.k = static_cast<int32_t>(std::min<int64_t>(layer.max_k, t.num_cols));
      t.indices = top_k.get<int32_t>();
      need = std::max(need, be->TopKWorkspaceBytes(t));
    }
  }
  gpu::SparseDecodeArgs res;
  res.kv = Kv(0);
  res.batch_size = batch;
  res.num_q_heads = hq;
  res.q = q;
  res.lists_per_kv_head = true;
  res.positions = resident_lists.get<int32_t>();
  res.max_list_len = static_cast<int32_t>(resident_cap);
  res.o = scratch_o.get<float>();
  need = std::max(need, be->SparseDecodeWorkspaceBytes(res));
  if (need == 0) return absl::OkStatus();
  KVR_ASSIGN_OR_RETURN(workspace, Alloc(be, need));
  return absl::OkStatus();
}

// ------------------------------------------------------------------ prefix

absl::Status DecodeSession::Impl::StartPrefix(const std::vector<int64_t>& prefix_tokens,
                                              const std::vector<std::vector<Hash128>>& chains,
                                              const ProgressCallback& progress) {
  if (static_cast<int32_t>(prefix_tokens.size()) != batch) {
    return absl::InvalidArgumentError(absl::StrCat("give one prefix length per sequence (",
                                                   batch, "); got ", prefix_tokens.size()));
  }
  for (size_t b = 0; b < prefix_tokens.size(); ++b) {
    if (prefix_tokens[b] < 1 || prefix_tokens[b] >= capacity) {
      return absl::InvalidArgumentError(absl::StrCat("prefix of sequence ", b, " has ",
                                                     prefix_tokens[b], " tokens; it must be in [1, ",
                                                     capacity, ") to leave room to decode"));
    }
  }
  for (auto& f : fetches) {
    if (f != nullptr) f->Join();
  }
  host_lens = prefix_tokens;
  std::vector<int32_t> lens(host_lens.begin(), host_lens.end());
  KVR_RETURN_IF_ERROR(be->CopyToBackend(seq_lens.get(), lens.data(), lens.size() * sizeof(int32_t), nullptr));
  if (quest_page > 0) {
    std::vector<int32_t> pages(batch);
    for (int32_t b = 0; b < batch; ++b) pages[b] = static_cast<int32_t>(CeilDiv(lens[b], quest_page));
    KVR_RETURN_IF_ERROR(be->CopyToBackend(quest_pages.get(), pages.data(), pages.size() * sizeof(int32_t), nullptr));
  }
  if (o.mode == KvMode::kOffloaded) {
    // Resident pages: the sinks and [prompt - window, capacity).
    std::fill(host_table.begin(), host_table.end(), -1);
    int32_t next_page = 0;
    for (int32_t b = 0; b < batch; ++b) {
      int32_t* row = host_table.data() + b * pages_per_seq;
      auto assign = [&](int64_t begin, int64_t end) -> absl::Status {
        for (int64_t pg = begin / page; pg < CeilDiv(end, page); ++pg) {
          if (row[pg] >= 0) continue;
          if (next_page >= num_pages) return absl::InternalError("offloaded page pool exhausted");
          row[pg] = next_page++;
        }
        return absl::OkStatus();
      };
      KVR_RETURN_IF_ERROR(assign(0, std::min<int64_t>(sinks, host_lens[b])));
      KVR_RETURN_IF_ERROR(assign(std::max<int64_t>(0, host_lens[b] - window), capacity));
    }
    KVR_RETURN_IF_ERROR(be->CopyToBackend(page_table.get(), host_table.data(),
                                          host_table.size() * sizeof(int32_t), nullptr));
    KVR_RETURN_IF_ERROR(OpenRemote(chains, progress));
  } else if (!chains.empty()) {
    return absl::InvalidArgumentError("span chains are for offloaded sessions");
  }
  KVR_RETURN_IF_ERROR(be->Synchronize(nullptr));
  next_layer = 0;
  started = true;
  return absl::OkStatus();
}

absl::Status DecodeSession::Impl::OpenRemote(const std::vector<std::vector<Hash128>>& chains,
                                             const ProgressCallback& progress) {
  if (static_cast<int32_t>(chains.size()) != batch) {
    return absl::InvalidArgumentError(absl::StrCat(
        "offloaded mode needs the stored prefix (span hashes) of each of the ", batch,
        " sequences; got ", chains.size()));
  }
  contexts.assign(batch, Hash128());
  server_tokens.assign(batch, 0);
  streams.clear();
  for (int32_t b = 0; b < batch; ++b) {
    KVR_ASSIGN_OR_RETURN(v1::OpenContextResponse opened, client->OpenContext(o.model_id, chains[b]));
    if (opened.num_tokens() != host_lens[b]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", b, ": the stored prefix holds ", opened.num_tokens(),
          " tokens but the prompt has ", host_lens[b]));
    }
    KVR_ASSIGN_OR_RETURN(contexts[b], Hash128::FromBytes(opened.context()));
    server_tokens[b] = opened.num_tokens();
  }
  // Build the indexes the remote layers search, where missing (any params).
  std::map<std::string, std::vector<int32_t>> wanted;  // kind -> layers
  for (int32_t l = 0; l < L; ++l) {
    const LayerSpec& s = o.policy.layers[l];
    if (s.role == LayerRole::kSelect && s.where == SelectWhere::kRemote && s.kind != "all") {
      wanted[s.kind].push_back(l);
    }
  }
  int64_t builds = 0, done = 0;
  for (const auto& kv : wanted) builds += static_cast<int64_t>(kv.second.size()) * batch;
  for (int32_t b = 0; b < batch; ++b) {
    KVR_ASSIGN_OR_RETURN(std::vector<v1::IndexInfo> have, client->ListIndexes(contexts[b]));
    for (const auto& [kind, layer_list] : wanted) {
      std::vector<int32_t> missing;
      for (int32_t l : layer_list) {
        int32_t heads = 0;
        for (const auto& info : have) heads += info.kind() == kind && info.layer() == l;
        if (heads < hkv) missing.push_back(l);
      }
      done += static_cast<int64_t>(layer_list.size() - missing.size());
      if (missing.empty()) continue;
      KVR_ASSIGN_OR_RETURN(v1::Operation op, client->BuildIndex(contexts[b], kind, "", missing));
      const int64_t base = done;
      KVR_ASSIGN_OR_RETURN(op, client->WaitOperation(op.id(), absl::Hours(24), [&](const Progress& p) {
        if (!progress) return true;
        Progress all = p;
        all.stage = absl::StrCat("sequence ", b, " ", kind, ": ", p.stage);
        all.fraction = (static_cast<double>(base) + p.fraction * missing.size()) / std::max<int64_t>(1, builds);
        return progress(all);
      }));
      if (op.state() != v1::OPERATION_STATE_DONE) {
        return absl::Status(op.error_code() != 0 ? static_cast<absl::StatusCode>(op.error_code())
                                                 : absl::StatusCode::kInternal,
                            absl::StrCat("building the ", kind, " index of sequence ", b,
                                         " failed: ", op.error_message()));
      }
      done += static_cast<int64_t>(missing.size());
    }
  }
  for (int32_t b = 0; b < batch; ++b) {
    KVR_ASSIGN_OR_RETURN(auto stream, client->OpenAttendStream(absl::Hours(24)));
    streams.push_back(std::move(stream));
  }
  for (Layer& layer : layers) {
    for (auto& per_seq : layer.remote_sel) {
      for (auto& h : per_seq) h.clear();
    }
  }
  return absl::OkStatus();
}

absl::Status DecodeSession::Impl::LoadPrefixLayer(int32_t layer, const void* k, const void* v,
                                                  int64_t num_tokens, int64_t batch_stride,
                                                  int64_t head_stride, int64_t token_stride,
                                                  void* stream) {
  if (!started) return absl::FailedPreconditionError("call StartPrefix before LoadPrefixLayer");
  if (layer < 0 || layer >= L) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not within [0, ", L, ")"));
  }
  if (num_tokens < 1 || num_tokens > capacity) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens must be in [1, ", capacity, "]"));
  }
  gpu::AppendKvArgs a;
  a.kv = Kv(layer);
  a.batch_size = batch;
  a.num_tokens = static_cast<int32_t>(num_tokens);
  a.k_src = k;
  a.v_src = v;
  a.src_batch_stride = batch_stride;
  a.src_head_stride = head_stride;
  a.src_token_stride = token_stride;
  a.start_positions = zeros.get<int32_t>();
  KVR_RETURN_IF_ERROR(be->AppendKv(a, stream));
  const Layer& ly = layers[layer];
  if (ly.loki_rank > 0) {
    gpu::ProjectRowsArgs p;
    p.x = k;
    p.x_dtype = o.model.kv_dtype;
    p.x_batch_stride = batch_stride;
    p.x_head_stride = head_stride;
    p.x_token_stride = token_stride;
    p.matrices = ly.loki_matrices.get<float>();
    p.matrix_cols = d;
    p.heads_per_matrix = 1;
    p.batch_size = batch;
    p.num_heads = hkv;
    p.num_tokens = static_cast<int32_t>(num_tokens);
    p.head_dim = d;
    p.rank = ly.loki_rank;
    p.y = ly.loki_plane.get();
    p.y_dtype = o.model.kv_dtype;
    p.y_batch_stride = hkv * capacity * ly.loki_rank;
    p.y_head_stride = capacity * ly.loki_rank;
    p.y_token_stride = ly.loki_rank;
    p.max_positions = static_cast<int32_t>(capacity);
    KVR_RETURN_IF_ERROR(be->ProjectRows(p, stream));
  }
  if (ly.quest_max.get() != nullptr) {
    gpu::PageBoundsArgs pb;
    pb.kv = Kv(layer);
    pb.batch_size = batch;
    pb.quest_page_size = quest_page;
    pb.last_pages = 0;
    pb.page_max = ly.quest_max.get();
    pb.page_min = ly.quest_min.get();
    pb.seq_stride = hkv * max_quest_pages * d;
    pb.head_stride = max_quest_pages * d;
    pb.max_pages = static_cast<int32_t>(max_quest_pages);
    KVR_RETURN_IF_ERROR(be->ComputePageBounds(pb, stream));
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------------ a step

absl::Status DecodeSession::Impl::BeginStep(void* stream) {
  for (int32_t b = 0; b < batch; ++b) {
    if (host_lens[b] + 1 > capacity) {
      return absl::ResourceExhaustedError(absl::StrCat("sequence ", b, " is full: capacity_tokens = ",
                                                       capacity));
    }
  }
  if (o.mode == KvMode::kOffloaded) {
    // Decoded tokens go to kvrecalld before they leave the window.
    for (int32_t b = 0; b < batch; ++b) KVR_RETURN_IF_ERROR(AppendToServer(b, stream));
  }
  gpu::AdvanceSeqLensArgs a;
  a.seq_lens = seq_lens.get<int32_t>();
  a.batch_size = batch;
  a.num_tokens = 1;
  if (quest_page > 0) {
    a.pages = quest_pages.get<int32_t>();
    a.page_size = quest_page;
  }
  KVR_RETURN_IF_ERROR(be->AdvanceSeqLens(a, stream));
  for (int64_t& t : host_lens) ++t;
  ++stats.steps;
  if (o.mode == KvMode::kOffloaded) {
    // The GPU's share of every layer this step: sinks ∪ window, per KV head.
    gpu::ComposeListsArgs c;
    c.batch_size = batch;
    c.num_lists = hkv;
    c.seq_lens = seq_lens.get<int32_t>();
    c.sinks = sinks;
    c.window = window;
    c.positions = resident_lists.get<int32_t>();
    c.list_lens = resident_lens.get<int32_t>();
    c.max_list_len = static_cast<int32_t>(resident_cap);
    KVR_RETURN_IF_ERROR(be->ComposeLists(c, stream));
  }
  return absl::OkStatus();
}

absl::Status DecodeSession::Impl::AttendLayer(int32_t layer, const float* q, const void* k_new,
                                              const void* v_new, float* out, void* stream) {
  if (!started) return absl::FailedPreconditionError("call StartPrefix before AttendLayer");
  if (layer != next_layer) {
    return absl::FailedPreconditionError(absl::StrCat(
        "layers must be attended in order 0..", L - 1, " every step: expected layer ", next_layer,
        ", got ", layer));
  }
  if (q == nullptr || k_new == nullptr || v_new == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("q, k_new, v_new and out must not be null");
  }
  if (layer == 0) KVR_RETURN_IF_ERROR(BeginStep(stream));
  gpu::AppendKvArgs a;
  a.kv = Kv(layer);
  a.batch_size = batch;
  a.num_tokens = 1;
  a.k_src = k_new;
  a.v_src = v_new;
  a.src_batch_stride = static_cast<int64_t>(hkv) * d;
  a.src_head_stride = d;
  a.src_token_stride = d;
  KVR_RETURN_IF_ERROR(be->AppendKv(a, stream));
  const Layer& ly = layers[layer];
  if (ly.loki_rank > 0) {
    gpu::ProjectRowsArgs p;
    p.x = k_new;
    p.x_dtype = o.model.kv_dtype;
    p.x_batch_stride = static_cast<int64_t>(hkv) * d;
    p.x_head_stride = d;
    p.x_token_stride = d;
    p.matrices = ly.loki_matrices.get<float>();
    p.matrix_cols = d;
    p.heads_per_matrix = 1;
    p.batch_size = batch;
    p.num_heads = hkv;
    p.num_tokens = 1;
    p.head_dim = d;
    p.rank = ly.loki_rank;
    p.y = ly.loki_plane.get();
    p.y_dtype = o.model.kv_dtype;
    p.y_batch_stride = hkv * capacity * ly.loki_rank;
    p.y_head_stride = capacity * ly.loki_rank;
    p.y_token_stride = ly.loki_rank;
    p.offset_from_seq_lens = true;
    p.seq_lens = seq_lens.get<int32_t>();
    p.max_positions = static_cast<int32_t>(capacity);
    KVR_RETURN_IF_ERROR(be->ProjectRows(p, stream));
  }
  if (ly.quest_max.get() != nullptr) {
    gpu::PageBoundsArgs pb;
    pb.kv = Kv(layer);
    pb.batch_size = batch;
    pb.quest_page_size = quest_page;
    pb.last_pages = 1;
    pb.page_max = ly.quest_max.get();
    pb.page_min = ly.quest_min.get();
    pb.seq_stride = hkv * max_quest_pages * d;
    pb.head_stride = max_quest_pages * d;
    pb.max_pages = static_cast<int32_t>(max_quest_pages);
    KVR_RETURN_IF_ERROR(be->ComputePageBounds(pb, stream));
  }
  next_layer = (layer + 1) % L;
  if (o.mode == KvMode::kGpuResident) return AttendResident(layer, q, out, stream);
  return AttendOffloaded(layer, q, out, stream);
}

// Masks the scores of this step outside [sinks, T - window), picks the top
// k_units columns per (sequence, query head) and writes the layer's lists:
// sinks ∪ window ∪ the selected positions.
absl::Status DecodeSession::Impl::SelectFromScores(int32_t layer, int64_t ncols, int64_t k_units,
                                                   void* stream) {
  Layer& ly = layers[layer];
  gpu::MaskScoresArgs m;
  m.scores = scores.get<float>();
  m.num_rows = batch * hq;
  m.rows_per_seq = hq;
  m.num_cols = static_cast<int32_t>(ncols);
  m.row_stride = ncols;
  m.seq_lens = seq_lens.get<int32_t>();
  m.sinks = sinks;
  m.window = window;
  m.unit = ly.unit;
  KVR_RETURN_IF_ERROR(be->MaskScores(m, stream));
  k_units = std::min(k_units, ncols);
  if (k_units > 0) {
    gpu::TopKArgs t;
    t.scores = scores.get<float>();
    t.num_rows = batch * hq;
    t.num_cols = static_cast<int32_t>(ncols);
    t.row_stride = ncols;
    t.k = static_cast<int32_t>(k_units);
    t.indices = top_k.get<int32_t>();
    KVR_ASSIGN_OR_RETURN(void* ws, Workspace(be->TopKWorkspaceBytes(t)));
    KVR_RETURN_IF_ERROR(be->TopK(t, ws, stream));
  }
  gpu::ComposeListsArgs c;
  c.batch_size = batch;
  c.num_lists = hq;
  c.seq_lens = seq_lens.get<int32_t>();
  c.sinks = sinks;
  c.window = window;
  c.selected = k_units > 0 ? top_k.get<int32_t>() : nullptr;
  c.num_selected = static_cast<int32_t>(k_units);
  c.unit = ly.unit;
  c.positions = ly.lists.get<int32_t>();
  c.list_lens = ly.lens.get<int32_t>();
  c.max_list_len = static_cast<int32_t>(ly.list_cap);
  return be->ComposeLists(c, stream);
}

// Attention of layer kv_layer's K/V over the lists of list_layer.
absl::Status DecodeSession::Impl::SparseOverLists(int32_t kv_layer, int32_t list_layer,
                                                  const float* q, float* o_out, void* stream) {
  const Layer& src = layers[list_layer];
  gpu::SparseDecodeArgs s;
  s.kv = Kv(kv_layer);
  s.batch_size = batch;
  s.num_q_heads = hq;
  s.q = q;
  s.lists_per_kv_head = false;
  s.positions = src.lists.get<int32_t>();
  s.list_lens = src.lens.get<int32_t>();
  s.max_list_len = static_cast<int32_t>(src.list_cap);
  s.o = o_out;
  KVR_ASSIGN_OR_RETURN(void* ws, Workspace(be->SparseDecodeWorkspaceBytes(s)));
  return be->SparseDecodeAttention(s, ws, stream);
}

absl::Status DecodeSession::Impl::AttendResident(int32_t layer, const float* q, float* out,
                                                 void* stream) {
  const LayerSpec& spec = o.policy.layers[layer];
  const Layer& ly = layers[layer];
  const int64_t cols = Cols();
  const int64_t k_tokens = o.policy.Selects(layer) ? ResolveTokens(layer) : 0;
  auto dense = [&](float* o_out, bool with_scores) -> absl::Status {
    gpu::DenseDecodeArgs a;
    a.kv = Kv(layer);
    a.batch_size = batch;
    a.num_q_heads = hq;
    a.q = q;
    a.max_seq_len = static_cast<int32_t>(cols);
    a.o = o_out;
    if (with_scores) {
      a.scores = scores.get<float>();
      a.scores_stride = cols;
    }
    KVR_ASSIGN_OR_RETURN(void* ws, Workspace(be->DenseDecodeWorkspaceBytes(a)));
    return be->DenseDecodeAttention(a, ws, stream);
  };
  switch (spec.role) {
    case LayerRole::kFull:
      KVR_RETURN_IF_ERROR(dense(out, o.policy.Selects(layer)));
      if (o.policy.Selects(layer)) KVR_RETURN_IF_ERROR(SelectFromScores(layer, cols, k_tokens, stream));
      return absl::OkStatus();
    case LayerRole::kReuse:
      return SparseOverLists(layer, spec.source, q, out, stream);
    case LayerRole::kSelect:
      break;
  }
  if (spec.kind == "exact") {
    KVR_RETURN_IF_ERROR(dense(scratch_o.get<float>(), /*with_scores=*/true));
    KVR_RETURN_IF_ERROR(SelectFromScores(layer, cols, k_tokens, stream));
  } else if (spec.kind == "loki") {
    gpu::ProjectRowsArgs p;
    p.x = q;
    p.x_dtype = DType::kF32;
    p.x_batch_stride = static_cast<int64_t>(hq) * d;
    p.x_head_stride = d;
    p.x_token_stride = d;
    p.matrices = ly.loki_matrices.get<float>();
    p.matrix_cols = d;
    p.heads_per_matrix = group;
    p.batch_size = batch;
    p.num_heads = hq;
    p.num_tokens = 1;
    p.head_dim = d;
    p.rank = ly.loki_rank;
    p.y = q_proj.get();
    p.y_dtype = DType::kF32;
    p.y_batch_stride = static_cast<int64_t>(hq) * ly.loki_rank;
    p.y_head_stride = ly.loki_rank;
    p.y_token_stride = ly.loki_rank;
    KVR_RETURN_IF_ERROR(be->ProjectRows(p, stream));
    gpu::LokiScoreArgs ls;
    ls.q = q_proj.get<float>();
    ls.keys = ly.loki_plane.get();
    ls.dtype = o.model.kv_dtype;
    ls.rank = ly.loki_rank;
    ls.head_dim = d;
    ls.batch_size = batch;
    ls.num_q_heads = hq;
    ls.num_kv_heads = hkv;
    ls.seq_stride = hkv * capacity * ly.loki_rank;
    ls.head_stride = capacity * ly.loki_rank;
    ls.seq_lens = seq_lens.get<int32_t>();
    ls.max_seq_len = static_cast<int32_t>(cols);
    ls.scores = scores.get<float>();
    KVR_ASSIGN_OR_RETURN(void* ws, Workspace(be->LokiScoreWorkspaceBytes(ls)));
    KVR_RETURN_IF_ERROR(be->LokiScore(ls, ws, stream));
    KVR_RETURN_IF_ERROR(SelectFromScores(layer, cols, k_tokens, stream));
  } else if (spec.kind == "quest") {
    const int64_t qcols = CeilDiv(cols, quest_page);
    gpu::QuestScoreArgs qs;
    qs.q = q;
    qs.page_max = ly.quest_max.get();
    qs.page_min = ly.quest_min.get();
    qs.dtype = o.model.kv_dtype;
    qs.head_dim = d;
    qs.batch_size = batch;
    qs.num_q_heads = hq;
    qs.num_kv_heads = hkv;
    qs.seq_stride = hkv * max_quest_pages * d;
    qs.head_stride = max_quest_pages * d;
    qs.num_pages = quest_pages.get<int32_t>();
    qs.max_pages = static_cast<int32_t>(qcols);
    qs.scores = scores.get<float>();
    KVR_ASSIGN_OR_RETURN(void* ws, Workspace(be->QuestScoreWorkspaceBytes(qs)));
    KVR_RETURN_IF_ERROR(be->QuestScore(qs, ws, stream));
    KVR_RETURN_IF_ERROR(SelectFromScores(layer, qcols, CeilDiv(k_tokens, quest_page), stream));
  } else {
    return absl::InternalError(absl::StrCat("layer ", layer, ": unknown local kind ", spec.kind));
  }
  return SparseOverLists(layer, layer, q, out, stream);
}

// ------------------------------------------------------------- offloaded

// Positions of sequence b's context the remote side must not attend to this
// step: the sinks and the window (the GPU's share).
std::vector<std::pair<int64_t, int64_t>> DecodeSession::Impl::RemoteExclude(int32_t b) const {
  std::vector<std::pair<int64_t, int64_t>> out;
  const int64_t ts = server_tokens[b];
  const int64_t sink_end = std::min<int64_t>(sinks, ts);
  if (sink_end > 0) out.emplace_back(0, sink_end);
  const int64_t win_begin = std::max<int64_t>(sinks, host_lens[b] - window);
  if (win_begin < ts) out.emplace_back(win_begin, ts);
  return out;
}

// Sends sequence b's decoded tokens that kvrecalld does not hold yet, once
// a chunk has gathered or before the next step's window would leave one
// behind (every remote candidate [sinks, T - window) must be stored).
absl::Status DecodeSession::Impl::AppendToServer(int32_t b, void* stream) {
  const int64_t known = host_lens[b];          // positions with K/V (before this step)
  const int64_t next_window = known + 1 - window;  // first position of the next step's window
  const int64_t ts = server_tokens[b];
  if (known - ts < append_chunk && next_window <= ts) return absl::OkStatus();
  const int64_t n = known - ts;
  if (n <= 0) return absl::OkStatus();
  const absl::Time start = absl::Now();
  const size_t row = static_cast<size_t>(hkv) * d * kElem;  // one position of one layer (NHD)
  std::vector<char> pool_rows(static_cast<size_t>(n) * row);
  v1::AppendTokensRequest req;
  req.set_context(contexts[b].ToBytes());
  req.mutable_layers()->set_begin(0);
  req.mutable_layers()->set_end(L);
  std::string keys(static_cast<size_t>(L) * n * row, '\0'), values(keys.size(), '\0');
  for (int32_t l = 0; l < L; ++l) {
    for (int pass = 0; pass < 2; ++pass) {
      const char* pool = static_cast<const char*>(pass == 0 ? k_pools[layers[l].pool].get()
                                                             : v_pools[layers[l].pool].get());
      // Runs of positions within one page are contiguous in the pool.
      for (int64_t p = ts; p < known;) {
        const int64_t pg = p / page, slot = p % page;
        const int64_t run = std::min(known - p, page - slot);
        const int32_t id = host_table[b * pages_per_seq + pg];
        if (id < 0) return absl::InternalError(absl::StrCat("position ", p, " is not resident"));
        KVR_RETURN_IF_ERROR(be->CopyToHost(pool_rows.data() + (p - ts) * row,
                                           pool + (static_cast<int64_t>(id) * page + slot) * row,
                                           run * row, stream));
        p += run;
      }
      KVR_RETURN_IF_ERROR(be->Synchronize(stream));
      // [n, Hkv, d] -> [Hkv, n, d] into layer l's slice of [L, Hkv, n, d].
      std::string& dst = pass == 0 ? keys : values;
      const size_t head_row = static_cast<size_t>(d) * kElem;
      for (int64_t t = 0; t < n; ++t) {
        for (int32_t g = 0; g < hkv; ++g) {
          std::memcpy(dst.data() + ((static_cast<size_t>(l) * hkv + g) * n + t) * head_row,
                      pool_rows.data() + t * row + g * head_row, head_row);
        }
      }
    }
  }
  for (auto [tensor, bytes] : {std::pair{req.mutable_keys(), &keys}, std::pair{req.mutable_values(), &values}}) {
    tensor->set_dtype(ToProtoDType(o.model.kv_dtype));
    for (int64_t e : {static_cast<int64_t>(L), static_cast<int64_t>(hkv), n, static_cast<int64_t>(d)}) {
      tensor->add_shape(e);
    }
    tensor->set_data(std::move(*bytes));
  }
  KVR_ASSIGN_OR_RETURN(int64_t first, client->AppendTokens(req));
  if (first != ts) {
    return absl::FailedPreconditionError(absl::StrCat(
        "sequence ", b, ": kvrecalld appended the decoded tokens at position ", first,
        ", expected ", ts, " (another writer appended to this context)"));
  }
  server_tokens[b] = known;
  stats.append_us += MicrosSince(start);
  stats.bytes_sent += static_cast<int64_t>(2 * L * n * row);
  return absl::OkStatus();
}

absl::Status DecodeSession::Impl::AttendOffloaded(int32_t layer, const float* q, float* out,
                                                  void* stream) {
  const LayerSpec& spec = o.policy.layers[layer];
  const int64_t B = batch;
  const size_t q_bytes = static_cast<size_t>(B) * hq * d * sizeof(float);
  float* states_o0 = states_o.get<float>();
  float* states_o1 = states_o0 + B * hq * d;
  float* states_l0 = states_lse.get<float>();
  float* states_l1 = states_l0 + B * hq;

  // The queries on the host (this waits for the layer's inputs on `stream`).
  absl::Time t0 = absl::Now();
  KVR_RETURN_IF_ERROR(be->CopyToHost(host_q.get(), q, q_bytes, stream));
  KVR_RETURN_IF_ERROR(be->Synchronize(stream));
  stats.query_download_us += MicrosSince(t0);

  const bool fetched =
      spec.role == LayerRole::kReuse && o.reuse_transfer == ReuseTransfer::kFetchRows;
  const int64_t k_tokens = o.policy.Selects(layer) ? ResolveTokens(layer) : 0;
  // Per sequence: the remote request, or none.
  std::vector<bool> remote(B, false);
  std::vector<v1::AttendRequest> requests(B);
  for (int32_t b = 0; b < B; ++b) {
    const auto exclude = RemoteExclude(b);
    int64_t excluded = 0;
    for (const auto& [x, y] : exclude) excluded += y - x;
    const bool any_candidate = server_tokens[b] - excluded > 0;
    client::RetrieveOptions ro;
    ro.exclude = exclude;
    ro.omit_positions = !o.policy.IsReused(layer);
    switch (spec.role) {
      case LayerRole::kFull:
        remote[b] = any_candidate;
        ro.kind = "all";
        ro.select_k = static_cast<int32_t>(std::min<int64_t>(k_tokens, server_tokens[b] - excluded));
        break;
      case LayerRole::kSelect:
        remote[b] = any_candidate && k_tokens > 0;
        ro.kind = spec.kind;
        ro.k = static_cast<int32_t>(std::min<int64_t>(k_tokens, server_tokens[b] - excluded));
        ro.effort = spec.effort;
        ro.knobs = spec.knobs;
        break;
      case LayerRole::kReuse: {
        const auto& sel = layers[spec.source].remote_sel[b];
        bool any = false;
        for (const auto& h : sel) any = any || !h.empty();
        remote[b] = !fetched && any;
        ro = client::RetrieveOptions();
        ro.positions = sel;
        break;
      }
    }
    if (!remote[b]) continue;
    requests[b] = client::MakeAttendRequest(contexts[b], layer,
                                            absl::MakeConstSpan(host_q.get<float>() + b * hq * d, hq * d),
                                            hq, ro);
    requests[b].set_request_id(next_request_id++);
  }

  // Send (over an in-process channel a write waits for the read: alternate).
  const bool alternate = o.client.channel != nullptr;
  std::vector<v1::AttendResponse> responses(B);
  auto receive = [&](int32_t b) -> absl::Status {
    const absl::Time w = absl::Now();
    KVR_ASSIGN_OR_RETURN(responses[b], streams[b]->Receive());
    stats.rpc_wait_us += MicrosSince(w);
    if (responses[b].request_id() != requests[b].request_id()) {
      return absl::InternalError("BatchAttend answered out of order");
    }
    if (responses[b].error_code() != 0) {
      return absl::Status(static_cast<absl::StatusCode>(responses[b].error_code()),
                          absl::StrCat("layer ", layer, ", sequence ", b, ": ",
                                       responses[b].error_message()));
    }
    return absl::OkStatus();
  };
  for (int32_t b = 0; b < B; ++b) {
    if (!remote[b]) continue;
    if (!streams[b]->Send(requests[b])) {
      return absl::UnavailableError(absl::StrCat("the BatchAttend stream of sequence ", b,
                                                 " broke: ", streams[b]->Finish().ToString()));
    }
    ++stats.remote_calls;
    stats.bytes_sent += static_cast<int64_t>(requests[b].ByteSizeLong());
    if (alternate) KVR_RETURN_IF_ERROR(receive(b));
  }

  // Meanwhile, the GPU's partial over sinks ∪ window (and over fetched rows).
  gpu::SparseDecodeArgs s;
  s.kv = Kv(layer);
  s.batch_size = batch;
  s.num_q_heads = hq;
  s.q = q;
  s.lists_per_kv_head = true;
  s.positions = resident_lists.get<int32_t>();
  s.list_lens = resident_lens.get<int32_t>();
  s.max_list_len = static_cast<int32_t>(resident_cap);
  s.o = states_o0;
  s.lse = states_l0;
  KVR_ASSIGN_OR_RETURN(void* ws, Workspace(be->SparseDecodeWorkspaceBytes(s)));
  KVR_RETURN_IF_ERROR(be->SparseDecodeAttention(s, ws, stream));

  if (fetched) {
    KVR_RETURN_IF_ERROR(AttendFetched(layer, spec.source, q, states_o1, stream));
  } else {
    // The remote partials, uploaded as the merge's second state.
    float* ho = host_o.get<float>();
    float* hl = host_lse.get<float>();
    for (int32_t b = 0; b < B; ++b) {
      if (!remote[b]) {
        std::fill(ho + b * hq * d, ho + (b + 1) * hq * d, 0.0f);
        std::fill(hl + b * hq, hl + (b + 1) * hq, -std::numeric_limits<float>::infinity());
        if (!layers[layer].remote_sel.empty()) {
          for (auto& h : layers[layer].remote_sel[b]) h.clear();
        }
        continue;
      }
      if (!alternate) KVR_RETURN_IF_ERROR(receive(b));
      const v1::AttendResponse& r = responses[b];
      stats.server_us += r.stats().server_us();
      stats.server_search_us += r.stats().search_us();
      stats.server_attend_us += r.stats().attend_us();
      stats.bytes_received += static_cast<int64_t>(r.ByteSizeLong());
      if (r.out().data().size() != static_cast<size_t>(hq) * d * sizeof(float) ||
          r.lse_natural_size() != hq) {
        return absl::InternalError("kvrecalld sent a malformed attention state");
      }
      std::memcpy(ho + b * hq * d, r.out().data().data(), r.out().data().size());
      std::copy(r.lse_natural().begin(), r.lse_natural().end(), hl + b * hq);
      if (o.policy.Selects(layer)) {
        auto& sel = layers[layer].remote_sel[b];
        for (int32_t h = 0; h < hq; ++h) {
          if (h < r.heads_size()) {
            sel[h].assign(r.heads(h).positions().begin(), r.heads(h).positions().end());
            // Increasing order: kvrecalld checks sorted lists without copying them.
            std::sort(sel[h].begin(), sel[h].end());
          } else {
            sel[h].clear();
          }
        }
      }
    }
    t0 = absl::Now();
    KVR_RETURN_IF_ERROR(be->CopyToBackend(states_o1, ho, q_bytes, stream));
    KVR_RETURN_IF_ERROR(be->CopyToBackend(states_l1, hl, static_cast<size_t>(B) * hq * sizeof(float), stream));
    stats.state_upload_us += MicrosSince(t0);
  }

  gpu::MergeStatesArgs m;
  m.o_states = states_o0;
  m.lse_states = states_l0;
  m.num_states = 2;
  m.num_heads = batch * hq;
  m.head_dim = d;
  m.o_state_stride = B * hq * d;
  m.o_head_stride = d;
  m.lse_state_stride = B * hq;
  m.lse_head_stride = 1;
  m.o = out;
  m.out_dtype = DType::kF32;
  KVR_RETURN_IF_ERROR(be->MergeStates(m, stream));

  if (o.policy.Selects(layer) && o.policy.IsReused(layer) &&
      o.reuse_transfer == ReuseTransfer::kFetchRows) {
    KVR_RETURN_IF_ERROR(StartFetch(layer, stream));
  }
  return absl::OkStatus();
}

// Starts fetching, for every layer that reuses `source`, the K/V rows of the
// union (per KV head) of the source's selection; one GatherKv per sequence
// on its own thread, rows landing in pinned host memory.
absl::Status DecodeSession::Impl::StartFetch(int32_t source, void* stream) {
  if (fetches[source] == nullptr) fetches[source] = std::make_unique<Fetch>();
  Fetch& f = *fetches[source];
  f.Join();
  int32_t first = L, last = -1;
  for (int32_t l = source + 1; l < L; ++l) {
    const LayerSpec& s = o.policy.layers[l];
    if (s.role == LayerRole::kReuse && s.source == source) {
      first = std::min(first, l);
      last = l;
    }
  }
  if (last < 0) return absl::OkStatus();
  f.layer_begin = first;
  f.layer_end = last + 1;
  const int64_t nl = f.layer_end - f.layer_begin;
  const Layer& src = layers[source];
  // Unions per (sequence, KV head) and each query head's rows in them.
  f.union_pos.assign(batch, std::vector<std::vector<int64_t>>(hkv));
  int64_t rows_cap = 1, list_cap = 1;
  for (int32_t b = 0; b < batch; ++b) {
    for (int32_t h = 0; h < hq; ++h) {
      auto& u = f.union_pos[b][h / group];
      u.insert(u.end(), src.remote_sel[b][h].begin(), src.remote_sel[b][h].end());
      list_cap = std::max<int64_t>(list_cap, src.remote_sel[b][h].size());
    }
    for (auto& u : f.union_pos[b]) {
      std::sort(u.begin(), u.end());
      u.erase(std::unique(u.begin(), u.end()), u.end());
      rows_cap = std::max<int64_t>(rows_cap, u.size());
    }
  }
  // Buffers, grown to the largest selection seen.
  const size_t row = static_cast<size_t>(hkv) * d * kElem;
  if (rows_cap > f.rows_cap || list_cap > f.list_cap) {
    f.rows_cap = std::max(rows_cap, f.rows_cap);
    f.list_cap = std::max(list_cap, f.list_cap);
    const int64_t R = f.rows_cap;
    KVR_ASSIGN_OR_RETURN(f.k, Alloc(be, batch * R * row));
    KVR_ASSIGN_OR_RETURN(f.v, Alloc(be, batch * R * row));
    std::vector<int32_t> table(batch * R);
    for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(i);
    std::vector<int32_t> lens(batch, static_cast<int32_t>(R));
    KVR_ASSIGN_OR_RETURN(f.table, Alloc(be, table.size() * sizeof(int32_t)));
    KVR_ASSIGN_OR_RETURN(f.lens, Alloc(be, lens.size() * sizeof(int32_t)));
    KVR_RETURN_IF_ERROR(be->CopyToBackend(f.table.get(), table.data(), table.size() * sizeof(int32_t), stream));
    KVR_RETURN_IF_ERROR(be->CopyToBackend(f.lens.get(), lens.data(), lens.size() * sizeof(int32_t), stream));
    KVR_ASSIGN_OR_RETURN(f.lists, Alloc(be, batch * hq * f.list_cap * sizeof(int32_t)));
    KVR_ASSIGN_OR_RETURN(f.list_lens, Alloc(be, batch * hq * sizeof(int32_t)));
    f.host_k = HostBuffer();
    f.host_v = HostBuffer();
    KVR_RETURN_IF_ERROR(be->Synchronize(stream));
  }
  if (f.host_k.bytes() < static_cast<size_t>(nl * batch * f.rows_cap) * row) {
    KVR_ASSIGN_OR_RETURN(f.host_k, AllocHost(be, nl * batch * f.rows_cap * row));
    KVR_ASSIGN_OR_RETURN(f.host_v, AllocHost(be, nl * batch * f.rows_cap * row));
  }
  std::vector<int32_t> lists(static_cast<size_t>(batch) * hq * f.list_cap, 0);
  std::vector<int32_t> list_lens(static_cast<size_t>(batch) * hq, 0);
  for (int32_t b = 0; b < batch; ++b) {
    for (int32_t h = 0; h < hq; ++h) {
      const auto& u = f.union_pos[b][h / group];
      const auto& sel = src.remote_sel[b][h];
      for (size_t i = 0; i < sel.size(); ++i) {
        lists[(static_cast<size_t>(b) * hq + h) * f.list_cap + i] =
            static_cast<int32_t>(std::lower_bound(u.begin(), u.end(), sel[i]) - u.begin());
      }
      list_lens[static_cast<size_t>(b) * hq + h] = static_cast<int32_t>(sel.size());
    }
  }
  KVR_RETURN_IF_ERROR(be->CopyToBackend(f.lists.get(), lists.data(), lists.size() * sizeof(int32_t), stream));
  KVR_RETURN_IF_ERROR(be->CopyToBackend(f.list_lens.get(), list_lens.data(), list_lens.size() * sizeof(int32_t), stream));
  KVR_RETURN_IF_ERROR(be->Synchronize(stream));  // the host vectors go out of scope
  {
    absl::MutexLock lock(&f.mu);
    f.arrived.assign(nl * batch, 0);
    f.finished.assign(batch, false);
    f.status = absl::OkStatus();
  }
  f.expected.assign(batch, 0);
  for (int32_t b = 0; b < batch; ++b) {
    for (const auto& u : f.union_pos[b]) f.expected[b] += static_cast<int64_t>(u.size());
  }
  ++stats.remote_calls;
  for (int32_t b = 0; b < batch; ++b) {
    f.threads.emplace_back([this, &f, b, row, nl] {
      // Row r of a layer's message stream is (kv head g, i-th position of its union).
      std::vector<int64_t> head_begin(hkv + 1, 0);
      for (int32_t g = 0; g < hkv; ++g) head_begin[g + 1] = head_begin[g] + f.union_pos[b][g].size();
      const size_t head_row = static_cast<size_t>(d) * kElem;
      absl::Status s = client->GatherKv(
          contexts[b], f.layer_begin, f.layer_end, f.union_pos[b],
          [&](const v1::GatherKvResponse& m) -> absl::Status {
            const int64_t li = m.layer() - f.layer_begin;
            const int64_t n = m.keys().shape_size() == 2 ? m.keys().shape(0) : -1;
            if (li < 0 || li >= nl || n < 0 ||
                m.keys().data().size() != static_cast<size_t>(n) * head_row ||
                m.values().data().size() != m.keys().data().size()) {
              return absl::InternalError("kvrecalld sent malformed GatherKv rows");
            }
            char* hk = f.host_k.get<char>() + (li * batch + b) * f.rows_cap * row;
            char* hv = f.host_v.get<char>() + (li * batch + b) * f.rows_cap * row;
            for (int64_t i = 0; i < n; ++i) {
              const int64_t r = m.first_row() + i;
              const int32_t g = static_cast<int32_t>(
                  std::upper_bound(head_begin.begin(), head_begin.end(), r) - head_begin.begin() - 1);
              const int64_t slot = r - head_begin[g];
              std::memcpy(hk + slot * row + g * head_row, m.keys().data().data() + i * head_row, head_row);
              std::memcpy(hv + slot * row + g * head_row, m.values().data().data() + i * head_row, head_row);
            }
            absl::MutexLock lock(&f.mu);
            f.arrived[li * batch + b] += n;
            f.cv.SignalAll();
            return absl::OkStatus();
          });
      absl::MutexLock lock(&f.mu);
      if (!s.ok() && f.status.ok()) f.status = s;
      f.finished[b] = true;
      f.cv.SignalAll();
    });
  }
  return absl::OkStatus();
}

// Attention of `layer` over its fetched rows of `source`'s selection.
absl::Status DecodeSession::Impl::AttendFetched(int32_t layer, int32_t source, const float* q,
                                                float* o_out, void* stream) {
  Fetch* f = fetches[source].get();
  if (f == nullptr || layer < f->layer_begin || layer >= f->layer_end) {
    return absl::InternalError(absl::StrCat("layer ", layer, ": no rows were fetched for it"));
  }
  const int64_t li = layer - f->layer_begin;
  const absl::Time start = absl::Now();
  {
    absl::MutexLock lock(&f->mu);
    for (;;) {
      if (!f->status.ok()) return f->status;
      bool ready = true;
      for (int32_t b = 0; b < batch; ++b) {
        const bool complete = f->arrived[li * batch + b] >= f->expected[b];
        if (!complete && f->finished[b]) {
          return absl::InternalError(absl::StrCat("GatherKv of sequence ", b, " ended before layer ",
                                                  layer, "'s rows arrived"));
        }
        ready = ready && complete;
      }
      if (ready) break;
      f->cv.Wait(&f->mu);
    }
  }
  stats.gather_wait_us += MicrosSince(start);
  const size_t row = static_cast<size_t>(hkv) * d * kElem;
  const size_t bytes = static_cast<size_t>(batch) * f->rows_cap * row;
  stats.bytes_received += static_cast<int64_t>(2 * bytes);
  KVR_RETURN_IF_ERROR(be->CopyToBackend(f->k.get(), f->host_k.get<char>() + li * bytes, bytes, stream));
  KVR_RETURN_IF_ERROR(be->CopyToBackend(f->v.get(), f->host_v.get<char>() + li * bytes, bytes, stream));
  gpu::SparseDecodeArgs s;
  s.kv.k = f->k.get();
  s.kv.v = f->v.get();
  s.kv.dtype = o.model.kv_dtype;
  s.kv.head_dim = d;
  s.kv.num_kv_heads = hkv;
  s.kv.page_size = 1;
  s.kv.num_pages = static_cast<int32_t>(batch * f->rows_cap);
  gpu::SetNhdStrides(&s.kv);
  s.kv.page_table = f->table.get<int32_t>();
  s.kv.max_pages_per_seq = static_cast<int32_t>(f->rows_cap);
  s.kv.seq_lens = f->lens.get<int32_t>();
  s.batch_size = batch;
  s.num_q_heads = hq;
  s.q = q;
  s.lists_per_kv_head = false;
  s.positions = f->lists.get<int32_t>();
  s.list_lens = f->list_lens.get<int32_t>();
  s.max_list_len = static_cast<int32_t>(f->list_cap);
  s.o = o_out;
  s.lse = o_out == states_o.get<float>() ? states_lse.get<float>()
                                         : states_lse.get<float>() + static_cast<int64_t>(batch) * hq;
  KVR_ASSIGN_OR_RETURN(void* ws, Workspace(be->SparseDecodeWorkspaceBytes(s)));
  KVR_RETURN_IF_ERROR(be->SparseDecodeAttention(s, ws, stream));
  // The host rows of this layer may be overwritten only after the copies:
  // the next fetch joins the threads and the stream orders the copies.
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::vector<std::vector<int64_t>>>> DecodeSession::Impl::Selection(
    int32_t layer, void* stream) {
  if (layer < 0 || layer >= L || !o.policy.Selects(layer)) {
    return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " does not select"));
  }
  if (o.mode == KvMode::kOffloaded) return layers[layer].remote_sel;
  const Layer& ly = layers[layer];
  std::vector<int32_t> lists(static_cast<size_t>(batch) * hq * ly.list_cap), lens(static_cast<size_t>(batch) * hq);
  KVR_RETURN_IF_ERROR(be->CopyToHost(lists.data(), ly.lists.get(), lists.size() * sizeof(int32_t), stream));
  KVR_RETURN_IF_ERROR(be->CopyToHost(lens.data(), ly.lens.get(), lens.size() * sizeof(int32_t), stream));
  KVR_RETURN_IF_ERROR(be->Synchronize(stream));
  std::vector<std::vector<std::vector<int64_t>>> out(batch, std::vector<std::vector<int64_t>>(hq));
  for (int32_t b = 0; b < batch; ++b) {
    const int64_t t = host_lens[b];
    const int64_t local =
        std::min<int64_t>(sinks, t) + std::max<int64_t>(0, t - std::max<int64_t>(sinks, t - window));
    for (int32_t h = 0; h < hq; ++h) {
      const size_t i = static_cast<size_t>(b) * hq + h;
      for (int64_t j = local; j < lens[i]; ++j) out[b][h].push_back(lists[i * ly.list_cap + j]);
    }
  }
  return out;
}

}  // namespace kvrecall::worker
