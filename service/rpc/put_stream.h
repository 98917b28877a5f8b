#pragma once

// PutStream: the server side of one PutSpans stream, independent of the gRPC
// call that carries it. It parses raw PutSpansRequest messages (field by
// field, so that a payload chunk is copied once, straight from the message's
// slices into the span being assembled), validates each span header before
// its payload arrives, and stores each span once its whole payload is there
// (the store verifies the checksum: a span becomes visible only complete).

#include <cstdint>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "kvrecall/v1/kv_store.pb.h"
#include "service/rpc/inflight_limiter.h"
#include "service/store/tiered_store.h"
#include <grpcpp/support/byte_buffer.h>

namespace kvrecall::rpc {

// Not thread-safe (one per stream; the reactor hands it between threads).
class PutStream {
 public:
  // `store` (and `limiter`, when given) are not owned and must outlive the
  // stream. With `require_token_ids`, a span header without token ids is
  // INVALID_ARGUMENT: the server can then check every span hash against its
  // tokens, so no client can store K/V under the hash of tokens it did not
  // send (--require_token_ids). A span's payload buffer is held against
  // `limiter` from its header until it is stored.
  PutStream(store::TieredStore* store, std::string tenant, int64_t max_span_bytes,
            bool require_token_ids = true, InflightLimiter* limiter = nullptr);

  // Consumes one serialized PutSpansRequest. Sets *complete when it finished
  // a span: StoreComplete() must then be called before the next message.
  // Errors name the span (index in the stream) and change nothing.
  absl::Status Consume(const grpc::ByteBuffer& message, bool* complete);
  // The same for a message already in one buffer (tests).
  absl::Status ConsumeBytes(absl::string_view message, bool* complete);

  // Stores the span Consume() completed. May block (durable writes sync).
  absl::Status StoreComplete();

  // The client half-closed the stream: INVALID_ARGUMENT for an empty stream
  // or one that ended inside a span.
  absl::Status End() const;
  // The status of a stream that was cancelled (the writer went away).
  absl::Status Cancelled() const;

  // One result per stored span, and the payload bytes received.
  const v1::PutSpansResponse& response() const { return response_; }

 private:
  // A field of the message being parsed: where it lies in the slices.
  struct Field {
    size_t offset = 0;
    size_t size = 0;
    bool present = false;
  };
  absl::Status Parse(const std::vector<absl::string_view>& pieces);
  absl::Status StartSpan(const v1::PutSpanHeader& header);
  absl::Status AppendPayload(const std::vector<absl::string_view>& pieces, const Field& chunk);
  absl::Status Fail(int index, const absl::Status& status) const;

  store::TieredStore* const store_;
  const std::string tenant_;
  const int64_t max_span_bytes_;
  const bool require_token_ids_;
  InflightLimiter* const limiter_;
  InflightBytes held_;         // the current span's payload buffer
  absl::flat_hash_map<std::string, store::ModelGeometry> models_;  // cache for this stream

  int num_headers_ = 0;
  bool in_span_ = false;
  bool complete_ = false;
  int index_ = -1;             // of the current span
  store::StoredSpan span_;     // being assembled
  std::string salt_;
  int64_t received_ = 0;       // payload bytes of the current span so far
  v1::PutSpansResponse response_;
};

}  // namespace kvrecall::rpc
