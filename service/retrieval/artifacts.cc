// RetrievalService: versioned per-model artifacts in the catalog.
#include "service/retrieval/retrieval_service.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/distance.h"
#include "index/index_factory.h"
#include "index/index_format.h"
#include "service/retrieval/retrieval_internal.h"

namespace kvrecall::retrieval {

using internal::ArtifactKey;
using internal::kArtifactSpace;
using internal::kTenantArtifactSpace;

// ---------------------------------------------------------------- artifacts

namespace {

// The catalog space and key prefix of a namespace: the shared one keeps the
// model-wide keys of earlier versions (model \0 kind \0 version); a
// tenant's keys start with the tenant id.
absl::string_view SpaceOf(bool shared) { return shared ? kArtifactSpace : kTenantArtifactSpace; }
std::string OwnerPrefix(absl::string_view tenant, bool shared) {
  return shared ? std::string() : absl::StrCat(tenant, absl::string_view("\0", 1));
}

absl::StatusOr<std::pair<ArtifactInfo, std::string>> DecodeArtifact(absl::string_view key,
                                                                     absl::string_view value,
                                                                     size_t owner_bytes,
                                                                     bool shared) {
  ArtifactInfo info;
  info.shared = shared;
  if (key.size() < owner_bytes) return absl::DataLossError("bad artifact key");
  key.remove_prefix(owner_bytes);
  // model \0 kind \0 version (8 bytes, big-endian; may contain zero bytes).
  const size_t a = key.find('\0');
  const size_t b = a == absl::string_view::npos ? a : key.find('\0', a + 1);
  if (b == absl::string_view::npos || key.size() != b + 9) {
    return absl::DataLossError("bad artifact key");
  }
  info.model_id = std::string(key.substr(0, a));
  info.kind = std::string(key.substr(a + 1, b - a - 1));
  for (char c : key.substr(b + 1)) info.version = (info.version << 8) | static_cast<unsigned char>(c);
  index::ByteReader r(value);
  KVR_ASSIGN_OR_RETURN(info.description, r.GetString());
  KVR_ASSIGN_OR_RETURN(int64_t created, r.Get<int64_t>());
  info.created = absl::FromUnixMicros(created);
  std::string bytes(value.substr(value.size() - r.remaining()));
  info.bytes = static_cast<int64_t>(bytes.size());
  return std::make_pair(std::move(info), std::move(bytes));
}

}  // namespace

absl::StatusOr<int64_t> RetrievalService::PutArtifact(absl::string_view tenant, bool shared,
                                                      absl::string_view model_id,
                                                      absl::string_view kind,
                                                      absl::string_view bytes,
                                                      absl::string_view description) {
  KVR_RETURN_IF_ERROR(store_->GetModel(model_id).status());
  if (kind.empty() || kind.find('\0') != absl::string_view::npos) {
    return absl::InvalidArgumentError("artifact kind must be a non-empty name");
  }
  absl::MutexLock lock(&mu_);  // versions are assigned one at a time
  const std::string owner = OwnerPrefix(tenant, shared);
  const std::string prefix = absl::StrCat(owner, model_id, absl::string_view("\0", 1), kind,
                                          absl::string_view("\0", 1));
  KVR_ASSIGN_OR_RETURN(auto existing, store_->CatalogScan(SpaceOf(shared), prefix));
  int64_t version = 1;
  if (!existing.empty()) {
    const std::string& last = existing.back().first;
    int64_t v = 0;
    for (size_t i = last.size() - 8; i < last.size(); ++i) {
      v = (v << 8) | static_cast<unsigned char>(last[i]);
    }
    version = v + 1;
  }
  std::string value;
  index::ByteWriter w(&value);
  w.PutString(description);
  w.Put<int64_t>(absl::ToUnixMicros(absl::Now()));
  w.PutBytes(bytes.data(), bytes.size());
  KVR_RETURN_IF_ERROR(store_->CatalogPut(SpaceOf(shared),
                                         owner + ArtifactKey(model_id, kind, version), value));
  return version;
}

absl::StatusOr<std::pair<ArtifactInfo, std::string>> RetrievalService::GetArtifact(
    absl::string_view tenant, bool shared, absl::string_view model_id, absl::string_view kind,
    int64_t version) const {
  if (version < 0) return absl::InvalidArgumentError("artifact version must be >= 0");
  const std::string owner = OwnerPrefix(tenant, shared);
  const absl::string_view where = shared ? " in the shared namespace" : "";
  if (version > 0) {
    const std::string key = owner + ArtifactKey(model_id, kind, version);
    auto value = store_->CatalogGet(SpaceOf(shared), key);
    if (!value.ok()) {
      if (absl::IsNotFound(value.status())) {
        return absl::NotFoundError(absl::StrCat("no artifact ", kind, " version ", version,
                                                " for model ", model_id, where));
      }
      return value.status();
    }
    return DecodeArtifact(key, *value, owner.size(), shared);
  }
  const std::string prefix = absl::StrCat(owner, model_id, absl::string_view("\0", 1), kind,
                                          absl::string_view("\0", 1));
  KVR_ASSIGN_OR_RETURN(auto all, store_->CatalogScan(SpaceOf(shared), prefix));
  if (all.empty()) {
    return absl::NotFoundError(absl::StrCat("no artifact ", kind, " for model ", model_id, where));
  }
  return DecodeArtifact(all.back().first, all.back().second, owner.size(), shared);
}

absl::StatusOr<std::vector<ArtifactInfo>> RetrievalService::ListArtifacts(
    absl::string_view tenant, absl::string_view model_id) const {
  std::vector<ArtifactInfo> out;
  for (bool shared : {false, true}) {
    const std::string owner = OwnerPrefix(tenant, shared);
    KVR_ASSIGN_OR_RETURN(auto all,
                         store_->CatalogScan(SpaceOf(shared),
                                             absl::StrCat(owner, model_id,
                                                          absl::string_view("\0", 1))));
    for (const auto& [key, value] : all) {
      KVR_ASSIGN_OR_RETURN(auto decoded, DecodeArtifact(key, value, owner.size(), shared));
      out.push_back(std::move(decoded.first));
    }
  }
  return out;
}

}  // namespace kvrecall::retrieval
