#include "service/rpc/server.h"

#include <chrono>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "service/rpc/admin_service.h"
#include "service/rpc/kv_store_service.h"
#include "service/rpc/metrics_http.h"
#include <grpc/grpc.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

namespace kvrecall::rpc {
namespace {

// On shutdown, how long finished calls' statuses get to reach their clients
// before the remaining connections are closed.
constexpr absl::Duration kStatusFlushTime = absl::Milliseconds(250);

// TLS (with client certificates when a client CA is given) or, without a
// certificate, plaintext; logs which, and loudly when plaintext or
// unauthenticated access reaches beyond loopback (--insecure).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFor(
    const ServerOptions& options) {
  std::string host;
  int port = 0;
  KVR_RETURN_IF_ERROR(ParseListenAddress(options.listen_address, &host, &port));
  const bool loopback = IsLoopbackHost(host);
  if (options.tls_cert_file.empty()) {
    if (!loopback) {
      KVR_LOG(WARNING) << "--insecure: serving " << options.listen_address
                       << " WITHOUT TLS: bearer tokens and KV caches cross the network in "
                          "cleartext";
    }
    if (!loopback && options.tenants_file.empty()) {
      KVR_LOG(WARNING) << "--insecure: serving " << options.listen_address
                       << " WITHOUT a tenants file: anyone reaching the port reads and writes "
                          "every span";
    }
    return grpc::InsecureServerCredentials();
  }
  grpc::SslServerCredentialsOptions ssl;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  absl::StatusOr<std::string> cert = ReadFileToString(options.tls_cert_file);
  if (!cert.ok()) return absl::InvalidArgumentError(absl::StrCat("--tls_cert_file: ", cert.status().message()));
  absl::StatusOr<std::string> key = ReadFileToString(options.tls_key_file);
  if (!key.ok()) return absl::InvalidArgumentError(absl::StrCat("--tls_key_file: ", key.status().message()));
  pair.cert_chain = *std::move(cert);
  pair.private_key = *std::move(key);
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!options.tls_client_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadFileToString(options.tls_client_ca_file);
    if (!ca.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls_client_ca_file: ", ca.status().message()));
    }
    ssl.pem_root_certs = *std::move(ca);
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  if (!loopback && options.tenants_file.empty()) {
    KVR_LOG(WARNING) << "--insecure: serving " << options.listen_address
                     << " over TLS but WITHOUT a tenants file: every client is the default "
                        "tenant";
  }
  KVR_LOG(INFO) << "serving TLS" << (options.tls_client_ca_file.empty() ? "" : " with client "
                                                                              "certificates")
                << " on " << options.listen_address;
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Create(
    const ServerOptions& options, const StoreOpener& open_store,
    const std::vector<ServiceFactory>& additional_services) {
  KVR_RETURN_IF_ERROR(ValidateServerOptions(options));
  std::unique_ptr<Server> server(new Server());
  server->options_ = options;
  KVR_RETURN_IF_ERROR(ParseListenAddress(options.listen_address, &server->host_, &server->port_));

  if (options.tenants_file.empty()) {
    server->auth_ = TenantAuthenticator::Disabled();
  } else {
    KVR_ASSIGN_OR_RETURN(server->auth_, TenantAuthenticator::FromFile(options.tenants_file));
  }

  server->metrics_ = std::make_unique<MetricsRegistry>();
  server->rpc_metrics_ = std::make_unique<RpcMetrics>(server->metrics_.get());
  store::TieredStoreOptions store_options = options.store;
  store_options.metrics = server->metrics_.get();
  // Only tenants of one trust group learn of each other's spans (miss reason
  // other_namespace); the authenticator outlives the store.
  const TenantAuthenticator* auth = server->auth_.get();
  store_options.shares_namespace = [auth](absl::string_view a, absl::string_view b) {
    return auth->ShareNamespace(a, b);
  };
  server->options_.store.metrics = server->metrics_.get();
  KVR_ASSIGN_OR_RETURN(server->store_, open_store(store_options));
  if (server->store_ == nullptr) return absl::InternalError("the store opener returned null");

  server->limiter_ = std::make_unique<InflightLimiter>(options.max_inflight_bytes,
                                                       options.max_concurrent_streams);
  KvStoreServiceOptions kv_options;
  kv_options.require_token_ids = options.require_token_ids;
  kv_options.limiter = server->limiter_.get();
  kv_options.max_span_bytes = options.max_span_bytes;
  kv_options.get_chunk_bytes = options.get_chunk_bytes;
  kv_options.max_message_bytes = options.max_message_bytes;
  kv_options.store_threads = options.store_threads;
  server->services_.push_back(std::make_unique<KvStoreServiceImpl>(
      server->store_.get(), server->auth_.get(), server->rpc_metrics_.get(), kv_options));
  server->services_.push_back(std::make_unique<AdminServiceImpl>(
      server->store_.get(), server->auth_.get(), server->rpc_metrics_.get(), &server->options_,
      absl::Now()));
  ServiceContext context;
  context.store = server->store_.get();
  context.metrics = server->metrics_.get();
  context.rpc_metrics = server->rpc_metrics_.get();
  context.auth = server->auth_.get();
  context.options = &server->options_;
  context.limiter = server->limiter_.get();
  for (const ServiceFactory& factory : additional_services) {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<grpc::Service> service, factory(context));
    if (service == nullptr) return absl::InternalError("a service factory returned null");
    server->services_.push_back(std::move(service));
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int selected_port = 0;
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                       ServerCredentialsFor(options));
  builder.AddListeningPort(options.listen_address, credentials, &selected_port);
  // A second daemon on the same port (and data directory) must fail, not share it.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  grpc::ResourceQuota quota("kvrecalld");
  quota.SetMaxThreads(options.rpc_threads);
  builder.SetResourceQuota(quota);
  const int cqs = options.completion_queues > 0
                      ? options.completion_queues
                      : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  builder.SetSyncServerOption(grpc::ServerBuilder::NUM_CQS, cqs);
  builder.SetSyncServerOption(grpc::ServerBuilder::MIN_POLLERS, 1);
  builder.SetSyncServerOption(grpc::ServerBuilder::MAX_POLLERS, 2);
  if (options.http2_window_bytes > 0) {
    builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES,
                               static_cast<int>(options.http2_window_bytes));
  }
  if (options.http2_max_frame_bytes > 0) {
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_FRAME_SIZE,
                               static_cast<int>(options.http2_max_frame_bytes));
  }
  for (const auto& service : server->services_) builder.RegisterService(service.get());
  server->grpc_server_ = builder.BuildAndStart();
  if (server->grpc_server_ == nullptr || selected_port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen_address, " (--listen)"));
  }
  server->port_ = selected_port;

  if (options.metrics_port > 0) {
    KVR_ASSIGN_OR_RETURN(server->metrics_http_,
                         MetricsHttpServer::Start(server->host_, options.metrics_port,
                                                  server->metrics_.get()));
  }
  if (!options.port_file.empty()) {
    KVR_RETURN_IF_ERROR(
        WriteStringToFileAtomic(options.port_file, absl::StrCat(server->port_, "\n")));
  }
  return server;
}

