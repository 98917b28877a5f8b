#pragma once

// PeerPool: this node's connections to the other nodes of its cluster, and
// the ClusterPeer calls made on them (docs/cluster.md): storing and fetching
// replicas, probing which spans a node holds, span operations and catalog
// replication, each on behalf of a tenant. One channel per peer address,
// made on first use; every call has a deadline and carries the cluster's
// peer token. Also the conversions between stored spans and their wire form.
//
// Thread-safe.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvrecall/v1/cluster.grpc.pb.h"
#include "service/store/span.h"
#include "service/store/tiered_store.h"

namespace kvrecall::cluster {

// The metadata key of the peer token.
inline constexpr char kPeerTokenMetadata[] = "x-kvrecall-peer-token";

struct PeerOptions {
  // Sent as x-kvrecall-peer-token (empty: none).
  std::string peer_token;
  // TLS to peers: when tls is true, dial with the CA bundle (empty: the
  // system's roots) and present the certificate and key (for peers that
  // require client certificates).
  bool tls = false;
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  // Deadline of a call: base plus the time to move its payload at
  // min_bytes_per_second. Defaults 5 s, 50 MB/s.
  absl::Duration call_timeout = absl::Seconds(5);
  int64_t min_bytes_per_second = 50'000'000;
  // Largest message; payloads go in chunks of chunk_bytes.
  int64_t max_message_bytes = int64_t{16} << 20;
  int64_t chunk_bytes = int64_t{1} << 20;
};

// What one node said of one span (ProbeSpans, or an unreachable node).
struct PeerProbe {
  bool found = false;
  store::MissReason miss = store::MissReason::kNone;
  int32_t num_tokens = 0;
};

class PeerPool {
 public:
  // INVALID_ARGUMENT when a TLS file cannot be read.
  static absl::StatusOr<std::unique_ptr<PeerPool>> Create(const PeerOptions& options);

  // Stores `spans` (one tenant) on the node at `address`; per span whether it
  // was already there and its durable tier.
  absl::Status StoreSpans(const std::string& address,
                          absl::Span<const store::StoredSpanPtr> spans,
                          std::vector<bool>* already_present,
                          std::vector<store::TierId>* durable_tiers);
  // Reads spans held by the node; a miss has span == null and its reason.
  absl::StatusOr<std::vector<store::GetResult>> FetchSpans(const std::string& address,
                                                           absl::string_view tenant,
                                                           absl::string_view model_id,
                                                           absl::Span<const Hash128> hashes);
  absl::StatusOr<std::vector<PeerProbe>> ProbeSpans(const std::string& address,
                                                    absl::string_view tenant,
                                                    absl::string_view model_id,
                                                    absl::Span<const Hash128> hashes);
  absl::StatusOr<std::vector<absl::Status>> SpanOp(const std::string& address,
                                                   absl::string_view tenant, v1::SpanOpKind op,
                                                   absl::Span<const Hash128> hashes,
                                                   absl::Duration ttl = absl::InfiniteDuration());
  absl::Status CatalogWrite(const std::string& address, const v1::CatalogWriteRequest& request);
  absl::StatusOr<std::vector<v1::CatalogEntry>> CatalogRead(const std::string& address,
                                                            const v1::CatalogReadRequest& request);

  // The channel to `address` (for forwarding client calls to their owner).
  std::shared_ptr<grpc::Channel> ChannelFor(const std::string& address) ABSL_LOCKS_EXCLUDED(mu_);
  const PeerOptions& options() const { return options_; }

 private:
  struct Connection {
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::ClusterPeer::Stub> stub;
  };
  explicit PeerPool(const PeerOptions& options) : options_(options) {}
  v1::ClusterPeer::Stub* StubFor(const std::string& address) ABSL_LOCKS_EXCLUDED(mu_);
  Connection& ConnectionFor(const std::string& address) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::unique_ptr<grpc::ClientContext> NewContext(int64_t payload_bytes) const;

  PeerOptions options_;
  std::string ca_pem_, cert_pem_, key_pem_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, Connection> connections_ ABSL_GUARDED_BY(mu_);
};

// A stored span's wire header (token ids included).
v1::PutSpanHeader SpanHeaderToProto(const store::StoredSpan& span);
// A span from its wire header and payload. INVALID_ARGUMENT for a bad hash.
absl::StatusOr<store::StoredSpan> SpanFromProto(absl::string_view tenant,
                                                const v1::PutSpanHeader& header,
                                                std::string payload);
store::MissReason MissReasonFromProto(v1::MissReason reason);
store::TierId TierFromProto(v1::Tier tier);

}  // namespace kvrecall::cluster
