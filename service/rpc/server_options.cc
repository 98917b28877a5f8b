#include "service/rpc/server_options.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvrecall::rpc {
namespace {

absl::Status Range(absl::string_view flag, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, "=", value, " is out of range [", lo, ", ", hi, "]"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ParseListenAddress(const std::string& address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--listen=", address, ": expected host:port, e.g. 127.0.0.1:7878"));
  }
  std::string h = address.substr(0, colon);
  if (h.front() == '[') {
    if (h.back() != ']') {
      return absl::InvalidArgumentError(absl::StrCat("--listen=", address, ": unbalanced '['"));
    }
    h = h.substr(1, h.size() - 2);
  }
  int p = 0;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &p) || p < 0 || p > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--listen=", address, ": the port must be a number in 0..65535"));
  }
  *host = h;
  *port = p;
  return absl::OkStatus();
}

bool IsLoopbackHost(const std::string& host) {
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

absl::Status ValidateServerOptions(const ServerOptions& o) {
  std::string host;
  int port = 0;
  KVR_RETURN_IF_ERROR(ParseListenAddress(o.listen_address, &host, &port));
  if (o.tls_cert_file.empty() != o.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls_cert_file and --tls_key_file go together");
  }
  if (!o.tls_client_ca_file.empty() && o.tls_cert_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls_client_ca_file (mutual TLS) needs --tls_cert_file and --tls_key_file");
  }
  if (!IsLoopbackHost(host) && !o.insecure &&
      (o.tls_cert_file.empty() || o.tenants_file.empty())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--listen=", o.listen_address, " reaches beyond this machine: it needs TLS "
        "(--tls_cert_file, --tls_key_file) and tenants (--tenants_file), or --insecure to accept "
        "cleartext and unauthenticated access (docs/security.md)"));
  }
  constexpr int64_t kTiB0 = int64_t{1} << 40;
  KVR_RETURN_IF_ERROR(
      Range("max_inflight_bytes", o.max_inflight_bytes, int64_t{1} << 20, 64 * kTiB0));
  KVR_RETURN_IF_ERROR(Range("max_concurrent_streams", o.max_concurrent_streams, 1, 65536));
  KVR_RETURN_IF_ERROR(Range("max_queued_builds", o.max_queued_builds, 1, 100000));
  KVR_RETURN_IF_ERROR(Range("max_context_query_bytes", o.max_context_query_bytes, 0, kTiB0));
  KVR_RETURN_IF_ERROR(Range("tenant_contexts", o.tenant_contexts, 0, 1 << 30));
  KVR_RETURN_IF_ERROR(Range("tenant_builds", o.tenant_builds, 0, 1 << 30));
  for (const auto& [flag, v] : {std::pair{"tenant_memory_bytes", o.store.tenant_memory_bytes},
                                std::pair{"tenant_pinned_bytes", o.store.tenant_pinned_bytes},
                                std::pair{"tenant_stored_bytes", o.store.tenant_stored_bytes}}) {
    KVR_RETURN_IF_ERROR(Range(flag, v, 0, 1024 * kTiB0));
  }
  KVR_RETURN_IF_ERROR(Range("tombstone_max_age_s",
                            absl::ToInt64Seconds(o.store.tombstone_max_age), 1, 10 * 365 * 86400));
  if (o.store.data_dir.empty()) return absl::InvalidArgumentError("--data_dir must not be empty");
  constexpr int64_t kTiB = int64_t{1} << 40;
  KVR_RETURN_IF_ERROR(Range("memory_capacity_bytes", o.store.memory_capacity_bytes, 0, 64 * kTiB));
  KVR_RETURN_IF_ERROR(Range("memory_shards", o.store.memory_shards, 1, 256));
  KVR_RETURN_IF_ERROR(Range("disk_capacity_bytes", o.store.disk_capacity_bytes, 0, 1024 * kTiB));
  KVR_RETURN_IF_ERROR(
      Range("disk_segment_bytes", o.store.disk_segment_bytes, int64_t{1} << 20, int64_t{64} << 30));
  if (!(o.store.disk_compaction_live_fraction >= 0 && o.store.disk_compaction_live_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--disk_compaction_live_fraction=",
                                                   o.store.disk_compaction_live_fraction,
                                                   " is out of range [0, 1]"));
  }
  KVR_RETURN_IF_ERROR(
      Range("rocksdb_capacity_bytes", o.store.rocksdb_capacity_bytes, 0, 1024 * kTiB));
  if (o.store.rocksdb_compression != "zstd" && o.store.rocksdb_compression != "lz4" &&
      o.store.rocksdb_compression != "none") {
    return absl::InvalidArgumentError(absl::StrCat("--rocksdb_compression=",
                                                   o.store.rocksdb_compression,
                                                   ": must be zstd, lz4 or none"));
  }
  KVR_RETURN_IF_ERROR(
      Range("max_message_bytes", o.max_message_bytes, int64_t{1} << 20, int64_t{1} << 30));
  KVR_RETURN_IF_ERROR(Range("max_span_bytes", o.max_span_bytes, 1024, int64_t{16} << 30));
  KVR_RETURN_IF_ERROR(Range("get_chunk_bytes", o.get_chunk_bytes, 4096,
                            o.max_message_bytes - (int64_t{64} << 10)));
  KVR_RETURN_IF_ERROR(Range("rpc_threads", o.rpc_threads, 2, 4096));
  KVR_RETURN_IF_ERROR(Range("store_threads", o.store_threads, 1, 1024));
  KVR_RETURN_IF_ERROR(Range("completion_queues", o.completion_queues, 0, 64));
  KVR_RETURN_IF_ERROR(Range("http2_window_bytes", o.http2_window_bytes, 0, int64_t{1} << 30));
  if (o.http2_max_frame_bytes != 0) {
    KVR_RETURN_IF_ERROR(
        Range("http2_max_frame_bytes", o.http2_max_frame_bytes, 16384, (int64_t{1} << 24) - 1));
  }
  KVR_RETURN_IF_ERROR(Range("shutdown_grace_ms", o.shutdown_grace_ms, 0, 600000));
  KVR_RETURN_IF_ERROR(Range("metrics_port", o.metrics_port, 0, 65535));
  KVR_RETURN_IF_ERROR(Range("index_build_threads", o.index_build_threads, 1, 64));
  KVR_RETURN_IF_ERROR(Range("context_idle_s", o.context_idle_s, 1, 604800));
  KVR_RETURN_IF_ERROR(
      Range("max_artifact_bytes", o.max_artifact_bytes, int64_t{1} << 10, int64_t{16} << 30));
  return absl::OkStatus();
}

