#pragma once

// RetrievalClient: the C++ client of kvrecall.v1.Retrieval (target
// kvrecall::client). Contexts, index builds with progress, Search, Attend
// and a BatchAttend stream per sequence, artifacts. Deadlines and retries
// of UNAVAILABLE as KvStoreClient (ClientOptions).
//
//   KVR_ASSIGN_OR_RETURN(auto rc, RetrievalClient::Create(options));
//   KVR_ASSIGN_OR_RETURN(auto ctx, rc->OpenContext(model_id, chain));
//   KVR_ASSIGN_OR_RETURN(auto op, rc->BuildIndex(ctx.context, "roar"));
//   KVR_ASSIGN_OR_RETURN(op, rc->WaitOperation(op.id(), absl::Minutes(10), progress));
//   AttendOptions a; a.k = 100; a.exclude = {{0, 4}, {n - 512, n}};
//   KVR_ASSIGN_OR_RETURN(AttendResult r, rc->Attend(ctx.context, layer, q, num_q_heads, a));
//   // merge (r.out, r.lse) with the local partial over the excluded ranges
//
// Thread-safe, except AttendStream (one per sequence, one thread at a time).

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "clients/cpp/client_options.h"
#include "clients/cpp/rpc_policy.h"
#include "common/progress.h"
#include "common/types.h"
#include "kvrecall/v1/retrieval.grpc.pb.h"

namespace kvrecall::client {

// The retrieval knobs of Search and Attend.
struct RetrieveOptions {
  int32_t k = 0;            // positions per query head; 0: use budget
  double budget = 0;        // fraction of the context when k == 0
  std::string kind = "roar";  // or flat, loki, inverted, quest, faiss_hnsw, faiss_ivf, all
  std::string build_params; // which built variant ("" = the latest)
  int64_t effort = 0;       // the kind's effort knob; 0 = default
  std::string knobs;        // other search knobs "key=value,..."
  std::vector<std::pair<int64_t, int64_t>> exclude;  // [begin, end) ranges, sorted, disjoint
  bool union_per_group = false;  // GQA: the union of the group's lists for every head
  bool omit_positions = false;   // Attend: do not return the positions
  // Attend by positions: num_q_heads lists (or num_kv_heads lists shared by
  // each group); when not empty, no index is searched (k, budget, kind,
  // exclude are not sent).
  std::vector<std::vector<int64_t>> positions;
  // Attend with kind "all" and k == 0: also return the select_k positions of
  // the highest logits per query head.
  int32_t select_k = 0;
};

struct AttendResult {
  std::vector<float> out;  // [num_q_heads, head_dim] f32
  std::vector<float> lse;  // [num_q_heads] natural log
  std::vector<std::vector<int64_t>> positions;  // per query head (unless omitted)
  v1::RetrievalStats stats;
};

// Converts an AttendResponse (e.g. from AttendStream).
absl::StatusOr<AttendResult> ToAttendResult(const v1::AttendResponse& response);

// Builds an AttendRequest of f32 queries [num_q_heads, head_dim].
v1::AttendRequest MakeAttendRequest(const Hash128& context, int32_t layer,
                                    absl::Span<const float> queries, int32_t num_q_heads,
                                    const RetrieveOptions& options);

// A BatchAttend stream: one per sequence for a whole decode loop. Send one
// request per layer, Receive its response (in order). Over TCP several
// requests may be in flight; over an in-process channel (whose writes wait
// for the peer's read) alternate Send and Receive. Not thread-safe.
class AttendStream {
 public:
  ~AttendStream();
  // False when the stream is broken (Finish() says why).
  bool Send(const v1::AttendRequest& request);
  // The next response; an error for a failed request is in the response's
  // error_code (the stream goes on). NOT_FOUND-free: UNAVAILABLE/... when broken.
  absl::StatusOr<v1::AttendResponse> Receive();
  // Half-closes and returns the stream's final status.
  absl::Status Finish();

