#pragma once

// DecodeSession: the attention of one decode step, layer by layer, for a
// batch of sequences decoded in lockstep (batch_size 1 for one sequence),
// with a layer policy (gpu/worker/policy.h) deciding per layer:
//
//   FULL       attention over every position; with a budget it also keeps
//              its exact top-k for later REUSE layers (TidalDecode's
//              selection layer);
//   SELECT     attention over sinks ∪ window ∪ the layer's own top-k:
//              local (GPU-resident keys): scored on the GPU by exact logits,
//              Loki's low-rank projection or Quest's page bounds;
//              remote (offloaded keys): one Attend on the sequence's
//              BatchAttend stream to kvrecalld, merged with the GPU's
//              partial over sinks ∪ window;
//   REUSE(src) attention over sinks ∪ window ∪ layer src's selection.
//
// Two modes:
//   kGpuResident: every position's K/V lives in the session's paged pools
//     (the kernels' layout). Every per-step value (sequence lengths, lists)
//     lives in backend memory, so with graph_safe set a whole step can be
//     captured in one CUDA graph and replayed.
//   kOffloaded: the prompt prefix lives in kvrecalld as stored spans (one
//     context per sequence); the GPU keeps only the sinks, the prompt's last
//     `window` positions and the decoded tokens. Decoded tokens are appended
//     to the context (AppendTokens, in chunks) before they leave the window,
//     so the remote candidates are always exactly [sinks, T - window): the
//     two modes attend to the same sets and agree to the merge's rounding.
//     REUSE layers either send Attend by positions (the default) or fetch the
//     K/V rows of the source's selection once (GatherKv, for every layer
//     reusing it) and attend on the GPU (ReuseTransfer::kFetchRows).
//
// Usage (one sequence, GPU-resident):
//   KVR_ASSIGN_OR_RETURN(auto backend, CreateBackend("cuda"));
//   KVR_ASSIGN_OR_RETURN(auto s, DecodeSession::Create(options, std::move(backend)));
//   KVR_RETURN_IF_ERROR(s->StartPrefix({prompt_tokens}));
//   for (layer...) KVR_RETURN_IF_ERROR(s->LoadPrefixLayer(layer, k, v, strides, stream));
//   for each decode step, for layer = 0..L-1 in order:
//     KVR_RETURN_IF_ERROR(s->AttendLayer(layer, q, k_new, v_new, out, stream));
//
// Tensors passed in and out are backend memory (device pointers with CUDA).
// Not thread-safe: one thread drives a session.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "clients/cpp/client_options.h"
#include "common/progress.h"
#include "common/types.h"
#include "gpu/kernels/kernel_args.h"
#include "gpu/worker/backend.h"
#include "gpu/worker/policy.h"

namespace kvrecall::worker {

struct ModelShape {
  int32_t num_layers = 0;
  int32_t num_q_heads = 0;   // a multiple of num_kv_heads, group size <= 8
  int32_t num_kv_heads = 0;
  int32_t head_dim = 128;    // 64 or 128
  gpu::DType kv_dtype = gpu::DType::kBf16;  // kBf16 or kF16
};

enum class KvMode : uint8_t { kGpuResident = 0, kOffloaded = 1 };

// How an offloaded REUSE layer reaches the positions its source selected.
enum class ReuseTransfer : uint8_t {
  kAttendByPositions = 0,  // one Attend by positions per layer (kvrecalld computes the partial)
  kFetchRows = 1,          // one GatherKv per source for all its reusers, attention on the GPU
};

struct SessionOptions {
  ModelShape model;
  LayerPolicy policy;
  KvMode mode = KvMode::kGpuResident;
  int32_t batch_size = 1;        // sequences decoded in lockstep, 1..256
  int64_t capacity_tokens = 0;   // positions per sequence (prompt + decoded), >= 1
  int32_t page_size = 16;        // tokens per KV page, 1..256
  // Loki bases of the layers whose role is SELECT(local, loki), by layer
  // (other entries empty): [num_kv_heads, head_dim, head_dim] f32, row i of
  // a head's matrix the i-th principal axis (the loki_basis artifact's
  // components).
  std::vector<std::vector<float>> loki_components;
  // Size every kernel for capacity_tokens instead of the current length, so
  // that a captured step stays exact when replayed at later steps (the
  // budget k stays the one resolved at capture). Slower. Default false.
  bool graph_safe = false;
  // Benchmarks only: the layers share this many KV pools round-robin (0: one
  // pool per layer). Outputs are then those of a model whose layers alias
  // their caches; it keeps 32-layer benchmarks of long contexts within GPU
  // memory. Default 0.
  int32_t kv_pool_count = 0;

