#include "service/daemon/server_flags.h"

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvrecall::daemon {

bool AbslParseFlag(absl::string_view text, ByteSize* size, std::string* error) {
  std::string s = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text));
  int shift = 0;
  for (const auto& [suffix, bits] : std::initializer_list<std::pair<const char*, int>>{
           {"kib", 10}, {"mib", 20}, {"gib", 30}, {"tib", 40},
           {"k", 10}, {"m", 20}, {"g", 30}, {"t", 40}}) {
    const absl::string_view sv(suffix);
    if (s.size() > sv.size() && absl::string_view(s).substr(s.size() - sv.size()) == sv) {
      s.resize(s.size() - sv.size());
      shift = bits;
      break;
    }
  }
  int64_t value = 0;
  if (!absl::SimpleAtoi(s, &value) || value < 0) {
    *error = "expected a non-negative byte count, optionally with a K/M/G/T or KiB/MiB/GiB/TiB "
             "suffix";
    return false;
  }
  if (shift > 0 && value > (INT64_MAX >> shift)) {
    *error = "byte count overflows 64 bits";
    return false;
  }
  size->bytes = value << shift;
  return true;
}

std::string AbslUnparseFlag(ByteSize size) { return absl::StrCat(size.bytes); }

}  // namespace kvrecall::daemon

using kvrecall::daemon::ByteSize;

// Every default comes from ServerOptions / TieredStoreOptions, so the flags
// and the library defaults cannot drift apart.
namespace {
const kvrecall::rpc::ServerOptions& Defaults() {
  static const kvrecall::rpc::ServerOptions* defaults = new kvrecall::rpc::ServerOptions();
  return *defaults;
}
}  // namespace

ABSL_FLAG(std::string, listen, Defaults().listen_address,
          "host:port of the gRPC server; port 0 picks a free port (see --port_file)");
ABSL_FLAG(std::string, data_dir, Defaults().store.data_dir,
          "directory of the span store (segments/, rocksdb/); created when missing");
ABSL_FLAG(ByteSize, memory_capacity_bytes, ByteSize{Defaults().store.memory_capacity_bytes},
          "bytes of span payload held in memory (e.g. 4GiB); 0 disables the memory tier");
ABSL_FLAG(int32_t, memory_shards, Defaults().store.memory_shards,
          "independent LRU shards of the memory tier, 1..256");
ABSL_FLAG(ByteSize, disk_capacity_bytes, ByteSize{Defaults().store.disk_capacity_bytes},
          "bytes of live span records in disk segment files; 0 disables the disk tier");
ABSL_FLAG(ByteSize, disk_segment_bytes, ByteSize{Defaults().store.disk_segment_bytes},
          "size at which a disk segment file is closed and a new one started");
ABSL_FLAG(double, disk_compaction_live_fraction, Defaults().store.disk_compaction_live_fraction,
          "a closed segment whose live fraction drops below this is compacted, 0..1");
ABSL_FLAG(ByteSize, rocksdb_capacity_bytes, ByteSize{Defaults().store.rocksdb_capacity_bytes},
          "bytes of cold span payload (compressed) in RocksDB; 0 keeps only the catalog there");
ABSL_FLAG(std::string, rocksdb_compression, Defaults().store.rocksdb_compression,
          "compression of cold spans in RocksDB: zstd, lz4 or none");
ABSL_FLAG(std::string, tenants_file, Defaults().tenants_file,
          "file of '<tenant_id> <token>' lines; when set every call needs "
          "'authorization: Bearer <token>'; empty: one default tenant, no auth");
ABSL_FLAG(ByteSize, max_message_bytes, ByteSize{Defaults().max_message_bytes},
          "largest gRPC message received or sent (payloads are streamed in chunks below it)");
ABSL_FLAG(ByteSize, max_span_bytes, ByteSize{Defaults().max_span_bytes},
          "largest span payload PutSpans accepts");
