#pragma once

// Options of KvStoreClient (clients/cpp/kv_store_client.h).

#include <cstdint>
#include <memory>
#include <string>

namespace grpc {
class Channel;
}

namespace kvrecall::client {

struct ClientOptions {
  // host:port of kvrecalld. Default "127.0.0.1:7878".
  std::string target = "127.0.0.1:7878";
  // Sent as `authorization: Bearer <token>` when non-empty (daemons with a
  // tenants file). Default empty.
  std::string bearer_token;

  // TLS (docs/security.md). Dial `target` over TLS when `tls` is true or any
  // file below is set. tls_root_ca_file: PEM CA bundle that signed the
  // daemon's certificate (empty: the system's roots). tls_client_cert_file /
  // tls_client_key_file: this client's PEM certificate and key, for daemons
  // that require client certificates (--tls_client_ca_file); both or neither.
  bool tls = false;
  std::string tls_root_ca_file;
  std::string tls_client_cert_file;
  std::string tls_client_key_file;
  // The name the daemon's certificate must carry, when it differs from
  // target's host (e.g. dialing an IP address). Default empty.
  std::string tls_server_name;

  // Deadline of every call, in milliseconds, covering its retries (for a
  // stream: the whole stream). Default 30000; must be > 0.
  int64_t deadline_ms = 30000;
  // Attempts per call when the daemon is UNAVAILABLE (not running, starting,
  // shutting down). 1 disables retries. Default 4; range 1..100.
  int32_t max_attempts = 4;
  // Backoff before the first retry, in milliseconds; grows by
  // backoff_multiplier per retry up to max_backoff_ms, each wait randomised
  // by +-jitter (a fraction). Defaults 50 ms, x2, 2000 ms, 0.2.
  int64_t initial_backoff_ms = 50;
  double backoff_multiplier = 2.0;
  int64_t max_backoff_ms = 2000;
  double jitter = 0.2;

  // Payload bytes per PutSpans message (spans larger than this are sent in
  // several messages). Default 1 MiB; range 4 KiB..max_message_bytes - 64 KiB.
  int64_t chunk_bytes = int64_t{1} << 20;
  // Payload bytes per GetSpans message asked of the server; 0 takes the
  // server's default. Default 0.
  int64_t get_chunk_bytes = 0;
  // Largest gRPC message sent or received, in bytes. Default 16 MiB (the
  // daemon's default --max_message_bytes).
  int64_t max_message_bytes = int64_t{16} << 20;
  // Initial HTTP/2 flow-control window in bytes; 0 keeps gRPC's automatic
  // sizing. Default 0.
  int64_t http2_window_bytes = 0;
  // Largest HTTP/2 DATA frame this client accepts (advertised to the
  // daemon, which then sends GetSpans payloads in frames up to it); 0 keeps
  // gRPC's 16 KiB. Default 0.
  int64_t http2_max_frame_bytes = 0;
  // Use a TCP connection of this client's own instead of sharing one with
  // the other clients of the same target in the process (gRPC's default).
  // Default false.
  bool dedicated_connection = false;
  // Verify each fetched payload against the XXH3-64 the server sends (a
  // mismatch fails the call with DATA_LOSS). Default true.
  bool verify_checksums = true;

  // When set, calls go over this channel instead of dialing `target` (e.g.
  // Server::InProcessChannel() in tests and in-process engines).
  std::shared_ptr<grpc::Channel> channel;
};

}  // namespace kvrecall::client
