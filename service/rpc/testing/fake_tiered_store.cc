#include "service/rpc/testing/fake_tiered_store.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/checksum.h"
#include "common/span_hash.h"

namespace kvrecall::rpc::testing {

absl::StatusOr<std::unique_ptr<store::TieredStore>> FakeTieredStore::Open(
    const store::TieredStoreOptions& options) {
  if (options.data_dir.empty()) return absl::InvalidArgumentError("data_dir: required");
  auto fake = std::make_unique<FakeTieredStore>();
  fake->shares_namespace_ = options.shares_namespace;
  return std::unique_ptr<store::TieredStore>(std::move(fake));
}

absl::Status FakeTieredStore::RegisterModel(const store::ModelGeometry& g) {
  if (g.model_id.empty() || g.num_layers <= 0 || g.num_q_heads <= 0 || g.num_kv_heads <= 0 ||
      g.head_dim <= 0 || g.block_tokens <= 0) {
    return absl::InvalidArgumentError("bad geometry");
  }
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = models_.emplace(g.model_id, g);
  if (!inserted) {
    const auto& e = it->second;
    if (e.num_layers != g.num_layers || e.num_q_heads != g.num_q_heads ||
        e.num_kv_heads != g.num_kv_heads || e.head_dim != g.head_dim || e.dtype != g.dtype ||
        e.keys_post_rope != g.keys_post_rope || e.block_tokens != g.block_tokens) {
      return absl::AlreadyExistsError("model registered with another geometry");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<store::ModelGeometry> FakeTieredStore::GetModel(absl::string_view model_id) const {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(std::string(model_id));
  if (it == models_.end()) return absl::NotFoundError(absl::StrCat("unknown model ", model_id));
  return it->second;
}

std::vector<store::ModelGeometry> FakeTieredStore::ListModels() const {
  absl::MutexLock lock(&mu_);
  std::vector<store::ModelGeometry> out;
  for (const auto& [id, g] : models_) out.push_back(g);
  return out;
}

absl::StatusOr<store::PutOutcome> FakeTieredStore::Put(store::StoredSpan span,
                                                       const store::PutOptions& options) {
  absl::MutexLock lock(&mu_);
  auto model = models_.find(span.meta.model_id);
  if (model == models_.end()) return absl::NotFoundError("unknown model");
  const store::ModelGeometry& g = model->second;
  if (span.meta.num_tokens < 1 || span.meta.num_tokens > g.block_tokens) {
    return absl::InvalidArgumentError("num_tokens out of range");
  }
  if (static_cast<int64_t>(span.payload.size()) != g.SpanPayloadBytes(span.meta.num_tokens) ||
      span.meta.payload_bytes != static_cast<int64_t>(span.payload.size())) {
    return absl::InvalidArgumentError("payload size does not match the geometry");
  }
  if (!span.meta.token_ids.empty() &&
      (static_cast<int>(span.meta.token_ids.size()) != span.meta.num_tokens ||
       SpanHash(span.meta.parent, span.meta.token_ids) != span.key.hash)) {
    return absl::InvalidArgumentError("token ids do not hash to the span hash");
  }
  if (Checksum64(span.payload) != span.meta.payload_checksum) {
    return absl::DataLossError("payload checksum mismatch");
  }
  const bool parent_is_root = span.meta.parent == SpanRootHash(g.model_id, options.salt);
  auto parent = spans_.find(store::SpanKey{span.key.tenant, span.meta.parent});
  if (!parent_is_root && (parent == spans_.end() || parent->second.corrupt)) {
    return absl::FailedPreconditionError("parent is neither a stored span nor the model's root");
  }
  auto it = spans_.find(span.key);
  if (it != spans_.end()) {
    if (it->second.span->meta.payload_checksum != span.meta.payload_checksum) {
      return absl::AlreadyExistsError("the key holds a different payload");
    }
    store::PutOutcome outcome;
    outcome.already_present = true;
    return outcome;
  }
  span.meta.created = absl::Now();
  store::PutOutcome outcome;
  outcome.durable_tier = store::TierId::kDisk;
  tombstones_.erase(span.key);
  const store::SpanKey key = span.key;
  spans_[key].span = std::make_shared<const store::StoredSpan>(std::move(span));
  return outcome;
}

store::MissReason FakeTieredStore::MissReasonLocked(const store::SpanKey& key,
                                                    absl::string_view model_id) const {
  auto it = spans_.find(key);
  if (it != spans_.end()) {
    if (!model_id.empty() && it->second.span->meta.model_id != model_id) {
      return store::MissReason::kModelMismatch;
    }
    return store::MissReason::kNone;
  }
  auto tomb = tombstones_.find(key);
  if (tomb != tombstones_.end()) return tomb->second;
  for (const auto& [other, entry] : spans_) {
    if (other.hash == key.hash && other.tenant != key.tenant && shares_namespace_ &&
        shares_namespace_(key.tenant, other.tenant)) {
      return store::MissReason::kOtherNamespace;
    }
  }
  return store::MissReason::kNeverStored;
}

void FakeTieredStore::CountMissLocked(store::MissReason reason) { ++misses_[reason]; }

store::GetResult FakeTieredStore::Get(const store::SpanKey& key, absl::string_view model_id) {
  absl::MutexLock lock(&mu_);
  store::GetResult result;
  auto it = spans_.find(key);
  if (it != spans_.end() && it->second.corrupt) {
    spans_.erase(it);
    tombstones_[key] = store::MissReason::kChecksumFailure;
    ++checksum_failures_;
    result.miss = store::MissReason::kChecksumFailure;
    CountMissLocked(result.miss);
    return result;
  }
  result.miss = MissReasonLocked(key, model_id);
  if (result.miss != store::MissReason::kNone) {
    CountMissLocked(result.miss);
    return result;
  }
  ++hits_;
  result.span = spans_.at(key).span;
  result.tier = store::TierId::kMemory;
  return result;
}

store::LookupResult FakeTieredStore::Lookup(absl::string_view tenant, absl::string_view model_id,
                                            absl::Span<const Hash128> chain) {
  absl::MutexLock lock(&mu_);
  store::LookupResult result;
  bool broken = false;
  for (const Hash128& h : chain) {
    const store::SpanKey key{std::string(tenant), h};
    store::MissReason reason = MissReasonLocked(key, model_id);
    if (reason == store::MissReason::kNone && spans_.at(key).corrupt) {
      reason = store::MissReason::kChecksumFailure;
    }
    if (!broken && reason == store::MissReason::kNone) {
      ++result.prefix_spans;
      result.prefix_tokens += spans_.at(key).span->meta.num_tokens;
      continue;
    }
    broken = true;
    if (reason == store::MissReason::kNone) reason = store::MissReason::kParentMissing;
    CountMissLocked(reason);
    result.missing.push_back(reason);
  }
  return result;
}

absl::Status FakeTieredStore::Delete(const store::SpanKey& key) {
  absl::MutexLock lock(&mu_);
  auto it = spans_.find(key);
  if (it == spans_.end()) {
    return absl::NotFoundError(absl::StrCat(
        "span ", key.hash.ToHex(), " not found: ",
        static_cast<int>(MissReasonLocked(key, ""))));
  }
  spans_.erase(it);
  tombstones_[key] = store::MissReason::kDeleted;
  return absl::OkStatus();
}

absl::Status FakeTieredStore::Pin(const store::SpanKey& key, absl::Duration ttl) {
  absl::MutexLock lock(&mu_);
  auto it = spans_.find(key);
  if (it == spans_.end()) return absl::NotFoundError("span not found");
  ++it->second.pins;
  return absl::OkStatus();
}

absl::Status FakeTieredStore::Unpin(const store::SpanKey& key) {
  absl::MutexLock lock(&mu_);
  auto it = spans_.find(key);
  if (it == spans_.end()) return absl::NotFoundError("span not found");
  if (it->second.pins == 0) return absl::FailedPreconditionError("span is not pinned");
  --it->second.pins;
  return absl::OkStatus();
}

store::StoreStats FakeTieredStore::Stats() const {
  absl::MutexLock lock(&mu_);
  store::StoreStats stats;
  store::TierStats memory;
  memory.tier = store::TierId::kMemory;
  for (const auto& [key, entry] : spans_) {
    memory.bytes += static_cast<int64_t>(entry.span->payload.size());
    ++memory.spans;
    if (entry.pins > 0) ++stats.pinned_spans;
  }
  memory.hits = hits_;
  memory.checksum_failures = checksum_failures_;
  stats.tiers.push_back(memory);
  stats.misses_by_reason = misses_;
  stats.models = static_cast<int64_t>(models_.size());
  return stats;
}

absl::Status FakeTieredStore::CatalogPut(absl::string_view space, absl::string_view key,
                                         absl::string_view value) {
  absl::MutexLock lock(&mu_);
  catalog_[{std::string(space), std::string(key)}] = std::string(value);
  return absl::OkStatus();
}

absl::StatusOr<std::string> FakeTieredStore::CatalogGet(absl::string_view space,
                                                        absl::string_view key) const {
  absl::MutexLock lock(&mu_);
  auto it = catalog_.find({std::string(space), std::string(key)});
  if (it == catalog_.end()) return absl::NotFoundError("no such catalog key");
  return it->second;
}

absl::Status FakeTieredStore::CatalogDelete(absl::string_view space, absl::string_view key) {
  absl::MutexLock lock(&mu_);
  catalog_.erase({std::string(space), std::string(key)});
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> FakeTieredStore::CatalogScan(
    absl::string_view space, absl::string_view prefix) const {
  absl::MutexLock lock(&mu_);
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [k, v] : catalog_) {
    if (k.first == space && absl::StartsWith(k.second, prefix)) out.emplace_back(k.second, v);
  }
  return out;
}

absl::Status FakeTieredStore::Sync() {
  absl::MutexLock lock(&mu_);
  ++sync_calls_;
  return absl::OkStatus();
}

void FakeTieredStore::TEST_Corrupt(const store::SpanKey& key) {
  absl::MutexLock lock(&mu_);
  auto it = spans_.find(key);
  if (it != spans_.end()) it->second.corrupt = true;
}

void FakeTieredStore::TEST_Evict(const store::SpanKey& key) {
  absl::MutexLock lock(&mu_);
  if (spans_.erase(key) > 0) tombstones_[key] = store::MissReason::kEvicted;
}

int FakeTieredStore::TEST_SyncCalls() const {
  absl::MutexLock lock(&mu_);
  return sync_calls_;
}

int FakeTieredStore::TEST_PinCount(const store::SpanKey& key) const {
  absl::MutexLock lock(&mu_);
  auto it = spans_.find(key);
  return it == spans_.end() ? 0 : it->second.pins;
}

}  // namespace kvrecall::rpc::testing
