#pragma once

// Context: the keys and values of a prompt prefix (an ordered chain of stored
// spans) plus the tokens appended while decoding, layer by layer. A context
// is named by the hash of its last span, so the same prefix opened by any
// client on any node is the same context and reuses its indexes.
//
// The prefix's spans are held as StoredSpanPtr (zero-copy: attention reads
// K/V straight from the memory tier's buffers). Appended tokens live in
// blocks of block_tokens owned by the context; they are not persisted.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/types.h"
#include "service/retrieval/kv_view.h"
#include "service/store/span.h"

namespace kvrecall::retrieval {

// Tokens appended to a range of layers at once.
struct AppendBatch {
  int32_t layer_begin = 0;  // layers [layer_begin, layer_end)
  int32_t layer_end = 0;
  int32_t num_tokens = 0;   // tokens appended to each of those layers
  // [layers, num_kv_heads, num_tokens, head_dim] in the model's dtype.
  absl::string_view keys;
  absl::string_view values;
  // Optional: [layers, num_tokens, num_q_heads, head_dim] f32 queries of the
  // same tokens, kept as extra training queries for query-aware indexes.
  absl::Span<const float> queries;
  // Optional (-1: unset): the position the caller expects the first token
  // to take. Set, the append is checked against it (AppendOutcome).
  int64_t expected_position = -1;
};

// What Context::Append did with a batch that named its expected position.
enum class AppendOutcome : uint8_t {
  kAppended = 0,   // the tokens were added at the expected position
  kDuplicate = 1,  // a retry: the same tokens are already there; nothing changed
  kDiverged = 2,   // other tokens are already there: the caller forks the context
};

// Thread-safe. Readers take views (KvView) that stay valid while the
// context is alive; Append never moves data that a view can see.
class Context {
 public:
  // REQUIRES: spans form the chain (checked by the caller), all but the last
  // holding model.block_tokens tokens.
  // `max_query_bytes` bounds the training queries kept (0: no bound).
  // `id`: the context id; zero means the hash of the last span.
  Context(std::string tenant, store::ModelGeometry model, std::vector<store::StoredSpanPtr> spans,
          int64_t max_query_bytes = 0, Hash128 id = Hash128{});

  const std::string& tenant() const { return tenant_; }
  const store::ModelGeometry& model() const { return model_; }
  // The context id: the hash of the last span.
  const Hash128& id() const { return id_; }
  const std::vector<store::StoredSpanPtr>& spans() const { return spans_; }
  std::vector<Hash128> chain() const;
  int64_t prefix_tokens() const { return prefix_tokens_; }

  // Positions readable in `layer` now (prefix + appended to that layer).
  int64_t num_tokens(int32_t layer) const;

  // A snapshot view of one layer. REQUIRES: 0 <= layer < model().num_layers.
  LayerKvView KvView(int32_t layer) const;

  // Appends decode-time tokens. INVALID_ARGUMENT on a bad layer range or
  // tensor sizes; FAILED_PRECONDITION when the layers in the range hold
  // different token counts (append layer ranges in step). Returns the
  // first position appended.
  //
  // With batch.expected_position set, *outcome says what happened:
  // kAppended when it equals the next position; kDuplicate (returning the
  // expected position, changing nothing) when the same K/V already sit there
  // (a retried append); kDiverged (changing nothing) when other tokens do.
  // FAILED_PRECONDITION when it lies past the next position (a gap) or inside
  // the stored prefix.
  absl::StatusOr<int64_t> Append(const AppendBatch& batch, AppendOutcome* outcome = nullptr);

  // A new context `id` over the same stored spans holding this context's
  // first `appended` decode tokens of every layer (and their training
  // queries): the copy-on-write of a decode that diverges from this one.
  std::shared_ptr<Context> Fork(const Hash128& id, int64_t appended) const;

  // Decode tokens appended to `layer`.
  int64_t num_appended(int32_t layer) const;

  // Stores prefill queries of `layer` for positions [first, first + n):
  // [n, num_q_heads, head_dim] f32. They train query-aware indexes (roar).
  // RESOURCE_EXHAUSTED when the context would keep more than its
  // max_query_bytes of queries (--max_context_query_bytes).
  absl::Status AddQueries(int32_t layer, int64_t first_position, int64_t n,
                          absl::Span<const float> queries);

  // Training queries of `kv_head`'s group in `layer` for positions [0, n),
  // head-major: [group_size, m, head_dim] f32, each head's rows in position
  // order (the layout of a causal roar build). *complete is true when every
  // position in [0, n) has a stored query (then m = n); otherwise the rows
  // are the positions that have one. Where a position was stored twice, the
  // latest query wins.
  std::vector<float> TrainingQueries(int32_t layer, int32_t kv_head, int64_t n,
                                     bool* complete) const;

  // Gathers the keys of (layer, kv_head) for positions [begin, end) into rows
  // [end - begin, head_dim] of the model dtype (clipped to the positions the
  // layer holds): the input of an index build or of Add().
  std::string GatherKeys(int32_t layer, int32_t kv_head, int64_t begin, int64_t end) const;

  // Bytes held by appended tokens and training queries.
  int64_t OwnedBytes() const;

 private:
  struct AppendedBlock {
    std::unique_ptr<char[]> keys;    // [num_kv_heads, block_tokens, head_dim]
    std::unique_ptr<char[]> values;  // [num_kv_heads, block_tokens, head_dim]
  };
  struct LayerState {
    std::vector<std::unique_ptr<AppendedBlock>> blocks;
    int64_t appended = 0;
    std::vector<std::pair<int64_t, std::vector<float>>> queries;  // (first position, [n, Hq, d])
  };

  // Whether rows [first, first + n) of each layer of the batch hold exactly
  // the batch's K and V. REQUIRES: they exist in every layer of the batch.
  bool SameTokensLocked(const AppendBatch& batch, int64_t first) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string tenant_;
  const store::ModelGeometry model_;
  const std::vector<store::StoredSpanPtr> spans_;
  const Hash128 id_;
  int64_t prefix_tokens_ = 0;
  const int64_t max_query_bytes_;
  mutable absl::Mutex mu_;
  int64_t query_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // kept training queries, f32 bytes
  std::vector<LayerState> layers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvrecall::retrieval
