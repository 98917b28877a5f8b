#pragma once

// RetrievalService: the in-process retrieval API of kvrecalld, joining the
// span store and the key indexes. It answers, for a context and a layer,
// "which past tokens matter for these queries" (Search) and "what is the
// attention over them" (Attend: partial attention o + natural-log LSE, which
// a GPU worker merges with its own partial over the positions it holds).
// The gRPC Retrieval service (service/rpc) is a thin translation of this API;
// benchmarks call it directly for the in-process numbers.
//
// Contexts are named by the hash of their last span (docs/retrieval.md).
// Index builds are long-running operations with progress, persisted to the
// RocksDB catalog and reloaded lazily after a restart; they go with their
// context when its spans are evicted or deleted.
//
// Thread-safe.

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/metrics.h"
#include "common/types.h"
#include "index/key_index.h"
#include "service/retrieval/context.h"
#include "service/retrieval/partial_attention.h"
#include "service/store/tiered_store.h"

namespace kvrecall::retrieval {

struct RetrievalOptions {
  // Index-build operations running at once (each uses the default thread
  // pool inside). 1..64, default 1.
  int32_t concurrent_builds = 1;
  // An open context unused for this long is closed (its spans unpinned);
  // it reopens transparently on the next use. Default 10 minutes.
  absl::Duration context_idle_ttl = absl::Minutes(10);
  // Finished operations are forgotten after this long. Default 1 hour.
  absl::Duration operation_retention = absl::Hours(1);
  // Persist built indexes in the RocksDB catalog. Default true.
  bool persist_indexes = true;
  // Builds waiting to run, over all tenants; BuildIndex beyond it is
  // RESOURCE_EXHAUSTED (--max_queued_builds). Default 64.
  int32_t max_queued_builds = 64;
  // Training queries kept per context, bytes of f32; beyond it AddQueries
  // (and AppendTokens with queries) is RESOURCE_EXHAUSTED
  // (--max_context_query_bytes). 0: no bound. Default 256 MiB.
  int64_t max_context_query_bytes = int64_t{256} << 20;
  // Per-tenant quotas; 0: none. Open contexts (--tenant_contexts) and builds
  // queued or running (--tenant_builds).
  int32_t tenant_contexts = 0;
  int32_t tenant_builds = 0;
  // Where metrics go (may be null). Not owned.
  MetricsRegistry* metrics = nullptr;
};

// How the G query heads of a KV group share retrieved positions.
enum class GqaMode : uint8_t {
  kPerHead = 0,  // each query head gets its own top-k
  kUnion = 1,    // each query head gets the union of its group's top-k lists
};

// Which index (or none) answers a query.
struct IndexSelector {
  // "flat", "roar", "loki", "inverted", "quest", "faiss_hnsw", "faiss_ivf",
  // or "all" (no index: every non-excluded position, exact).
  std::string kind = "roar";
  // The build params of the index to use ("" = the most recently built one of that kind).
  std::string build_params;
  // The kind's effort knob (SearchEffortKnob()); 0 = the index default;
  // values above its maximum are clamped to the maximum (exact).
  int64_t effort = 0;
  // Other search knobs, "key=value,...".
  std::string knobs;
};

struct RetrieveRequest {
  std::string tenant;
  Hash128 context;
  int32_t layer = 0;
  absl::Span<const float> queries;  // [num_q_heads, head_dim] f32, post-RoPE
  // Tokens to retrieve per query head: k, or when k == 0, ceil(budget * tokens).
  int32_t k = 0;
  double budget = 0;
  IndexSelector index;
  std::vector<index::PositionRange> exclude;  // sorted, disjoint, within the context
  GqaMode gqa_mode = GqaMode::kPerHead;
  absl::Time deadline = absl::InfiniteFuture();
  // Attend only. Attend by positions: when not empty, the attention of each
  // query head is over exactly these positions and no index is searched (k,
  // budget and exclude must be 0 / empty). num_q_heads lists, or
  // num_kv_heads lists shared by each group; positions distinct within a
  // list and within the layer's tokens.
  std::vector<std::vector<int64_t>> positions;
  // Attend only, with index kind "all" and k == 0: also return the select_k
  // positions of the highest logits per query head (descending) in ids.
  int32_t select_k = 0;
};

struct RetrieveStats {
  int64_t keys_scanned = 0;   // over all query heads
  int64_t context_tokens = 0; // positions in the layer
  int64_t search_us = 0;
  int64_t attend_us = 0;      // 0 for Search
};

struct SearchReply {
  // Per query head: positions and their exact q·k (unscaled), descending.
  std::vector<std::vector<int64_t>> ids;
  std::vector<std::vector<float>> scores;
  RetrieveStats stats;
};

struct AttendReply {
  PartialAttentionResult state;  // out [num_q_heads, head_dim] f32, lse [num_q_heads] natural log
  // Per query head: the attended positions (index searches), the select_k
  // top positions (kind "all" with select_k), or empty (attend by positions,
  // or kind "all" without select_k).
  std::vector<std::vector<int64_t>> ids;
  RetrieveStats stats;
};

// The K/V rows of one layer at given positions (GatherKv).
struct GatherKvReply {
  // [rows, head_dim] each, the model's dtype: the rows of kv head 0's
  // positions in the given order, then kv head 1's, ...
  std::string keys;
  std::string values;
  int64_t rows = 0;
};

struct OpenContextReply {
  Hash128 context;
  int64_t num_tokens = 0;
  int32_t num_spans = 0;
  bool newly_opened = false;
};

enum class OperationState : uint8_t { kPending = 0, kRunning = 1, kDone = 2, kFailed = 3, kCancelled = 4 };

struct OperationInfo {
  std::string id;
  OperationState state = OperationState::kPending;
  std::string description;
  double fraction = 0;        // 0..1
  std::string stage;          // what runs now
  int64_t keys_indexed = 0;
  int64_t keys_total = 0;
  absl::Duration elapsed;
  absl::Duration eta = absl::InfiniteDuration();  // estimate of the time left
  absl::Status error;         // for kFailed / kCancelled
};

struct BuildIndexRequest {
  std::string tenant;
  Hash128 context;
  std::vector<int32_t> layers;    // empty = every layer
  std::vector<int32_t> kv_heads;  // empty = every KV head
  std::string kind;
  std::string params;             // build params "key=value,..."
};

struct IndexInfo {
  Hash128 context;
  int32_t layer = 0;
  int32_t kv_head = 0;
  std::string kind;
  std::string params;
  int64_t num_keys = 0;
  int64_t index_bytes = 0;
  bool loaded = false;            // in memory now (else persisted only)
};

struct ArtifactInfo {
  std::string model_id;
  std::string kind;
  int64_t version = 0;
  int64_t bytes = 0;
  std::string description;
  absl::Time created;
  bool shared = false;  // in the shared namespace (else the tenant's own)
};

class RetrievalService {
 public:
  // `store` must outlive the service.
  static absl::StatusOr<std::unique_ptr<RetrievalService>> Create(store::TieredStore* store,
                                                                  const RetrievalOptions& options);
  ~RetrievalService();

