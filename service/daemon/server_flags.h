#pragma once

// The flags of kvrecalld and the one function that turns them into validated
// ServerOptions (docs/config.md lists every flag). Only kvrecalld's main()
// and this library's test read these flags.

#include <cstdint>
#include <string>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "service/rpc/server_options.h"

namespace kvrecall::daemon {

// A byte count flag: a plain number of bytes or a number with a binary
// suffix (K/KiB, M/MiB, G/GiB, T/TiB; case-insensitive), e.g. "4GiB".
struct ByteSize {
  int64_t bytes = 0;
};
bool AbslParseFlag(absl::string_view text, ByteSize* size, std::string* error);
std::string AbslUnparseFlag(ByteSize size);

// Reads every kvrecalld flag into ServerOptions and validates them.
// INVALID_ARGUMENT naming the flag when one is out of range.
absl::StatusOr<rpc::ServerOptions> ServerOptionsFromFlags();

}  // namespace kvrecall::daemon

ABSL_DECLARE_FLAG(std::string, listen);
ABSL_DECLARE_FLAG(std::string, data_dir);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, memory_capacity_bytes);
ABSL_DECLARE_FLAG(int32_t, memory_shards);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, disk_capacity_bytes);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, disk_segment_bytes);
ABSL_DECLARE_FLAG(double, disk_compaction_live_fraction);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, rocksdb_capacity_bytes);
ABSL_DECLARE_FLAG(std::string, rocksdb_compression);
ABSL_DECLARE_FLAG(std::string, tenants_file);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, max_message_bytes);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, max_span_bytes);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, get_chunk_bytes);
ABSL_DECLARE_FLAG(int32_t, rpc_threads);
ABSL_DECLARE_FLAG(int32_t, completion_queues);
ABSL_DECLARE_FLAG(int32_t, store_threads);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, http2_window_bytes);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, http2_max_frame_bytes);
ABSL_DECLARE_FLAG(int64_t, shutdown_grace_ms);
ABSL_DECLARE_FLAG(int32_t, metrics_port);
ABSL_DECLARE_FLAG(std::string, port_file);
ABSL_DECLARE_FLAG(std::string, tls_cert_file);
ABSL_DECLARE_FLAG(std::string, tls_key_file);
ABSL_DECLARE_FLAG(std::string, tls_client_ca_file);
ABSL_DECLARE_FLAG(bool, insecure);
ABSL_DECLARE_FLAG(bool, require_token_ids);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, max_inflight_bytes);
ABSL_DECLARE_FLAG(int32_t, max_concurrent_streams);
ABSL_DECLARE_FLAG(int32_t, max_queued_builds);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, max_context_query_bytes);
ABSL_DECLARE_FLAG(int32_t, tenant_contexts);
ABSL_DECLARE_FLAG(int32_t, tenant_builds);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, tenant_memory_bytes);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, tenant_pinned_bytes);
ABSL_DECLARE_FLAG(kvrecall::daemon::ByteSize, tenant_stored_bytes);
ABSL_DECLARE_FLAG(int64_t, tombstone_max_age_s);
