#pragma once

// ServerOptions: everything kvrecalld is configured with. Built and validated
// from flags by ServerOptionsFromFlags() (service/daemon/server_flags.h); the
// names in comments are the flag names (docs/config.md).

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "kvrecall/v1/admin.pb.h"
#include "service/store/tiered_store.h"

namespace kvrecall::rpc {

struct ServerOptions {
  // --listen: host:port of the gRPC server. Port 0 picks a free port (see
  // Server::port()). Default "127.0.0.1:7878" (loopback only).
  std::string listen_address = "127.0.0.1:7878";

  // The span store: --data_dir, --memory_capacity_bytes, --memory_shards,
  // --disk_capacity_bytes, --disk_segment_bytes,
  // --disk_compaction_live_fraction, --rocksdb_capacity_bytes,
  // --rocksdb_compression. `store.metrics` is set by the Server. Defaults:
  // data under "./data", memory 4 GiB, disk 64 GiB, RocksDB 256 GiB.
  store::TieredStoreOptions store = DefaultStoreOptions();

  // --tenants_file: "<tenant_id> <token>" lines (service/rpc/tenant_auth.h).
  // Empty (default): one default tenant, no authentication.
  std::string tenants_file;

  // --max_message_bytes: largest gRPC message received or sent, in bytes.
  // Payloads are streamed in chunks well below it. Default 16 MiB; range
  // 1 MiB..1 GiB.
  int64_t max_message_bytes = int64_t{16} << 20;
  // --max_span_bytes: largest span payload accepted by PutSpans, in bytes.
  // Default 256 MiB; range 1 KiB..16 GiB.
  int64_t max_span_bytes = int64_t{256} << 20;
  // --get_chunk_bytes: payload bytes per GetSpans response message unless the
  // request asks for less. Default 1 MiB; range 4 KiB..max_message_bytes - 64 KiB.
  int64_t get_chunk_bytes = int64_t{1} << 20;

  // --rpc_threads: most threads serving RPCs at once (the synchronous server's
  // resource quota); calls beyond it get RESOURCE_EXHAUSTED. Default 64;
  // range 2..4096.
  int32_t rpc_threads = 64;
  // --store_threads: threads making the store calls of PutSpans and GetSpans
  // (a durable put syncs, a read from a lower tier blocks on disk), so that
  // gRPC reactions never block. Default 16; range 1..1024.
  int32_t store_threads = 16;
  // --completion_queues: completion queues of the synchronous server. 0
  // (default) means one per hardware thread; range 0..64.
  int32_t completion_queues = 0;
  // --http2_window_bytes: initial HTTP/2 stream and connection flow-control
  // window, in bytes (large windows keep big payloads flowing). 0 leaves
  // gRPC's automatic sizing (BDP probing). Default 0; range 0..1 GiB.
  int64_t http2_window_bytes = 0;

  // --http2_max_frame_bytes: largest HTTP/2 DATA frame the server accepts
  // (it advertises this; clients send frames up to it). Larger frames mean
  // fewer frames per megabyte. 0 keeps gRPC's default (16 KiB); range
  // 0 or 16 KiB..16 MiB - 1.
  int64_t http2_max_frame_bytes = 0;

  // --shutdown_grace_ms: on SIGTERM/SIGINT, in-flight RPCs get this long to
  // finish before they are cancelled. Default 10000; range 0..600000.
  int64_t shutdown_grace_ms = 10000;

  // --metrics_port: Prometheus text on http://<listen host>:<port>/metrics.
  // 0 (default) disables the HTTP endpoint; range 0..65535.
  int32_t metrics_port = 0;

  // Retrieval (kvrecall.v1.Retrieval, docs/retrieval.md):
  // --index_build_threads: index-build operations running at once (each
  // uses every core inside). Default 1; range 1..64.
  int32_t index_build_threads = 1;
  // --context_idle_s: an open context unused this long is closed (its spans
  // unpinned); it reopens transparently on next use. Default 600; range 1..604800.
  int64_t context_idle_s = 600;
  // --persist_indexes: keep built indexes in the RocksDB catalog (reloaded
  // lazily after a restart). Default true.
  bool persist_indexes = true;
  // --max_artifact_bytes: largest artifact PutArtifact accepts. Default 1 GiB;
  // range 1 KiB..16 GiB.
  int64_t max_artifact_bytes = int64_t{1} << 30;