  // --- contexts ---
  // Opens the context of `chain` (hashes in order, from the first span).
  // NOT_FOUND naming every span of the chain that is not stored (with its
  // miss reason); INVALID_ARGUMENT for an empty chain or a partial span
  // before the last; DEADLINE_EXCEEDED when promoting the spans takes too long.
  absl::StatusOr<OpenContextReply> OpenContext(absl::string_view tenant, absl::string_view model_id,
                                               absl::Span<const Hash128> chain,
                                               absl::Time deadline);
  // Unpins and forgets the open context (its persisted indexes stay).
  absl::Status CloseContext(absl::string_view tenant, const Hash128& context);
  // The model of an open (or reopenable) context.
  absl::StatusOr<store::ModelGeometry> ContextModel(absl::string_view tenant,
                                                    const Hash128& context, absl::Time deadline);
  // Appends decode-time tokens and adds them to every loaded index of those
  // layers. Returns the first position appended.
  //
  // With batch.expected_position set (docs/retrieval.md, "Appending"): a
  // retry of an append that took effect returns its position and changes
  // nothing; an append at a position that holds other tokens (a second
  // decode diverging from a shared context) goes to a fork of the context,
  // a new context holding a copy of the appended tokens before that
  // position, whose id is returned in *appended_to (else the context
  // itself). The fork's id is derived from the context, the position and
  // the K/V, so the same divergence always lands in the same fork. A fork
  // lives in memory only and starts without indexes.
  //
  // A context closed for idleness with appended tokens (which are not
  // persisted) fails every later call with FAILED_PRECONDITION saying so,
  // until OpenContext opens it again: nothing continues on a silently
  // shortened context.
  absl::StatusOr<int64_t> AppendTokens(absl::string_view tenant, const Hash128& context,
                                       const AppendBatch& batch,
                                       Hash128* appended_to = nullptr);
  // Stores prefill queries of a layer ([n, num_q_heads, head_dim] f32 for
  // positions [first, first + n)) as training queries of query-aware builds.
  absl::Status AddQueries(absl::string_view tenant, const Hash128& context, int32_t layer,
                          int64_t first_position, int64_t n, absl::Span<const float> queries);

