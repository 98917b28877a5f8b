// The C ABI of the decode worker (gpu/worker/c_api.h) over DecodeSession.

#include "gpu/worker/c_api.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/types.h"
#include "gpu/worker/decode_session.h"
#include "gpu/worker/policy.h"

struct kvr_session {
  std::unique_ptr<kvrecall::worker::DecodeSession> session;
};

namespace {

thread_local std::string last_error;

int32_t Report(const absl::Status& s) {
  if (s.ok()) {
    last_error.clear();
    return 0;
  }
  last_error = std::string(s.message());
  return static_cast<int32_t>(s.code());
}

int32_t Invalid(const char* message) { return Report(absl::InvalidArgumentError(message)); }

}  // namespace

extern "C" {

const char* kvr_last_error(void) { return last_error.c_str(); }

int32_t kvr_api_version(void) { return KVR_C_API_VERSION; }

int32_t kvr_session_create(const kvr_session_options* o, kvr_session** out) {
  using namespace kvrecall::worker;
  if (o == nullptr || out == nullptr) return Invalid("options and out must not be NULL");
  *out = nullptr;
  if (o->policy_json == nullptr) return Invalid("policy_json must not be NULL");
  auto policy = ParsePolicyJson(o->policy_json);
  if (!policy.ok()) return Report(policy.status());
  SessionOptions so;
  so.model.num_layers = o->num_layers;
  so.model.num_q_heads = o->num_q_heads;
  so.model.num_kv_heads = o->num_kv_heads;
  so.model.head_dim = o->head_dim;
  if (o->kv_dtype == KVR_DTYPE_BF16) {
    so.model.kv_dtype = kvrecall::gpu::DType::kBf16;
  } else if (o->kv_dtype == KVR_DTYPE_F16) {
    so.model.kv_dtype = kvrecall::gpu::DType::kF16;
  } else {
    return Invalid("kv_dtype must be KVR_DTYPE_BF16 or KVR_DTYPE_F16");
  }
  so.policy = *std::move(policy);
  so.batch_size = o->batch_size;
  so.capacity_tokens = o->capacity_tokens;
  so.page_size = o->page_size > 0 ? o->page_size : 16;
  if (o->mode != KVR_MODE_GPU_RESIDENT && o->mode != KVR_MODE_OFFLOADED) {
    return Invalid("mode must be KVR_MODE_GPU_RESIDENT or KVR_MODE_OFFLOADED");
  }
  so.mode = o->mode == KVR_MODE_OFFLOADED ? KvMode::kOffloaded : KvMode::kGpuResident;
  so.graph_safe = o->graph_safe != 0;
  so.kv_pool_count = o->kv_pool_count;
  if (o->loki_components != nullptr && o->num_layers > 0) {
    const size_t n = static_cast<size_t>(std::max(0, o->num_kv_heads)) * std::max(0, o->head_dim) *
                     std::max(0, o->head_dim);
    so.loki_components.resize(o->num_layers);
    for (int32_t l = 0; l < o->num_layers; ++l) {
      if (o->loki_components[l] != nullptr) {
        so.loki_components[l].assign(o->loki_components[l], o->loki_components[l] + n);
      }
    }
  }
  if (so.mode == KvMode::kOffloaded) {
    if (o->target == nullptr || o->model_id == nullptr) {
      return Invalid("offloaded mode needs target and model_id");
    }
    so.client.target = o->target;
    if (o->bearer_token != nullptr) so.client.bearer_token = o->bearer_token;
    if (o->deadline_ms > 0) so.client.deadline_ms = o->deadline_ms;
    so.model_id = o->model_id;
    if (o->reuse_transfer != KVR_REUSE_ATTEND_BY_POSITIONS && o->reuse_transfer != KVR_REUSE_FETCH_ROWS) {
      return Invalid("reuse_transfer must be KVR_REUSE_ATTEND_BY_POSITIONS or KVR_REUSE_FETCH_ROWS");
    }
    so.reuse_transfer = o->reuse_transfer == KVR_REUSE_FETCH_ROWS ? ReuseTransfer::kFetchRows
                                                                  : ReuseTransfer::kAttendByPositions;
    so.append_chunk = o->append_chunk;
  }
  auto backend = CreateBackend(o->backend != nullptr ? o->backend : "cpu");
  if (!backend.ok()) return Report(backend.status());
  auto session = DecodeSession::Create(so, *std::move(backend));
  if (!session.ok()) return Report(session.status());
  *out = new kvr_session{*std::move(session)};
  return Report(absl::OkStatus());
}

void kvr_session_destroy(kvr_session* session) { delete session; }

int32_t kvr_session_start_prefix(kvr_session* s, const int64_t* prefix_tokens,
                                 const uint8_t* chain_hashes, const int32_t* chain_lengths) {
  if (s == nullptr || prefix_tokens == nullptr) return Invalid("session and prefix_tokens must not be NULL");
  const int32_t batch = s->session->options().batch_size;
  std::vector<int64_t> lens(prefix_tokens, prefix_tokens + batch);
  std::vector<std::vector<kvrecall::Hash128>> chains;
  if (chain_hashes != nullptr) {
    if (chain_lengths == nullptr) return Invalid("chain_lengths must accompany chain_hashes");
    const uint8_t* p = chain_hashes;
    for (int32_t b = 0; b < batch; ++b) {
      if (chain_lengths[b] < 0) return Invalid("chain_lengths must not be negative");
      std::vector<kvrecall::Hash128> chain;
      for (int32_t i = 0; i < chain_lengths[b]; ++i, p += 16) {
        auto h = kvrecall::Hash128::FromBytes(absl::string_view(reinterpret_cast<const char*>(p), 16));
        if (!h.ok()) return Report(h.status());
        chain.push_back(*h);
      }
      chains.push_back(std::move(chain));
    }
  }
  return Report(s->session->StartPrefix(lens, chains));
}

int32_t kvr_session_load_prefix_layer(kvr_session* s, int32_t layer, const void* k, const void* v,
                                      int64_t num_tokens, int64_t batch_stride, int64_t head_stride,
                                      int64_t token_stride, void* stream) {
  if (s == nullptr || k == nullptr || v == nullptr) return Invalid("session, k and v must not be NULL");
  return Report(s->session->LoadPrefixLayer(layer, k, v, num_tokens, batch_stride, head_stride,
                                            token_stride, stream));
}

int32_t kvr_session_attend_layer(kvr_session* s, int32_t layer, const float* q, const void* k_new,
                                 const void* v_new, float* out, void* stream) {
  if (s == nullptr) return Invalid("session must not be NULL");
  return Report(s->session->AttendLayer(layer, q, k_new, v_new, out, stream));
}

int32_t kvr_session_seq_len(kvr_session* s, int32_t b, int64_t* out) {
  if (s == nullptr || out == nullptr) return Invalid("session and out must not be NULL");
  const auto& lens = s->session->seq_lens();
  if (b < 0 || b >= static_cast<int32_t>(lens.size())) return Invalid("sequence index out of range");
  *out = lens[b];
  return Report(absl::OkStatus());
}

int32_t kvr_session_selection(kvr_session* s, int32_t layer, int32_t b, int32_t head,
                              int64_t* positions, int64_t capacity, int64_t* count, void* stream) {
  if (s == nullptr || count == nullptr) return Invalid("session and count must not be NULL");
  auto sel = s->session->Selection(layer, stream);
  if (!sel.ok()) return Report(sel.status());
  if (b < 0 || b >= static_cast<int32_t>(sel->size()) || head < 0 ||
      head >= static_cast<int32_t>((*sel)[b].size())) {
    return Invalid("sequence or head index out of range");
  }
  const auto& list = (*sel)[b][head];
  *count = static_cast<int64_t>(list.size());
  if (positions != nullptr) {
    std::copy_n(list.begin(), std::min<int64_t>(capacity, *count), positions);
  }
  return Report(absl::OkStatus());
}

int32_t kvr_session_stats_get(kvr_session* s, kvr_session_stats* out) {
  if (s == nullptr || out == nullptr) return Invalid("session and out must not be NULL");
  const kvrecall::worker::SessionStats& st = s->session->stats();
  out->steps = st.steps;
  out->remote_calls = st.remote_calls;
  out->rpc_wait_us = st.rpc_wait_us;
  out->server_us = st.server_us;
  out->server_search_us = st.server_search_us;
  out->server_attend_us = st.server_attend_us;
  out->query_download_us = st.query_download_us;
  out->state_upload_us = st.state_upload_us;
  out->append_us = st.append_us;
  out->gather_wait_us = st.gather_wait_us;
  out->bytes_sent = st.bytes_sent;
  out->bytes_received = st.bytes_received;
  return Report(absl::OkStatus());
}

int32_t kvr_session_stats_reset(kvr_session* s) {
  if (s == nullptr) return Invalid("session must not be NULL");
  s->session->ResetStats();
  return Report(absl::OkStatus());
}

int32_t kvr_policy_validate(const char* policy_json, char* summary, int64_t summary_bytes) {
  if (policy_json == nullptr) return Invalid("policy_json must not be NULL");
  auto p = kvrecall::worker::ParsePolicyJson(policy_json);
  if (!p.ok()) return Report(p.status());
  if (summary != nullptr && summary_bytes > 0) {
    const std::string text = kvrecall::worker::PolicySummary(*p);
    const size_t n = std::min<size_t>(text.size(), static_cast<size_t>(summary_bytes - 1));
    std::memcpy(summary, text.data(), n);
    summary[n] = '\0';
  }
  return Report(absl::OkStatus());
}

}  // extern "C"