std::vector<std::pair<std::string, std::string>> ServerOptionsToFlags(const ServerOptions& o) {
  std::vector<std::pair<std::string, std::string>> flags = {
      {"listen", o.listen_address},
      {"data_dir", o.store.data_dir},
      {"memory_capacity_bytes", absl::StrCat(o.store.memory_capacity_bytes)},
      {"memory_shards", absl::StrCat(o.store.memory_shards)},
      {"disk_capacity_bytes", absl::StrCat(o.store.disk_capacity_bytes)},
      {"disk_segment_bytes", absl::StrCat(o.store.disk_segment_bytes)},
      {"disk_compaction_live_fraction", absl::StrCat(o.store.disk_compaction_live_fraction)},
      {"rocksdb_capacity_bytes", absl::StrCat(o.store.rocksdb_capacity_bytes)},
      {"rocksdb_compression", o.store.rocksdb_compression},
      {"tenants_file", o.tenants_file},
      {"max_message_bytes", absl::StrCat(o.max_message_bytes)},
      {"max_span_bytes", absl::StrCat(o.max_span_bytes)},
      {"get_chunk_bytes", absl::StrCat(o.get_chunk_bytes)},
      {"rpc_threads", absl::StrCat(o.rpc_threads)},
      {"completion_queues", absl::StrCat(o.completion_queues)},
      {"store_threads", absl::StrCat(o.store_threads)},
      {"http2_window_bytes", absl::StrCat(o.http2_window_bytes)},
      {"http2_max_frame_bytes", absl::StrCat(o.http2_max_frame_bytes)},
      {"shutdown_grace_ms", absl::StrCat(o.shutdown_grace_ms)},
      {"metrics_port", absl::StrCat(o.metrics_port)},
      {"port_file", o.port_file},
      {"index_build_threads", absl::StrCat(o.index_build_threads)},
      {"context_idle_s", absl::StrCat(o.context_idle_s)},
      {"persist_indexes", o.persist_indexes ? "true" : "false"},
      {"max_artifact_bytes", absl::StrCat(o.max_artifact_bytes)},
      {"tls_cert_file", o.tls_cert_file},
      {"tls_key_file", o.tls_key_file},
      {"tls_client_ca_file", o.tls_client_ca_file},
      {"insecure", o.insecure ? "true" : "false"},
      {"require_token_ids", o.require_token_ids ? "true" : "false"},
      {"max_inflight_bytes", absl::StrCat(o.max_inflight_bytes)},
      {"max_concurrent_streams", absl::StrCat(o.max_concurrent_streams)},
      {"max_queued_builds", absl::StrCat(o.max_queued_builds)},
      {"max_context_query_bytes", absl::StrCat(o.max_context_query_bytes)},
      {"tenant_contexts", absl::StrCat(o.tenant_contexts)},
      {"tenant_builds", absl::StrCat(o.tenant_builds)},
      {"tenant_memory_bytes", absl::StrCat(o.store.tenant_memory_bytes)},
      {"tenant_pinned_bytes", absl::StrCat(o.store.tenant_pinned_bytes)},
      {"tenant_stored_bytes", absl::StrCat(o.store.tenant_stored_bytes)},
      {"tombstone_max_age_s", absl::StrCat(absl::ToInt64Seconds(o.store.tombstone_max_age))},
  };
  flags.insert(flags.end(), o.additional_flags.begin(), o.additional_flags.end());
  std::sort(flags.begin(), flags.end());
  return flags;
}

}  // namespace kvrecall::rpc
