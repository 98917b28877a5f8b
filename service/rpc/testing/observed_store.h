#pragma once

// ObservedStore: the real TieredStore (opened on a directory, as kvrecalld
// opens it) with a count of Sync() calls, for tests of the RPC layer that
// check what the server asks of its store. Every call is forwarded
// unchanged, so the tests exercise the store's own validation and miss
// reasons. Test-only.

#include <atomic>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "service/store/tiered_store.h"

namespace kvrecall::rpc::testing {

// Thread-safe (as the store it wraps).
class ObservedStore final : public store::TieredStore {
 public:
  // Opens a TieredStore with `options` and wraps it (the signature of
  // rpc::StoreOpener). `*observed`, when not null, is set to the wrapper.
  static absl::StatusOr<std::unique_ptr<store::TieredStore>> Open(
      const store::TieredStoreOptions& options, ObservedStore** observed = nullptr) {
    auto inner = store::TieredStore::Open(options);
    if (!inner.ok()) return inner.status();
    auto wrapper = std::unique_ptr<ObservedStore>(new ObservedStore(*std::move(inner)));
    if (observed != nullptr) *observed = wrapper.get();
    return std::unique_ptr<store::TieredStore>(std::move(wrapper));
  }

  // Sync() calls so far.
  int sync_calls() const { return sync_calls_.load(); }

  absl::Status RegisterModel(const store::ModelGeometry& geometry) override {
    return inner_->RegisterModel(geometry);
  }
  absl::StatusOr<store::ModelGeometry> GetModel(absl::string_view model_id) const override {
    return inner_->GetModel(model_id);
  }
  std::vector<store::ModelGeometry> ListModels() const override { return inner_->ListModels(); }
  absl::StatusOr<store::PutOutcome> Put(store::StoredSpan span,
                                        const store::PutOptions& options) override {
    return inner_->Put(std::move(span), options);
  }
  store::GetResult Get(const store::SpanKey& key, absl::string_view model_id) override {
    return inner_->Get(key, model_id);
  }
  store::LookupResult Lookup(absl::string_view tenant, absl::string_view model_id,
                             absl::Span<const Hash128> chain) override {
    return inner_->Lookup(tenant, model_id, chain);
  }
  absl::Status Delete(const store::SpanKey& key) override { return inner_->Delete(key); }
  absl::Status Drop(const store::SpanKey& key) override { return inner_->Drop(key); }
  std::vector<store::SpanListing> ListSpans() const override { return inner_->ListSpans(); }
  absl::Status Pin(const store::SpanKey& key, absl::Duration ttl) override {
    return inner_->Pin(key, ttl);
  }
  absl::Status Unpin(const store::SpanKey& key) override { return inner_->Unpin(key); }
  store::StoreStats Stats() const override { return inner_->Stats(); }
  absl::Status CatalogPut(absl::string_view space, absl::string_view key,
                          absl::string_view value) override {
    return inner_->CatalogPut(space, key, value);
  }
  absl::StatusOr<std::string> CatalogGet(absl::string_view space,
                                         absl::string_view key) const override {
    return inner_->CatalogGet(space, key);
  }
  absl::Status CatalogDelete(absl::string_view space, absl::string_view key) override {
    return inner_->CatalogDelete(space, key);
  }
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> CatalogScan(
      absl::string_view space, absl::string_view prefix) const override {
    return inner_->CatalogScan(space, prefix);
  }
  absl::Status Sync() override {
    ++sync_calls_;
    return inner_->Sync();
  }

 private:
  explicit ObservedStore(std::unique_ptr<store::TieredStore> inner) : inner_(std::move(inner)) {}

  const std::unique_ptr<store::TieredStore> inner_;
  std::atomic<int> sync_calls_{0};
};

}  // namespace kvrecall::rpc::testing
