#pragma once

// RpcPolicy: what every kvrecall client call shares: the channel built from
// ClientOptions, a deadline and bearer-token metadata on each call, and
// retries of UNAVAILABLE with exponential backoff and jitter within the
// call's deadline. Used by KvStoreClient and RetrievalClient.
//
// Thread-safe.

#include <functional>
#include <memory>
#include <random>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "clients/cpp/client_options.h"
#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/status.h>

namespace kvrecall::client {

// The channel credentials of `options`: TLS (root CA, client certificate)
// when asked for, else plaintext.
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentialsFor(const ClientOptions& options);

class RpcPolicy {
 public:
  // INVALID_ARGUMENT for bad options (target, deadline, attempts, backoff,
  // message and chunk sizes, unreadable or unpaired TLS files).
  static absl::Status Validate(const ClientOptions& options);

  // REQUIRES: Validate(options).ok().
  explicit RpcPolicy(const ClientOptions& options);

  const ClientOptions& options() const { return options_; }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

  // The deadline of a call starting now.
  absl::Time CallDeadline() const { return absl::Now() + absl::Milliseconds(options_.deadline_ms); }

  // A fresh context with the deadline and metadata applied.
  std::unique_ptr<grpc::ClientContext> NewContext(absl::Time deadline) const;

  // Runs `attempt` until it returns something other than UNAVAILABLE, the
  // attempts are used up or the deadline would pass while backing off.
  absl::Status Retry(absl::Time deadline,
                     const std::function<absl::Status(grpc::ClientContext*)>& attempt);

  // The backoff before retry number `retry` (1-based), jittered.
  absl::Duration Backoff(int retry) ABSL_LOCKS_EXCLUDED(rng_mu_);

 private:
  const ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  absl::Mutex rng_mu_;
  std::mt19937_64 rng_ ABSL_GUARDED_BY(rng_mu_);
};

// grpc::Status -> absl::Status with the same code and message.
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace kvrecall::client