  // --- offloaded mode ---
  client::ClientOptions client;  // how to reach kvrecalld
  std::string model_id;          // the model the spans are stored under
  ReuseTransfer reuse_transfer = ReuseTransfer::kAttendByPositions;
  // Decoded tokens per AppendTokens call; 0: max(1, window / 2). At most the
  // policy's window (so no token leaves the window before it is sent).
  int32_t append_chunk = 0;
};

// Where the time of the steps so far went (host wall clock; kernels run
// asynchronously and are in none of these unless the host waited for them).
struct SessionStats {
  int64_t steps = 0;
  int64_t remote_calls = 0;       // Attend requests and GatherKv calls
  int64_t rpc_wait_us = 0;        // waiting for Attend responses
  int64_t server_us = 0;          // of which the server reported working (search + attention)
  int64_t server_search_us = 0;
  int64_t server_attend_us = 0;
  int64_t query_download_us = 0;  // device-to-host copies of queries (includes waiting for the layer's inputs)
  int64_t state_upload_us = 0;    // host-to-device copies of remote states
  int64_t append_us = 0;          // AppendTokens of decoded tokens
  int64_t gather_wait_us = 0;     // waiting for GatherKv rows
  int64_t bytes_sent = 0;         // request payloads (queries, positions, K/V appended)
  int64_t bytes_received = 0;     // response payloads (states, positions, rows)
};

class DecodeSession {
 public:
  // Validates the options (policy against the model and the mode: local
  // SELECT needs kGpuResident, remote SELECT kOffloaded; Loki bases for local
  // loki layers) and allocates every buffer up front. INVALID_ARGUMENT
  // naming the problem; RESOURCE_EXHAUSTED when backend memory runs out.
  static absl::StatusOr<std::unique_ptr<DecodeSession>> Create(const SessionOptions& options,
                                                               std::unique_ptr<Backend> backend);
  ~DecodeSession();

  const SessionOptions& options() const { return options_; }
  Backend* backend() const { return backend_.get(); }

  // Starts the sequences with prompts of prefix_tokens[b] positions
  // (batch_size entries, each in [1, capacity)). Offloaded mode also needs
  // each sequence's stored prefix (the span hashes of its prompt, whose
  // tokens must add up to prefix_tokens[b]): the contexts are opened and the
  // indexes the policy's remote layers use are built where missing
  // (progress reported through `progress`).
  absl::Status StartPrefix(const std::vector<int64_t>& prefix_tokens,
                           const std::vector<std::vector<Hash128>>& chains = {},
                           const ProgressCallback& progress = {});

  // Loads the prompt's K and V of one layer (backend memory, kv dtype):
  // element (b, kv_head, t, d) at k[b * batch_stride + kv_head * head_stride
  // + t * token_stride + d], t < num_tokens (rows at or past a sequence's
  // prefix_tokens are ignored). Offloaded mode keeps only the resident
  // positions. Call once per layer after StartPrefix.
  absl::Status LoadPrefixLayer(int32_t layer, const void* k, const void* v, int64_t num_tokens,
                               int64_t batch_stride, int64_t head_stride, int64_t token_stride,
                               void* stream);

  // One layer of a decode step: appends the step's new token (k_new, v_new:
  // [batch, num_kv_heads, head_dim], kv dtype) to the layer's cache, then
  // writes the attention of q ([batch, num_q_heads, head_dim] f32, post-RoPE)
  // to out ([batch, num_q_heads, head_dim] f32). Layers are called in order
  // 0..L-1 every step; layer 0 starts a new step.
  absl::Status AttendLayer(int32_t layer, const float* q, const void* k_new, const void* v_new,
                           float* out, void* stream);

  // Positions per sequence now (host view; not advanced by graph replays).
  const std::vector<int64_t>& seq_lens() const { return host_lens_; }
  // The selection layer `layer` made at the last step, per (sequence, query
  // head), in no particular order (sinks and window not included). Copies from
  // backend memory (synchronizes `stream`). FAILED_PRECONDITION when the
  // layer does not select.
  absl::StatusOr<std::vector<std::vector<std::vector<int64_t>>>> Selection(int32_t layer,
                                                                           void* stream);
  const SessionStats& stats() const { return stats_; }
  void ResetStats() { stats_ = SessionStats(); }

  struct Impl;

 private:
  DecodeSession(const SessionOptions& options, std::unique_ptr<Backend> backend);

  SessionOptions options_;
  std::unique_ptr<Backend> backend_;
  std::vector<int64_t> host_lens_;
  SessionStats stats_;
  std::unique_ptr<Impl> impl_;  // last: it refers to the members above
};

// The role table's checks against a session's model and mode (exposed for
// tests and the C ABI): ValidatePolicy plus the layer count, local kinds in
// GPU-resident mode only, remote kinds in offloaded mode only, Loki bases
// and Quest page sizes. INVALID_ARGUMENT naming the layer.
absl::Status ValidatePolicyForSession(const SessionOptions& options);

}  // namespace kvrecall::worker
