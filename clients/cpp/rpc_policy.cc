#include "clients/cpp/rpc_policy.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/npy.h"
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

namespace kvrecall::client {
namespace {

std::chrono::system_clock::time_point ToChrono(absl::Time t) {
  return std::chrono::system_clock::from_time_t(0) +
         std::chrono::microseconds(absl::ToUnixMicros(t));
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

absl::Status RpcPolicy::Validate(const ClientOptions& options) {
  if (options.channel == nullptr && options.target.empty()) {
    return absl::InvalidArgumentError("ClientOptions.target: required");
  }
  if (options.deadline_ms <= 0) {
    return absl::InvalidArgumentError("ClientOptions.deadline_ms must be > 0");
  }
  if (options.max_attempts < 1 || options.max_attempts > 100) {
    return absl::InvalidArgumentError("ClientOptions.max_attempts must be in 1..100");
  }
  if (options.initial_backoff_ms < 0 || options.max_backoff_ms < options.initial_backoff_ms ||
      options.backoff_multiplier < 1 || options.jitter < 0 || options.jitter >= 1) {
    return absl::InvalidArgumentError(
        "ClientOptions: backoff needs 0 <= initial <= max, multiplier >= 1, 0 <= jitter < 1");
  }
  if (options.max_message_bytes < (int64_t{1} << 20) ||
      options.max_message_bytes > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError("ClientOptions.max_message_bytes must be in 1 MiB..1 GiB");
  }
  if (options.tls_client_cert_file.empty() != options.tls_client_key_file.empty()) {
    return absl::InvalidArgumentError(
        "ClientOptions.tls_client_cert_file and tls_client_key_file go together");
  }
  for (const std::string* file :
       {&options.tls_root_ca_file, &options.tls_client_cert_file, &options.tls_client_key_file}) {
    if (file->empty()) continue;
    absl::StatusOr<std::string> pem = ReadFileToString(*file);
    if (!pem.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("ClientOptions TLS file ", *file, ": ", pem.status().message()));
    }
  }
  if (options.chunk_bytes < 4096 ||
      options.chunk_bytes > options.max_message_bytes - (int64_t{64} << 10)) {
    return absl::InvalidArgumentError(
        "ClientOptions.chunk_bytes must be in 4 KiB..max_message_bytes - 64 KiB");
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::ChannelCredentials> ChannelCredentialsFor(const ClientOptions& options) {
  const bool tls = options.tls || !options.tls_root_ca_file.empty() ||
                   !options.tls_client_cert_file.empty();
  if (!tls) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  // Validate() checked that the files are readable.
  auto read = [](const std::string& path) {
    if (path.empty()) return std::string();
    absl::StatusOr<std::string> pem = ReadFileToString(path);
    return pem.ok() ? *std::move(pem) : std::string();
  };
  ssl.pem_root_certs = read(options.tls_root_ca_file);
  ssl.pem_cert_chain = read(options.tls_client_cert_file);
  ssl.pem_private_key = read(options.tls_client_key_file);
  return grpc::SslCredentials(ssl);
}

RpcPolicy::RpcPolicy(const ClientOptions& options)
    : options_(options), rng_(std::random_device()()) {
  if (options.channel != nullptr) {
    channel_ = options.channel;
  } else {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
    args.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
    // Retries are ours (with jitter and a deadline), not the channel's.
    args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
    if (options.http2_max_frame_bytes > 0) {
      args.SetInt(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, static_cast<int>(options.http2_max_frame_bytes));
    }
    if (options.dedicated_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    if (options.http2_window_bytes > 0) {
      args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
      args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES,
                  static_cast<int>(options.http2_window_bytes));
    }
    if (!options.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(options.tls_server_name);
    }
    channel_ = grpc::CreateCustomChannel(options.target, ChannelCredentialsFor(options), args);
  }
}

std::unique_ptr<grpc::ClientContext> RpcPolicy::NewContext(absl::Time deadline) const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(ToChrono(deadline));
  if (!options_.bearer_token.empty()) {
    ctx->AddMetadata("authorization", "Bearer " + options_.bearer_token);
  }
  return ctx;
}

absl::Duration RpcPolicy::Backoff(int retry) {
  double ms = static_cast<double>(options_.initial_backoff_ms);
  for (int i = 1; i < retry && ms < options_.max_backoff_ms; ++i) ms *= options_.backoff_multiplier;
  ms = std::min(ms, static_cast<double>(options_.max_backoff_ms));
  absl::MutexLock lock(&rng_mu_);
  std::uniform_real_distribution<double> jitter(1 - options_.jitter, 1 + options_.jitter);
  return absl::Milliseconds(ms * jitter(rng_));
}

absl::Status RpcPolicy::Retry(
    absl::Time deadline, const std::function<absl::Status(grpc::ClientContext*)>& attempt) {
  absl::Status status;
  for (int i = 1;; ++i) {
    auto ctx = NewContext(deadline);
    status = attempt(ctx.get());
    if (status.code() != absl::StatusCode::kUnavailable || i >= options_.max_attempts) break;
    const absl::Duration wait = Backoff(i);
    if (absl::Now() + wait >= deadline) break;
    absl::SleepFor(wait);
  }
  return status;
}

}  // namespace kvrecall::client