  // --- index builds (long-running operations) ---
  // Operations belong to the tenant that started them; their ids are 128
  // random bits ("op-<32 hex digits>"), so they cannot be guessed, and any
  // other tenant asking for one gets the NOT_FOUND of an unknown id.
  absl::StatusOr<std::string> BuildIndex(const BuildIndexRequest& request);
  absl::StatusOr<OperationInfo> GetOperation(absl::string_view tenant,
                                             absl::string_view id) const;
  // Waits until the operation ends or `deadline` passes (then returns its
  // current state, not an error).
  absl::StatusOr<OperationInfo> WaitOperation(absl::string_view tenant, absl::string_view id,
                                              absl::Time deadline) const;
  absl::Status CancelOperation(absl::string_view tenant, absl::string_view id);
  // The operations of `tenant`.
  std::vector<OperationInfo> ListOperations(absl::string_view tenant) const;
  // Indexes of a context (or of every context of the tenant when context is zero).
  absl::StatusOr<std::vector<IndexInfo>> ListIndexes(absl::string_view tenant,
                                                     const Hash128& context);
  // Deletes the indexes of (context, kind[, params]) from memory and the catalog.
  absl::Status DeleteIndex(absl::string_view tenant, const Hash128& context,
                           absl::string_view kind, absl::string_view params);

  // --- retrieval ---
  absl::StatusOr<SearchReply> Search(const RetrieveRequest& request);
  absl::StatusOr<AttendReply> Attend(const RetrieveRequest& request);
  // The K and V rows of `layer` at `kv_head_positions[g]` for every KV head g
  // (num_kv_heads lists). INVALID_ARGUMENT for a bad layer, a wrong number of
  // lists or a position outside the layer's tokens.
  absl::StatusOr<GatherKvReply> GatherKv(absl::string_view tenant, const Hash128& context,
                                         int32_t layer,
                                         const std::vector<std::vector<int64_t>>& kv_head_positions,
                                         absl::Time deadline);

  // --- per-model artifacts (Loki bases, sparse encoders, head roles, layer policies) ---
  // Artifacts live in a namespace: the tenant's own (shared = false), or the
  // shared namespace (shared = true) that every tenant reads and only admins
  // write (the caller checks the role). A build uses the tenant's latest
  // version of the kind it needs, else the shared one.
  //
  // Stores a new version (1, 2, ...) of (model, kind) in the namespace.
  // NOT_FOUND for an unknown model.
  absl::StatusOr<int64_t> PutArtifact(absl::string_view tenant, bool shared,
                                      absl::string_view model_id, absl::string_view kind,
                                      absl::string_view bytes, absl::string_view description);
  // version 0 = the latest. NOT_FOUND when absent from the namespace.
  absl::StatusOr<std::pair<ArtifactInfo, std::string>> GetArtifact(absl::string_view tenant,
                                                                    bool shared,
                                                                    absl::string_view model_id,
                                                                    absl::string_view kind,
                                                                    int64_t version) const;
  // The tenant's artifacts of the model, then the shared ones.
  absl::StatusOr<std::vector<ArtifactInfo>> ListArtifacts(absl::string_view tenant,
                                                          absl::string_view model_id) const;

 private:
  struct LoadedIndex;
  struct OpenContextEntry;
  struct Operation;

  RetrievalService(store::TieredStore* store, const RetrievalOptions& options);