 private:
  friend class RetrievalClient;
  AttendStream() = default;
  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::AttendRequest, v1::AttendResponse>> stream_;
  bool finished_ = false;
};

class RetrievalClient {
 public:
  static absl::StatusOr<std::unique_ptr<RetrievalClient>> Create(const ClientOptions& options);

  // --- contexts ---
  absl::StatusOr<v1::OpenContextResponse> OpenContext(absl::string_view model_id,
                                                      absl::Span<const Hash128> chain);
  absl::Status CloseContext(const Hash128& context);
  // keys/values: [layers, num_kv_heads, num_tokens, head_dim] in the model's
  // dtype; queries optional ([layers, num_tokens, num_q_heads, head_dim]).
  absl::StatusOr<int64_t> AppendTokens(const v1::AppendTokensRequest& request);
  // Prefill queries [n, num_q_heads, head_dim] f32 of positions
  // [first_position, first_position + n), sent in messages under the
  // message size limit.
  absl::StatusOr<int64_t> AddQueries(const Hash128& context, int32_t layer, int64_t first_position,
                                     int32_t num_q_heads, int32_t head_dim,
                                     absl::Span<const float> queries);

  // --- index builds ---
  absl::StatusOr<v1::Operation> BuildIndex(const Hash128& context, absl::string_view kind,
                                           absl::string_view params = "",
                                           absl::Span<const int32_t> layers = {},
                                           absl::Span<const int32_t> kv_heads = {});
  absl::StatusOr<v1::Operation> GetOperation(absl::string_view id);
  // Waits up to `timeout` for the operation to end, calling `progress` (may be
  // empty) about once a second; returns its last state. A progress callback
  // returning false cancels the operation.
  absl::StatusOr<v1::Operation> WaitOperation(absl::string_view id, absl::Duration timeout,
                                              const ProgressCallback& progress = {});
  absl::StatusOr<v1::Operation> CancelOperation(absl::string_view id);
  absl::StatusOr<std::vector<v1::IndexInfo>> ListIndexes(const Hash128& context);
  absl::Status DeleteIndex(const Hash128& context, absl::string_view kind,
                           absl::string_view params = "");

  // --- retrieval ---
  absl::StatusOr<v1::SearchResponse> Search(const Hash128& context, int32_t layer,
                                            absl::Span<const float> queries, int32_t num_q_heads,
                                            const RetrieveOptions& options);
  absl::StatusOr<AttendResult> Attend(const Hash128& context, int32_t layer,
                                      absl::Span<const float> queries, int32_t num_q_heads,
                                      const RetrieveOptions& options);
  // The K/V rows of `kv_head_positions[g]` (one list per KV head) in layers
  // [layer_begin, layer_end) (0, 0: every layer), delivered message by message
  // to `on_rows` in layer order (GatherKvResponse: layer, first_row, keys and
  // values [rows, head_dim] in the model's dtype). A non-OK status from
  // `on_rows` cancels the call and is returned.
  absl::Status GatherKv(const Hash128& context, int32_t layer_begin, int32_t layer_end,
                        const std::vector<std::vector<int64_t>>& kv_head_positions,
                        const std::function<absl::Status(const v1::GatherKvResponse&)>& on_rows);
  // Opens a BatchAttend stream whose deadline is `lifetime` from now.
  absl::StatusOr<std::unique_ptr<AttendStream>> OpenAttendStream(absl::Duration lifetime);

  // --- artifacts ---
  absl::StatusOr<v1::ArtifactInfo> PutArtifact(absl::string_view model_id, absl::string_view kind,
                                               absl::string_view bytes,
                                               absl::string_view description = "");
  // version 0 = the latest.
  absl::StatusOr<std::pair<v1::ArtifactInfo, std::string>> GetArtifact(absl::string_view model_id,
                                                                        absl::string_view kind,
                                                                        int64_t version = 0);
  absl::StatusOr<std::vector<v1::ArtifactInfo>> ListArtifacts(absl::string_view model_id);

 private:
  explicit RetrievalClient(const ClientOptions& options);

  RpcPolicy policy_;
  int64_t max_message_bytes_ = 0;
  std::unique_ptr<v1::Retrieval::Stub> stub_;
};

}  // namespace kvrecall::client