Server::~Server() {
  Shutdown(absl::ZeroDuration()).IgnoreError();  // the caller chose not to see Sync()'s status
}

std::string Server::address() const {
  const bool v6 = host_.find(':') != std::string::npos;
  return v6 ? absl::StrCat("[", host_, "]:", port_) : absl::StrCat(host_, ":", port_);
}

int Server::metrics_port() const {
  return metrics_http_ == nullptr ? 0 : metrics_http_->port();
}

std::shared_ptr<grpc::Channel> Server::InProcessChannel() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(options_.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(options_.max_message_bytes));
  return grpc_server_->InProcessChannel(args);
}

absl::Status Server::Shutdown(absl::Duration grace) {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return absl::OkStatus();
    shut_down_ = true;
  }
  if (grpc_server_ != nullptr) {
    if (auto* health = grpc_server_->GetHealthCheckService(); health != nullptr) {
      health->SetServingStatus(false);
    }
    // Lame duck: new calls are turned away (UNAVAILABLE, which clients retry)
    // while the calls in flight get up to `grace` to finish. Then the gRPC
    // server stops: it gives the last calls' statuses a moment to reach their
    // clients, cancels whatever still runs and closes idle connections (which
    // gRPC would otherwise wait on for seconds).
    const absl::Time start = absl::Now();
    const absl::Time deadline = start + std::max(grace, absl::ZeroDuration());
    CallGate* gate = rpc_metrics_->gate();
    gate->StartDraining();
    const int64_t left = gate->AwaitDrained(deadline);
    if (left > 0) KVR_LOG(WARNING) << "cancelling " << left << " calls still running after " << grace;
    const absl::Time stop_at = std::min(deadline, absl::Now() + kStatusFlushTime);
    grpc_server_->Shutdown(std::chrono::system_clock::now() +
                           std::chrono::microseconds(absl::ToInt64Microseconds(
                               std::max(stop_at - absl::Now(), absl::ZeroDuration()))));
    grpc_server_->Wait();
    KVR_LOG(INFO) << "gRPC server stopped in " << absl::Now() - start;
  }
  const absl::Time start = absl::Now();
  absl::Status status = store_ != nullptr ? store_->Sync() : absl::OkStatus();
  KVR_LOG(INFO) << "store synced in " << absl::Now() - start;
  metrics_http_.reset();
  return status;
}

}  // namespace kvrecall::rpc
