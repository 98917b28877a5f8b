#pragma once

// EtcdClient: the part of etcd's v3 gRPC API kvrecalld uses for its cluster
// membership (docs/cluster.md): keys (Range, Put, DeleteRange, a
// create-if-absent Txn), leases (grant, keep-alive, revoke, time-to-live)
// and watches on a prefix. Talks to any of several endpoints and moves to
// the next one when an endpoint is unreachable.
//
//   KVR_ASSIGN_OR_RETURN(auto etcd, EtcdClient::Create({{"127.0.0.1:2379"}}));
//   KVR_ASSIGN_OR_RETURN(int64_t lease, etcd->GrantLease(absl::Seconds(10)));
//   KVR_RETURN_IF_ERROR(etcd->Put("/kvrecall/c/nodes/n1", record, lease).status());
//
// Errors: UNAVAILABLE when no endpoint answers (retry later), DEADLINE_EXCEEDED,
// NOT_FOUND for a lease etcd does not know (expired or revoked), and etcd's
// own codes otherwise. Thread-safe.

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "etcd/etcdserverpb/rpc.grpc.pb.h"

namespace kvrecall::cluster {

struct EtcdOptions {
  // host:port of etcd's client URLs ("http://" prefixes are accepted and
  // dropped); at least one. TLS to etcd is not supported yet.
  std::vector<std::string> endpoints;
  // Deadline of each unary call. Default 3 s.
  absl::Duration call_timeout = absl::Seconds(3);
};

struct EtcdKeyValue {
  std::string key;
  std::string value;
  int64_t create_revision = 0;
  int64_t mod_revision = 0;
  int64_t lease = 0;
};

struct EtcdEvent {
  bool deleted = false;  // a DELETE event (the key's lease expired, or it was deleted)
  EtcdKeyValue kv;
};

// Cancels a running Watch() from another thread. Thread-safe.
class EtcdWatchHandle {
 public:
  void Cancel() ABSL_LOCKS_EXCLUDED(mu_);
  bool cancelled() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  friend class EtcdClient;
  mutable absl::Mutex mu_;
  void* context_ ABSL_GUARDED_BY(mu_) = nullptr;  // grpc::ClientContext of the running watch
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

class EtcdClient {
 public:
  // INVALID_ARGUMENT without endpoints or with a malformed one. Does not
  // connect: the first call does.
  static absl::StatusOr<std::unique_ptr<EtcdClient>> Create(const EtcdOptions& options);

  // Puts `value` at `key`, attached to `lease` when non-zero. Returns the
  // store's revision after the put.
  absl::StatusOr<int64_t> Put(absl::string_view key, absl::string_view value, int64_t lease = 0);
  // The value at `key`, nullopt when absent.
  absl::StatusOr<std::optional<EtcdKeyValue>> Get(absl::string_view key);
  // Every key under `prefix`, in key order, and the store's revision of that read.
  absl::StatusOr<std::pair<std::vector<EtcdKeyValue>, int64_t>> GetPrefix(absl::string_view prefix);
  // Deletes `key` (absent is fine). Returns how many keys were deleted.
  absl::StatusOr<int64_t> Delete(absl::string_view key);
  // Creates `key` only when absent, in one transaction. Returns true when
  // created; otherwise false with the current value in *existing.
  absl::StatusOr<bool> PutIfAbsent(absl::string_view key, absl::string_view value, int64_t lease,
                                   EtcdKeyValue* existing);

  // A new lease of `ttl` (whole seconds, at least 1). Returns its id.
  absl::StatusOr<int64_t> GrantLease(absl::Duration ttl);
  // Renews a lease once; returns the TTL granted. NOT_FOUND when etcd no
  // longer knows the lease (it expired: its keys are gone).
  absl::StatusOr<absl::Duration> KeepAliveOnce(int64_t lease);
  // Revokes a lease (its keys are deleted at once). NOT_FOUND when unknown.
  absl::Status RevokeLease(int64_t lease);
  // Time left on a lease; NOT_FOUND when it expired or is unknown.
  absl::StatusOr<absl::Duration> LeaseTimeToLive(int64_t lease);

  // Watches every key under `prefix` from `start_revision` (0: from now),
  // calling on_events(events, revision) for each batch, until the stream
  // breaks (its status is returned), on_events returns false or
  // handle->Cancel() is called (both return OK). OUT_OF_RANGE when
  // start_revision was compacted away (read the prefix again). Blocks.
  using WatchCallback = std::function<bool(const std::vector<EtcdEvent>&, int64_t revision)>;
  absl::Status Watch(absl::string_view prefix, int64_t start_revision,
                     const WatchCallback& on_events, EtcdWatchHandle* handle);

  // The endpoint calls go to now.
  std::string current_endpoint() const;

 private:
  struct Endpoint {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<etcdserverpb::KV::Stub> kv;
    std::unique_ptr<etcdserverpb::Lease::Stub> lease;
    std::unique_ptr<etcdserverpb::Watch::Stub> watch;
  };
  explicit EtcdClient(const EtcdOptions& options);

  // Runs `call` on the current endpoint, moving to the next on UNAVAILABLE
  // or DEADLINE_EXCEEDED until every endpoint was tried once.
  absl::Status Call(const std::function<grpc::Status(Endpoint&, grpc::ClientContext*)>& call);

  const EtcdOptions options_;
  std::vector<Endpoint> endpoints_;
  std::atomic<size_t> current_{0};
};

// The end of the range of keys under `prefix` (the prefix with its last byte
// incremented, as etcd's clients compute it).
std::string PrefixRangeEnd(absl::string_view prefix);

}  // namespace kvrecall::cluster
