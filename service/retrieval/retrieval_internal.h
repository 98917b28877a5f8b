#pragma once

// Internal to service/retrieval: the catalog key encodings of contexts,
// indexes and artifacts (docs/formats/retrieval_catalog.md), the private
// structs of RetrievalService, and small validation helpers.

#include <atomic>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/types/span.h"
#include "common/status_macros.h"
#include "index/index_format.h"
#include "service/retrieval/retrieval_service.h"

namespace kvrecall::retrieval::internal {

// Catalog spaces.
inline constexpr absl::string_view kContextSpace = "context";
inline constexpr absl::string_view kIndexSpace = "index";
inline constexpr absl::string_view kIndexLatestSpace = "index_latest";
// The shared namespace of artifacts (keys: model \0 kind \0 version), and
// the tenants' own (keys: tenant \0 model \0 kind \0 version).
inline constexpr absl::string_view kArtifactSpace = "artifact";
inline constexpr absl::string_view kTenantArtifactSpace = "tenant_artifact";

inline int64_t MicrosSince(absl::Time start) {
  return absl::ToInt64Microseconds(absl::Now() - start);
}

// "tenant\0<context hex>|" : the prefix of every index key of a context.
inline std::string ContextIndexPrefix(absl::string_view tenant, const Hash128& context) {
  return absl::StrCat(tenant, absl::string_view("\0", 1), context.ToHex(), "|");
}

// Index key: prefix + layer|kv_head|kind|params (layer and head zero-padded
// so that catalog scans list them in order).
inline std::string IndexKey(absl::string_view tenant, const Hash128& context, int32_t layer,
                     int32_t kv_head, absl::string_view kind, absl::string_view params) {
  char lh[32];
  std::snprintf(lh, sizeof(lh), "%05d|%04d|", layer, kv_head);
  return absl::StrCat(ContextIndexPrefix(tenant, context), lh, kind, "|", params);
}

inline std::string IndexLatestKey(absl::string_view tenant, const Hash128& context, int32_t layer,
                           int32_t kv_head, absl::string_view kind) {
  return IndexKey(tenant, context, layer, kv_head, kind, "");
}

inline std::string ContextRecordKey(absl::string_view tenant, const Hash128& context) {
  return absl::StrCat(tenant, absl::string_view("\0", 1), context.ToBytes());
}

inline std::string EncodeContextRecord(absl::string_view model_id, absl::Span<const Hash128> chain) {
  std::string out;
  index::ByteWriter w(&out);
  w.PutString(model_id);
  w.Put<uint32_t>(static_cast<uint32_t>(chain.size()));
  for (const Hash128& h : chain) w.PutBytes(h.ToBytes().data(), 16);
  return out;
}

inline absl::StatusOr<std::pair<std::string, std::vector<Hash128>>> DecodeContextRecord(
    absl::string_view bytes) {
  index::ByteReader r(bytes);
  KVR_ASSIGN_OR_RETURN(std::string model, r.GetString());
  KVR_ASSIGN_OR_RETURN(uint32_t n, r.Get<uint32_t>());
  std::vector<Hash128> chain;
  for (uint32_t i = 0; i < n; ++i) {
    char buf[16];
    KVR_RETURN_IF_ERROR(r.GetBytes(buf, 16));
    KVR_ASSIGN_OR_RETURN(Hash128 h, Hash128::FromBytes(absl::string_view(buf, 16)));
    chain.push_back(h);
  }
  return std::make_pair(std::move(model), std::move(chain));
}

inline std::string ArtifactKey(absl::string_view model, absl::string_view kind, int64_t version) {
  std::string key = absl::StrCat(model, absl::string_view("\0", 1), kind, absl::string_view("\0", 1));
  for (int i = 7; i >= 0; --i) key.push_back(static_cast<char>((version >> (8 * i)) & 0xff));
  return key;
}

inline absl::Status CheckFinite(absl::Span<const float> values, absl::string_view what) {
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " element ", i, " is ", values[i], "; queries must be finite"));
    }
  }
  return absl::OkStatus();
}

inline absl::Status CheckDeadline(absl::Time deadline, absl::string_view what) {
  if (absl::Now() >= deadline) {
    return absl::DeadlineExceededError(absl::StrCat("deadline exceeded ", what));
  }
  return absl::OkStatus();
}


}  // namespace kvrecall::retrieval::internal

namespace kvrecall::retrieval {

struct RetrievalService::LoadedIndex {
  std::string key;
  int32_t layer = 0;
  int32_t kv_head = 0;
  std::string kind;
  std::string params;
  mutable absl::Mutex mu;  // readers: Search; writer: Add
  std::unique_ptr<index::KeyIndex> index ABSL_GUARDED_BY(mu);
};

// Adds to `index` the keys of (layer, kv_head) that `ctx` holds beyond the
// index's positions (tokens appended since it was built or persisted).
// REQUIRES: the caller holds the index's write lock.
inline absl::Status CatchUpIndex(const Context& ctx, int32_t layer, int32_t kv_head,
                                 index::KeyIndex* index) {
  const int64_t have = index->size();
  const int64_t want = ctx.num_tokens(layer);
  if (want <= have) return absl::OkStatus();
  const std::string keys = ctx.GatherKeys(layer, kv_head, have, want);
  const auto& m = ctx.model();
  return index->Add(index::VectorView{keys.data(), want - have, m.head_dim, m.dtype, 0});
}

struct RetrievalService::OpenContextEntry {
  std::shared_ptr<Context> context;
  absl::Time last_used;
};

struct RetrievalService::Operation {
  std::string tenant;         // the owner; nobody else sees it
  OperationInfo info;         // guarded by RetrievalService::mu_
  absl::Time started;
  std::atomic<bool> cancel{false};
};

}  // namespace kvrecall::retrieval