  absl::StatusOr<std::shared_ptr<Context>> GetContext(absl::string_view tenant,
                                                      const Hash128& context, absl::Time deadline);
  absl::StatusOr<std::shared_ptr<Context>> ReopenContext(absl::string_view tenant,
                                                         const Hash128& context,
                                                         absl::Time deadline);
  absl::StatusOr<std::shared_ptr<LoadedIndex>> FindIndex(const Context& ctx, int32_t layer,
                                                         int32_t kv_head,
                                                         const IndexSelector& sel);
  // What Search and Attend check first: the deadline, the context (reopened
  // if needed), the layer, then the request (ValidateRetrieve); gives k.
  struct Prepared {
    std::shared_ptr<Context> ctx;
    int64_t tokens = 0;
    int32_t k = 0;
  };
  absl::StatusOr<Prepared> Prepare(const RetrieveRequest& request, absl::string_view what);
  absl::StatusOr<AttendReply> AttendPositions(const RetrieveRequest& request);
  absl::StatusOr<SearchReply> SearchInternal(const RetrieveRequest& request, const Context& ctx,
                                             int64_t tokens, int32_t k, bool need_scores);
  static void UnionPerGroup(const RetrieveRequest& request, const LayerKvView& view,
                            SearchReply* reply);
  // One build operation: checks, then per (layer, KV head) BuildLayerHead
  // and InstallIndex, with progress and cancellation; ends in FinishOperation.
  void RunOperation(std::shared_ptr<Operation> op, BuildIndexRequest request);
  // The model's calibration artifact when the request's kind uses one
  // ("loki_basis", "sparse_encoder"): (name, bytes of its latest version, the
  // tenant's own else the shared one; empty when there is none); ("", "")
  // for the other kinds. The build params layer= and kv_head= pick its entry.
  absl::StatusOr<std::pair<std::string, std::string>> CalibrationArtifact(
      const BuildIndexRequest& request, const std::string& model_id) ABSL_LOCKS_EXCLUDED(mu_);
  // How far an operation is: items are (layer, KV head) pairs. Written by
  // RunOperation, read by the build's progress callback, both under mu_.
  struct BuildProgress {
    int64_t items = 0;
    int64_t done_items = 0;
    int64_t done_keys = 0;
  };
  // Builds the index of (layer, kv_head) of `request` over the context's keys
  // and training queries; reports progress into `op` and stops when it is
  // cancelled.
  absl::StatusOr<std::unique_ptr<index::KeyIndex>> BuildLayerHead(
      Operation& op, const BuildIndexRequest& request, const Context& ctx,
      const index::ParamMap& params, const std::string& artifact_name,
      const std::string& artifact_bytes, int32_t layer, int32_t kv_head,
      const BuildProgress& progress) ABSL_LOCKS_EXCLUDED(mu_);
  // Puts `built` into `li`, adds the keys appended during the build, persists
  // it when options_.persist_indexes, and serves it (indexes_).
  absl::Status InstallIndex(const BuildIndexRequest& request, const Context& ctx,
                            std::unique_ptr<index::KeyIndex> built,
                            std::shared_ptr<LoadedIndex> li) ABSL_LOCKS_EXCLUDED(mu_);
  void FinishOperation(Operation& op, OperationState state, absl::Status error)
      ABSL_LOCKS_EXCLUDED(mu_);
  void CloseIdleContexts() ABSL_LOCKS_EXCLUDED(mu_);
  void BuilderLoop();

  store::TieredStore* const store_;
  const RetrievalOptions options_;

  mutable absl::Mutex mu_;
  // Open contexts by (tenant, id).
  std::map<std::pair<std::string, Hash128>, std::shared_ptr<OpenContextEntry>> contexts_
      ABSL_GUARDED_BY(mu_);
  // Loaded indexes by "tenant|context|layer|kv_head|kind|params".
  std::map<std::string, std::shared_ptr<LoadedIndex>> indexes_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<Operation>> operations_ ABSL_GUARDED_BY(mu_);
  // Contexts closed for idleness while holding appended tokens: (tenant, id)
  // -> (tokens lost, when). Calls on them fail until OpenContext.
  std::map<std::pair<std::string, Hash128>, std::pair<int64_t, absl::Time>> dropped_tails_
      ABSL_GUARDED_BY(mu_);
  std::deque<std::pair<std::shared_ptr<Operation>, BuildIndexRequest>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> builders_;
};

absl::string_view OperationStateName(OperationState state);

}  // namespace kvrecall::retrieval