  // --- security (docs/security.md) ---
  // --tls_cert_file / --tls_key_file: PEM server certificate (chain) and
  // private key. Both or neither; when set the gRPC port serves TLS only.
  std::string tls_cert_file;
  std::string tls_key_file;
  // --tls_client_ca_file: PEM CA bundle; when set every client must present a
  // certificate it signed (mutual TLS). Needs the server certificate.
  std::string tls_client_ca_file;
  // --insecure: allow listening beyond loopback without TLS and a tenants
  // file (tokens and prompts would cross the network in cleartext, or
  // anyone reaching the port could read every span). Default false: the
  // daemon refuses to start that way.
  bool insecure = false;
  // --require_token_ids: every PutSpans header must carry its token ids,
  // which the daemon hashes and compares with the span hash, so that no
  // client can store K/V under the hash of a prompt it did not send (prefix
  // poisoning). Default true.
  bool require_token_ids = true;

  // --- bounds on what requests hold (docs/config.md) ---
  // --max_inflight_bytes: bytes all calls together may buffer while they are
  // received (span payloads being assembled, artifacts, query batches).
  // Default 1 GiB; range 1 MiB..64 TiB.
  int64_t max_inflight_bytes = int64_t{1} << 30;
  // --max_concurrent_streams: PutSpans and GetSpans calls served at once (they
  // run on reactors, outside --rpc_threads). Default 256; range 1..65536.
  int32_t max_concurrent_streams = 256;
  // --max_queued_builds: index builds waiting to run, daemon-wide. Default
  // 64; range 1..100000.
  int32_t max_queued_builds = 64;
  // --max_context_query_bytes: training queries one context keeps (AddQueries
  // and the queries of AppendTokens), bytes of f32. Default 256 MiB; range
  // 0..1 TiB.
  int64_t max_context_query_bytes = int64_t{256} << 20;

  // --- per-tenant quotas (0: none). RESOURCE_EXHAUSTED names the quota. ---
  // --tenant_contexts: open retrieval contexts per tenant.
  int32_t tenant_contexts = 0;
  // --tenant_builds: index builds queued or running per tenant.
  int32_t tenant_builds = 0;
  // The store's: --tenant_memory_bytes, --tenant_pinned_bytes and
  // --tombstone_max_age_s are in `store` (TieredStoreOptions).

  // Options of parts configured outside ServerOptions (the cluster flags,
  // docs/cluster.md), listed by ServerOptionsToFlags and GetConfig.
  std::vector<std::pair<std::string, std::string>> additional_flags;
  // Adds daemon-wide sections to Admin.Stats (the cluster's); may be empty.
  std::function<void(v1::StatsResponse*)> stats_extension;

  // --port_file: when set, the bound gRPC port is written there (atomically)
  // once the server accepts calls. Default empty.
  std::string port_file;

  static store::TieredStoreOptions DefaultStoreOptions() {
    store::TieredStoreOptions o;
    o.data_dir = "./data";
    return o;
  }
};

// INVALID_ARGUMENT naming the flag when a field is out of range.
absl::Status ValidateServerOptions(const ServerOptions& options);

// The effective options as (flag name, value) pairs, in flag name order:
// what the daemon logs at startup and Admin.GetConfig returns.
std::vector<std::pair<std::string, std::string>> ServerOptionsToFlags(const ServerOptions& options);

// Whether `host` (from ParseListenAddress) names only this machine:
// 127.0.0.0/8, ::1 or localhost.
bool IsLoopbackHost(const std::string& host);

// host and port of a "host:port" or "[v6]:port" address. INVALID_ARGUMENT
// when malformed or the port is not 0..65535.
absl::Status ParseListenAddress(const std::string& address, std::string* host, int* port);

}  // namespace kvrecall::rpc