ABSL_FLAG(ByteSize, get_chunk_bytes, ByteSize{Defaults().get_chunk_bytes},
          "payload bytes per GetSpans response message unless the request asks for less");
ABSL_FLAG(int32_t, rpc_threads, Defaults().rpc_threads,
          "most threads serving RPCs at once; calls beyond get RESOURCE_EXHAUSTED");
ABSL_FLAG(int32_t, store_threads, Defaults().store_threads,
          "threads making the store calls of PutSpans and GetSpans (reactions never block)");
ABSL_FLAG(int32_t, completion_queues, Defaults().completion_queues,
          "completion queues of the gRPC server; 0: one per hardware thread");
ABSL_FLAG(ByteSize, http2_window_bytes, ByteSize{Defaults().http2_window_bytes},
          "initial HTTP/2 flow-control window; 0: gRPC's automatic sizing");
ABSL_FLAG(ByteSize, http2_max_frame_bytes, ByteSize{Defaults().http2_max_frame_bytes},
          "largest HTTP/2 DATA frame accepted (advertised to clients); 0: gRPC's 16 KiB");
ABSL_FLAG(int64_t, shutdown_grace_ms, Defaults().shutdown_grace_ms,
          "on SIGTERM/SIGINT, in-flight RPCs get this long to finish");
ABSL_FLAG(int32_t, metrics_port, Defaults().metrics_port,
          "serve Prometheus metrics on http://<listen host>:<port>/metrics; 0: off");
ABSL_FLAG(int32_t, index_build_threads, Defaults().index_build_threads,
          "index-build operations running at once (each uses every core)");
ABSL_FLAG(int64_t, context_idle_s, Defaults().context_idle_s,
          "an open retrieval context unused this long is closed (reopens on use)");
ABSL_FLAG(bool, persist_indexes, Defaults().persist_indexes,
          "keep built indexes in the RocksDB catalog, reloaded lazily after a restart");
ABSL_FLAG(ByteSize, max_artifact_bytes, ByteSize{Defaults().max_artifact_bytes},
          "largest per-model artifact (Loki bases, encoders, policies) accepted");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM server certificate (chain); with --tls_key_file the port serves TLS only");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "PEM CA bundle; when set clients must present a certificate it signed (mutual TLS)");
ABSL_FLAG(bool, insecure, false,
          "allow listening beyond loopback without TLS and a tenants file (logged loudly)");
ABSL_FLAG(bool, require_token_ids, Defaults().require_token_ids,
          "PutSpans headers must carry token ids, checked against the span hash");
ABSL_FLAG(ByteSize, max_inflight_bytes, ByteSize{Defaults().max_inflight_bytes},
          "bytes all calls together may buffer while being received");
ABSL_FLAG(int32_t, max_concurrent_streams, Defaults().max_concurrent_streams,
          "PutSpans and GetSpans calls served at once");
ABSL_FLAG(int32_t, max_queued_builds, Defaults().max_queued_builds,
          "index builds waiting to run, daemon-wide");
ABSL_FLAG(ByteSize, max_context_query_bytes, ByteSize{Defaults().max_context_query_bytes},
          "training queries one retrieval context keeps (f32 bytes)");
ABSL_FLAG(int32_t, tenant_contexts, 0, "open retrieval contexts per tenant; 0: no quota");
ABSL_FLAG(int32_t, tenant_builds, 0, "index builds queued or running per tenant; 0: no quota");
ABSL_FLAG(ByteSize, tenant_memory_bytes, ByteSize{0},
          "span payload one tenant holds in memory (its own spans make room); 0: no quota");
ABSL_FLAG(ByteSize, tenant_pinned_bytes, ByteSize{0},
          "span payload one tenant holds pinned; 0: no quota");
ABSL_FLAG(ByteSize, tenant_stored_bytes, ByteSize{0},
          "span payload one tenant holds in all tiers together (memory, disk, RocksDB); 0: no "
          "quota");
