#pragma once

// FakeTieredStore: an in-memory TieredStore for tests of the RPC layer. One
// tier (memory), no capacity limit, the validation and miss reasons of the
// TieredStore contract, plus hooks to simulate what a real store meets
// (corrupt records, evictions).

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "service/store/tiered_store.h"

namespace kvrecall::rpc::testing {

// Thread-safe.
class FakeTieredStore final : public store::TieredStore {
 public:
  // Opens a fake with the TieredStore signature (for Server::Create).
  static absl::StatusOr<std::unique_ptr<store::TieredStore>> Open(
      const store::TieredStoreOptions& options);

  absl::Status RegisterModel(const store::ModelGeometry& geometry) override;
  absl::StatusOr<store::ModelGeometry> GetModel(absl::string_view model_id) const override;
  std::vector<store::ModelGeometry> ListModels() const override;
  absl::StatusOr<store::PutOutcome> Put(store::StoredSpan span,
                                        const store::PutOptions& options) override;
  store::GetResult Get(const store::SpanKey& key, absl::string_view model_id) override;
  store::LookupResult Lookup(absl::string_view tenant, absl::string_view model_id,
                             absl::Span<const Hash128> chain) override;
  absl::Status Delete(const store::SpanKey& key) override;
  absl::Status Pin(const store::SpanKey& key, absl::Duration ttl) override;
  absl::Status Unpin(const store::SpanKey& key) override;
  store::StoreStats Stats() const override;
  absl::Status CatalogPut(absl::string_view space, absl::string_view key,
                          absl::string_view value) override;
  absl::StatusOr<std::string> CatalogGet(absl::string_view space,
                                         absl::string_view key) const override;
  absl::Status CatalogDelete(absl::string_view space, absl::string_view key) override;
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> CatalogScan(
      absl::string_view space, absl::string_view prefix) const override;
  absl::Status Sync() override;

  // The next Get of `key` finds its record corrupt: it is dropped, counted
  // and reported as kChecksumFailure.
  void TEST_Corrupt(const store::SpanKey& key) ABSL_LOCKS_EXCLUDED(mu_);
  // Drops `key` as if evicted from every tier.
  void TEST_Evict(const store::SpanKey& key) ABSL_LOCKS_EXCLUDED(mu_);
  int TEST_SyncCalls() const ABSL_LOCKS_EXCLUDED(mu_);
  int TEST_PinCount(const store::SpanKey& key) const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Entry {
    store::StoredSpanPtr span;
    bool corrupt = false;
    int pins = 0;
  };
  store::MissReason MissReasonLocked(const store::SpanKey& key, absl::string_view model_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CountMissLocked(store::MissReason reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::map<std::string, store::ModelGeometry> models_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<store::SpanKey, Entry> spans_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<store::SpanKey, store::MissReason> tombstones_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, std::string>, std::string> catalog_ ABSL_GUARDED_BY(mu_);
  std::map<store::MissReason, int64_t> misses_ ABSL_GUARDED_BY(mu_);
  int64_t hits_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t checksum_failures_ ABSL_GUARDED_BY(mu_) = 0;
  int sync_calls_ ABSL_GUARDED_BY(mu_) = 0;
  std::function<bool(absl::string_view, absl::string_view)> shares_namespace_;  // set once
};

}  // namespace kvrecall::rpc::testing
