#pragma once

// KvStoreServiceImpl: the kvrecall.v1.KvStore service over a TieredStore.
// Translates and validates requests, authenticates the caller's tenant,
// assembles streamed payloads and delegates to the store; nothing else.
//
// Most methods use gRPC's synchronous API: each call runs on a server thread
// and may block (the store syncs durable writes); the number of such threads
// is bounded by ServerOptions::rpc_threads. PutSpans and GetSpans, which move
// the payloads, are callback (reactor) methods with raw messages: PutSpans
// copies each chunk once, from the received slices into the span
// (service/rpc/put_stream.h); GetSpans sends payload bytes straight from the
// stored span (zero copy, the slices hold a reference to it). Their store
// calls run on a pool of store threads, never in a reaction.

#include <cstdint>

#include <memory>

#include "absl/status/status.h"
#include "common/thread_pool.h"
#include "kvrecall/v1/kv_store.grpc.pb.h"
#include "service/rpc/inflight_limiter.h"
#include "service/rpc/rpc_metrics.h"
#include "service/rpc/tenant_auth.h"
#include "service/store/tiered_store.h"

namespace kvrecall::rpc {

struct KvStoreServiceOptions {
  // Largest span payload PutSpans accepts, bytes (ServerOptions::max_span_bytes).
  int64_t max_span_bytes = int64_t{256} << 20;
  // Default GetSpans chunk, bytes (ServerOptions::get_chunk_bytes).
  int64_t get_chunk_bytes = int64_t{1} << 20;
  // Largest message, bytes (ServerOptions::max_message_bytes); chunks stay
  // 64 KiB below it.
  int64_t max_message_bytes = int64_t{16} << 20;
  // Threads making the store calls of PutSpans and GetSpans
  // (ServerOptions::store_threads).
  int32_t store_threads = 16;
  // PutSpans headers must carry token ids (ServerOptions::require_token_ids).
  bool require_token_ids = true;
  // Bounds buffered span payloads and concurrent PutSpans/GetSpans calls;
  // may be null (no bound). Not owned.
  InflightLimiter* limiter = nullptr;
};

class GetSpansReactor;
class PutSpansReactor;

// Thread-safe.
class KvStoreServiceImpl final
    : public v1::KvStore::WithRawCallbackMethod_GetSpans<
          v1::KvStore::WithRawCallbackMethod_PutSpans<v1::KvStore::Service>> {
 public:
  // None of the pointers is owned; all must outlive the service.
  KvStoreServiceImpl(store::TieredStore* store, const TenantAuthenticator* auth,
                     RpcMetrics* metrics, const KvStoreServiceOptions& options);

  grpc::Status RegisterModel(grpc::ServerContext* context, const v1::RegisterModelRequest* request,
                             v1::RegisterModelResponse* response) override;
  grpc::Status ListModels(grpc::ServerContext* context, const v1::ListModelsRequest* request,
                          v1::ListModelsResponse* response) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* PutSpans(grpc::CallbackServerContext* context,
                                                      grpc::ByteBuffer* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* GetSpans(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::Status Lookup(grpc::ServerContext* context, const v1::LookupRequest* request,
                      v1::LookupResponse* response) override;
  grpc::Status DeleteSpans(grpc::ServerContext* context, const v1::DeleteSpansRequest* request,
                           v1::DeleteSpansResponse* response) override;
  grpc::Status PinSpans(grpc::ServerContext* context, const v1::PinSpansRequest* request,
                        v1::PinSpansResponse* response) override;
  grpc::Status UnpinSpans(grpc::ServerContext* context, const v1::UnpinSpansRequest* request,
                          v1::UnpinSpansResponse* response) override;

 private:
  absl::Status DoRegisterModel(const v1::RegisterModelRequest& request,
                               v1::RegisterModelResponse* response);
  absl::Status DoLookup(const std::string& tenant, const v1::LookupRequest& request,
                        v1::LookupResponse* response);

  friend class GetSpansReactor;
  friend class PutSpansReactor;

  store::TieredStore* const store_;
  const TenantAuthenticator* const auth_;
  const KvStoreServiceOptions options_;
  RpcMethodMetrics* const register_model_metrics_;
  RpcMethodMetrics* const list_models_metrics_;
  RpcMethodMetrics* const put_spans_metrics_;
  RpcMethodMetrics* const get_spans_metrics_;
  RpcMethodMetrics* const lookup_metrics_;
  RpcMethodMetrics* const delete_spans_metrics_;
  RpcMethodMetrics* const pin_spans_metrics_;
  RpcMethodMetrics* const unpin_spans_metrics_;
  // Store calls of PutSpans and GetSpans; the last member, so joined first.
  std::unique_ptr<ThreadPool> store_workers_;
};

}  // namespace kvrecall::rpc
