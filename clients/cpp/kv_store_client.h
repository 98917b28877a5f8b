#pragma once

// KvStoreClient: the C++ client of kvrecalld that inference engines link
// (target kvrecall::client). Every call has a deadline
// (ClientOptions::deadline_ms) and is retried with exponential backoff and
// jitter while the daemon is UNAVAILABLE; payloads are streamed in chunks.
//
//   KVR_ASSIGN_OR_RETURN(auto client, KvStoreClient::Create(options));
//   KVR_RETURN_IF_ERROR(client->RegisterModel(geometry).status());
//   auto spans = SequenceToSpans(geometry, "", token_ids, kv_bytes, false);
//   KVR_ASSIGN_OR_RETURN(LookupResult hit, client->Lookup(model_id, hashes));
//   // prefill only tokens after hit.prefix_tokens; then offload:
//   KVR_RETURN_IF_ERROR(client->PutSpans(model_id, ToPut(*spans), {}).status());
//   client->GetSpansStreaming(model_id, hashes, {layer, layer + 1}, on_span);
//
// Errors are absl::Status with the daemon's code and message (docs/errors.md).
// Thread-safe: one client may serve many threads.

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "clients/cpp/client_options.h"
#include "clients/cpp/rpc_policy.h"
#include "common/progress.h"
#include "common/types.h"
#include "kvrecall/v1/admin.grpc.pb.h"
#include "kvrecall/v1/kv_store.grpc.pb.h"

namespace kvrecall::client {

// One span to store; the payload is borrowed for the duration of the call.
struct SpanToPut {
  Hash128 hash;
  Hash128 parent;
  int32_t num_tokens = 0;
  absl::Span<const uint32_t> token_ids;  // optional: [num_tokens] or empty
  absl::string_view payload;             // span layout (span_keys.h)
  bool durable = false;                  // synced to a persistent tier before the ack
};

struct PutOptions {
  std::string salt;  // the chain's salt (docs/hashing.md); empty by default
  // Called after each chunk with bytes sent so far; return false to cancel
  // (the call then fails with CANCELLED; completed spans stay stored).
  ProgressCallback progress;
};

struct PutResult {
  Hash128 hash;
  bool already_present = false;
  v1::Tier durable_tier = v1::TIER_UNSPECIFIED;
};

// [begin, end) of layers; {0, 0} means every layer.
struct LayerRange {
  int32_t begin = 0;
  int32_t end = 0;
};

struct FetchedSpan {
  int32_t index = 0;  // position in the request
  Hash128 hash;
  bool found = false;
  v1::MissReason miss_reason = v1::MISS_REASON_UNSPECIFIED;  // why not found
  v1::Tier tier = v1::TIER_UNSPECIFIED;
  Hash128 parent;
  int32_t num_tokens = 0;
  std::vector<uint32_t> token_ids;
  v1::DType dtype = v1::DTYPE_UNSPECIFIED;
  std::vector<int64_t> shape;  // [layers, 2, kv_heads, num_tokens, head_dim]
  LayerRange layers;
  std::string payload;  // only the requested layers
};

struct GetOptions {
  // Called as payload bytes arrive (done = bytes so far, total = 0); return
  // false to cancel.
  ProgressCallback progress;
};

struct SpanMissInfo {
  int32_t index = 0;
  Hash128 hash;
  v1::MissReason reason = v1::MISS_REASON_UNSPECIFIED;
};

struct LookupResult {
  int32_t prefix_spans = 0;
  int64_t prefix_tokens = 0;
  std::vector<SpanMissInfo> missing;  // every span after the prefix, with why
  std::vector<Hash128> hashes;        // LookupTokens only: the server's chain
};

// "never_stored", "evicted", ... for messages.
absl::string_view MissReasonName(v1::MissReason reason);

// A connection to kvrecalld (one gRPC channel). Thread-safe.
class KvStoreClient {
 public:
  // Dials options.target (or uses options.channel). Does not wait for the
  // daemon: the first call does, within its deadline. INVALID_ARGUMENT for
  // bad options.
  static absl::StatusOr<std::unique_ptr<KvStoreClient>> Create(const ClientOptions& options);

