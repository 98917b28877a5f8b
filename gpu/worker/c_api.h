/* The C ABI of the decode worker (libkvrecall_worker.so): DecodeSession
 * (gpu/worker/decode_session.h) behind plain C types, so that any language
 * and any Python version (through ctypes) can drive it. Tensors are
 * backend pointers (CUDA device pointers with the "cuda" backend, host
 * pointers with "cpu") with the shapes documented per function; streams
 * are cudaStream_t values passed as void* (NULL: the default stream).
 *
 * Every function returns 0 on success or a status code (the canonical codes
 * of gRPC/absl: 3 INVALID_ARGUMENT, 5 NOT_FOUND, 8 RESOURCE_EXHAUSTED,
 * 9 FAILED_PRECONDITION, 13 INTERNAL, 14 UNAVAILABLE, ...); then
 * kvr_last_error() returns the message (per thread, valid until the
 * thread's next call).
 *
 * A session is driven by one thread at a time. */
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVR_C_API_VERSION 1

/* The library exports these functions only. */
#if defined(__GNUC__)
#define KVR_C_EXPORT __attribute__((visibility("default")))
#else
#define KVR_C_EXPORT
#endif

/* Element types (the values of kvrecall.v1.DType). */
#define KVR_DTYPE_F16 1
#define KVR_DTYPE_BF16 2

#define KVR_MODE_GPU_RESIDENT 0
#define KVR_MODE_OFFLOADED 1

#define KVR_REUSE_ATTEND_BY_POSITIONS 0
#define KVR_REUSE_FETCH_ROWS 1

typedef struct kvr_session kvr_session;

typedef struct kvr_session_options {
  /* Model geometry. */
  int32_t num_layers;
  int32_t num_q_heads;
  int32_t num_kv_heads;
  int32_t head_dim;        /* 64 or 128 */
  int32_t kv_dtype;        /* KVR_DTYPE_BF16 or KVR_DTYPE_F16 */
  /* Session. */
  int32_t batch_size;      /* sequences decoded in lockstep */
  int64_t capacity_tokens; /* positions per sequence (prompt + decoded) */
  int32_t page_size;       /* tokens per KV page; 0: 16 */
  int32_t mode;            /* KVR_MODE_* */
  int32_t graph_safe;      /* nonzero: size kernels for capacity (CUDA graph replays) */
  int32_t kv_pool_count;   /* benchmarks: layers share this many KV pools; 0: one per layer */
  const char* policy_json; /* the layer policy (docs/worker.md) */
  const char* backend;     /* "cpu" or "cuda" */
  /* Loki bases: num_layers pointers (NULL entries allowed), each
   * [num_kv_heads, head_dim, head_dim] f32 host memory for a layer that
   * selects with loki; may be NULL when no layer does. Copied. */
  const float* const* loki_components;
  /* Offloaded mode. */
  const char* target;       /* kvrecalld host:port */
  const char* bearer_token; /* may be NULL */
  const char* model_id;     /* the stored spans' model */
  int32_t reuse_transfer;   /* KVR_REUSE_* */
  int32_t append_chunk;     /* 0: window / 2 */
  int64_t deadline_ms;      /* per call; 0: 30000 */
} kvr_session_options;

typedef struct kvr_session_stats {
  int64_t steps;
  int64_t remote_calls;
  int64_t rpc_wait_us;
  int64_t server_us;
  int64_t server_search_us;
  int64_t server_attend_us;
  int64_t query_download_us;
  int64_t state_upload_us;
  int64_t append_us;
  int64_t gather_wait_us;
  int64_t bytes_sent;
  int64_t bytes_received;
} kvr_session_stats;

/* The message of this thread's last failed call ("" after a success). */
KVR_C_EXPORT const char* kvr_last_error(void);
/* KVR_C_API_VERSION of the library. */
KVR_C_EXPORT int32_t kvr_api_version(void);

/* Creates a session; *out receives it (free with kvr_session_destroy). */
KVR_C_EXPORT int32_t kvr_session_create(const kvr_session_options* options, kvr_session** out);
KVR_C_EXPORT void kvr_session_destroy(kvr_session* session);

/* Starts the sequences: prefix_tokens[batch_size]. Offloaded mode also
 * takes each sequence's stored prefix: chain_lengths[batch_size] span
 * counts and chain_hashes, the 16-byte span hashes of every chain one after
 * another (NULL for GPU-resident sessions). Builds missing indexes. */
KVR_C_EXPORT int32_t kvr_session_start_prefix(kvr_session* session, const int64_t* prefix_tokens,
                                 const uint8_t* chain_hashes, const int32_t* chain_lengths);

/* Loads one layer of the prompt: element (b, kv_head, t, d) of k and v at
 * [b * batch_stride + kv_head * head_stride + t * token_stride + d]. */
KVR_C_EXPORT int32_t kvr_session_load_prefix_layer(kvr_session* session, int32_t layer, const void* k,
                                      const void* v, int64_t num_tokens, int64_t batch_stride,
                                      int64_t head_stride, int64_t token_stride, void* stream);

/* One layer of a decode step: q [batch, num_q_heads, head_dim] f32,
 * k_new / v_new [batch, num_kv_heads, head_dim] kv dtype, out
 * [batch, num_q_heads, head_dim] f32. Layers in order 0..L-1 each step. */
KVR_C_EXPORT int32_t kvr_session_attend_layer(kvr_session* session, int32_t layer, const float* q,
                                 const void* k_new, const void* v_new, float* out, void* stream);

/* Positions of sequence `b` now. */
KVR_C_EXPORT int32_t kvr_session_seq_len(kvr_session* session, int32_t b, int64_t* out);

/* The positions `layer` selected at the last step for (sequence b, query
 * head h), excluding sinks and window: writes up to `capacity` of them and
 * their count to *count. */
KVR_C_EXPORT int32_t kvr_session_selection(kvr_session* session, int32_t layer, int32_t b, int32_t head,
                              int64_t* positions, int64_t capacity, int64_t* count, void* stream);

KVR_C_EXPORT int32_t kvr_session_stats_get(kvr_session* session, kvr_session_stats* out);
KVR_C_EXPORT int32_t kvr_session_stats_reset(kvr_session* session);

/* Validates a policy JSON and writes its one-line summary (NUL-terminated,
 * truncated to summary_bytes) when summary is not NULL. */
KVR_C_EXPORT int32_t kvr_policy_validate(const char* policy_json, char* summary, int64_t summary_bytes);

#ifdef __cplusplus
}
#endif