ABSL_FLAG(int64_t, tombstone_max_age_s, 7 * 24 * 3600,
          "miss tombstones (why a span is gone) older than this are collected");
ABSL_FLAG(std::string, port_file, Defaults().port_file,
          "when set, the bound gRPC port is written to this file once serving");

namespace kvrecall::daemon {

absl::StatusOr<rpc::ServerOptions> ServerOptionsFromFlags() {
  rpc::ServerOptions o;
  o.listen_address = absl::GetFlag(FLAGS_listen);
  o.store.data_dir = absl::GetFlag(FLAGS_data_dir);
  o.store.memory_capacity_bytes = absl::GetFlag(FLAGS_memory_capacity_bytes).bytes;
  o.store.memory_shards = absl::GetFlag(FLAGS_memory_shards);
  o.store.disk_capacity_bytes = absl::GetFlag(FLAGS_disk_capacity_bytes).bytes;
  o.store.disk_segment_bytes = absl::GetFlag(FLAGS_disk_segment_bytes).bytes;
  o.store.disk_compaction_live_fraction = absl::GetFlag(FLAGS_disk_compaction_live_fraction);
  o.store.rocksdb_capacity_bytes = absl::GetFlag(FLAGS_rocksdb_capacity_bytes).bytes;
  o.store.rocksdb_compression = absl::GetFlag(FLAGS_rocksdb_compression);
  o.tenants_file = absl::GetFlag(FLAGS_tenants_file);
  o.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes).bytes;
  o.max_span_bytes = absl::GetFlag(FLAGS_max_span_bytes).bytes;
  o.get_chunk_bytes = absl::GetFlag(FLAGS_get_chunk_bytes).bytes;
  o.rpc_threads = absl::GetFlag(FLAGS_rpc_threads);
  o.completion_queues = absl::GetFlag(FLAGS_completion_queues);
  o.store_threads = absl::GetFlag(FLAGS_store_threads);
  o.http2_window_bytes = absl::GetFlag(FLAGS_http2_window_bytes).bytes;
  o.http2_max_frame_bytes = absl::GetFlag(FLAGS_http2_max_frame_bytes).bytes;
  o.shutdown_grace_ms = absl::GetFlag(FLAGS_shutdown_grace_ms);
  o.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  o.port_file = absl::GetFlag(FLAGS_port_file);
  o.index_build_threads = absl::GetFlag(FLAGS_index_build_threads);
  o.context_idle_s = absl::GetFlag(FLAGS_context_idle_s);
  o.persist_indexes = absl::GetFlag(FLAGS_persist_indexes);
  o.max_artifact_bytes = absl::GetFlag(FLAGS_max_artifact_bytes).bytes;
  o.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  o.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  o.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file);
  o.insecure = absl::GetFlag(FLAGS_insecure);
  o.require_token_ids = absl::GetFlag(FLAGS_require_token_ids);
  o.max_inflight_bytes = absl::GetFlag(FLAGS_max_inflight_bytes).bytes;
  o.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  o.max_queued_builds = absl::GetFlag(FLAGS_max_queued_builds);
  o.max_context_query_bytes = absl::GetFlag(FLAGS_max_context_query_bytes).bytes;
  o.tenant_contexts = absl::GetFlag(FLAGS_tenant_contexts);
  o.tenant_builds = absl::GetFlag(FLAGS_tenant_builds);
  o.store.tenant_memory_bytes = absl::GetFlag(FLAGS_tenant_memory_bytes).bytes;
  o.store.tenant_pinned_bytes = absl::GetFlag(FLAGS_tenant_pinned_bytes).bytes;
  o.store.tenant_stored_bytes = absl::GetFlag(FLAGS_tenant_stored_bytes).bytes;
  o.store.tombstone_max_age = absl::Seconds(absl::GetFlag(FLAGS_tombstone_max_age_s));
  KVR_RETURN_IF_ERROR(rpc::ValidateServerOptions(o));
  return o;
}

}  // namespace kvrecall::daemon