  const ClientOptions& options() const { return options_; }

  // --- models ---
  absl::StatusOr<v1::RegisterModelResponse> RegisterModel(const v1::ModelGeometry& model);
  absl::StatusOr<std::vector<v1::ModelGeometry>> ListModels();
  // The geometry of one registered model; NOT_FOUND when unknown.
  absl::StatusOr<v1::ModelGeometry> GetModel(absl::string_view model_id);

  // --- spans ---
  // Streams `spans` (in chain order) in one PutSpans call, each payload in
  // chunks of options().chunk_bytes, checksummed here. Returns one result
  // per span. On UNAVAILABLE the whole stream is retried (idempotent).
  absl::StatusOr<std::vector<PutResult>> PutSpans(absl::string_view model_id,
                                                  absl::Span<const SpanToPut> spans,
                                                  const PutOptions& options = {});
  // Fetches spans (misses included, with their reasons) in request order.
  absl::StatusOr<std::vector<FetchedSpan>> GetSpans(absl::string_view model_id,
                                                    absl::Span<const Hash128> hashes,
                                                    LayerRange layers = {},
                                                    const GetOptions& options = {});
  // As GetSpans, handing each span to `on_span` as soon as it is complete
  // (a worker can start on layer l while later spans arrive). An error
  // returned by on_span cancels the call and is returned. Retried on
  // UNAVAILABLE only before the first span was delivered.
  absl::Status GetSpansStreaming(absl::string_view model_id, absl::Span<const Hash128> hashes,
                                 LayerRange layers,
                                 const std::function<absl::Status(FetchedSpan&&)>& on_span,
                                 const GetOptions& options = {});
  // The longest stored prefix of a chain and why the rest is missing.
  absl::StatusOr<LookupResult> Lookup(absl::string_view model_id,
                                      absl::Span<const Hash128> hashes);
  // The same, letting the server hash `token_ids` (returns its chain too).
  absl::StatusOr<LookupResult> LookupTokens(absl::string_view model_id,
                                            absl::Span<const uint32_t> token_ids,
                                            absl::string_view salt = "",
                                            bool include_partial_tail = false);
  // Per-span outcomes (OK, NOT_FOUND, ...), in request order.
  absl::StatusOr<std::vector<absl::Status>> DeleteSpans(absl::Span<const Hash128> hashes);
  // ttl = InfiniteDuration(): until unpinned.
  absl::StatusOr<std::vector<absl::Status>> PinSpans(absl::Span<const Hash128> hashes,
                                                     absl::Duration ttl);
  absl::StatusOr<std::vector<absl::Status>> UnpinSpans(absl::Span<const Hash128> hashes);

  // --- admin ---
  absl::StatusOr<v1::StatsResponse> Stats();
  absl::StatusOr<v1::GetConfigResponse> GetConfig();
  // FAILED_PRECONDITION when the daemon serves another API package or span
  // hash contract than this client implements (the hashes would never match).
  absl::Status CheckCompatibility();

 private:
  explicit KvStoreClient(const ClientOptions& options);

  // A fresh context with the deadline, metadata and retry budget applied.
  std::unique_ptr<grpc::ClientContext> NewContext(absl::Time deadline) const;
  // Runs `attempt` until it returns something other than UNAVAILABLE, the
  // attempts are used up or the deadline would pass while backing off.
  absl::Status Retry(absl::Time deadline,
                     const std::function<absl::Status(grpc::ClientContext*)>& attempt);

  const ClientOptions options_;
  RpcPolicy policy_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvStore::Stub> kv_;
  std::unique_ptr<v1::Admin::Stub> admin_;
};

}  // namespace kvrecall::client
