#include "service/store/memory_tier.h"

#include <algorithm>
#include <utility>

#include "absl/hash/hash.h"
#include "absl/memory/memory.h"
#include "absl/strings/str_cat.h"

namespace kvrecall::store {

namespace {

enum class Where : uint8_t { kProbation, kProtected, kPinned, kLeaving };

}  // namespace

struct MemoryTier::Entry {
  StoredSpanPtr span;
  int64_t charge = 0;
  Where where = Where::kProbation;
  std::list<Entry*>::iterator pos;  // in the list of `where`; unused when kLeaving
  std::vector<absl::Time> pins;     // deadline of each pin held
};

// Lists keep the least recently used entry at the front.
struct MemoryTier::Shard {
  mutable absl::Mutex mu;
  absl::flat_hash_map<SpanKey, std::unique_ptr<Entry>> map ABSL_GUARDED_BY(mu);
  std::list<Entry*> probation ABSL_GUARDED_BY(mu);
  std::list<Entry*> protected_list ABSL_GUARDED_BY(mu);
  std::list<Entry*> pinned ABSL_GUARDED_BY(mu);
  int64_t usage ABSL_GUARDED_BY(mu) = 0;  // charge of every entry
  int64_t protected_bytes ABSL_GUARDED_BY(mu) = 0;
  int64_t pinned_bytes ABSL_GUARDED_BY(mu) = 0;
  int64_t leaving_bytes ABSL_GUARDED_BY(mu) = 0;
  absl::Time next_pin_expiry ABSL_GUARDED_BY(mu) = absl::InfiniteFuture();
  // Live (not leaving) bytes per tenant, for the per-tenant quota.
  absl::flat_hash_map<std::string, int64_t> tenant_live ABSL_GUARDED_BY(mu);
  PinLedger* ledger = nullptr;  // set once by MemoryTier

  std::list<Entry*>* ListOf(Where w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    switch (w) {
      case Where::kProbation:
        return &probation;
      case Where::kProtected:
        return &protected_list;
      case Where::kPinned:
        return &pinned;
      case Where::kLeaving:
        return nullptr;
    }
    return nullptr;
  }

  // Takes `e` out of its list (or out of the leaving set).
  void Unlink(Entry* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (e->where == Where::kLeaving) {
      leaving_bytes -= e->charge;
    } else {
      ListOf(e->where)->erase(e->pos);
      if (e->where == Where::kProtected) protected_bytes -= e->charge;
      if (e->where == Where::kPinned) {
        pinned_bytes -= e->charge;
        ledger->Add(e->span->key.tenant, -e->charge);
      }
      auto t = tenant_live.find(e->span->key.tenant);
      if ((t->second -= e->charge) == 0) tenant_live.erase(t);
    }
  }

  void Link(Entry* e, Where w, int64_t protected_capacity) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    e->where = w;
    if (w == Where::kLeaving) {
      leaving_bytes += e->charge;
      return;
    }
    std::list<Entry*>* list = ListOf(w);
    e->pos = list->insert(list->end(), e);
    tenant_live[e->span->key.tenant] += e->charge;
    if (w == Where::kPinned) {
      pinned_bytes += e->charge;
      ledger->Add(e->span->key.tenant, e->charge);
    }
    if (w == Where::kProtected) {
      protected_bytes += e->charge;
      // Overflowing protected entries fall back to the MRU end of probation.
      while (protected_bytes > protected_capacity && protected_list.size() > 1) {
        Entry* old = protected_list.front();
        Unlink(old);
        Link(old, Where::kProbation, protected_capacity);
      }
    }
  }

  // Drops expired pins; spans left without pins return to the protected segment.
  void ReleaseExpiredPins(absl::Time now, int64_t protected_capacity)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (now < next_pin_expiry) return;
    absl::Time next = absl::InfiniteFuture();
    for (auto it = pinned.begin(); it != pinned.end();) {
      Entry* e = *it++;
      e->pins.erase(
          std::remove_if(e->pins.begin(), e->pins.end(), [now](absl::Time d) { return d <= now; }),
          e->pins.end());
      if (e->pins.empty()) {
        Unlink(e);
        Link(e, Where::kProtected, protected_capacity);
      } else {
        next = std::min(next, *std::min_element(e->pins.begin(), e->pins.end()));
      }
    }
    next_pin_expiry = next;
  }
};

MemoryTier::MemoryTier(const MemoryTierOptions& options)
    : options_(options),
      shard_capacity_((options.capacity_bytes + options.shards - 1) / options.shards),
      protected_capacity_(
          static_cast<int64_t>(static_cast<double>(shard_capacity_) * options.protected_fraction)),
      tenant_shard_capacity_(options.tenant_capacity_bytes <= 0
                                 ? 0
                                 : (options.tenant_capacity_bytes + options.shards - 1) /
                                       options.shards),
      shards_(new Shard[options.shards]),
      metrics_(TierId::kMemory, options.capacity_bytes, options.metrics) {
  for (int32_t i = 0; i < options.shards; ++i) shards_[i].ledger = &pins_;
}

void MemoryTier::PinLedger::Add(const std::string& tenant, int64_t n) {
  absl::MutexLock lock(&mu);
  auto it = bytes.find(tenant);
  if (it == bytes.end()) {
    bytes.emplace(tenant, n);
  } else if ((it->second += n) == 0) {
    bytes.erase(it);
  }
}

int64_t MemoryTier::PinLedger::Get(const std::string& tenant) const {
  absl::MutexLock lock(&mu);
  auto it = bytes.find(tenant);
  return it == bytes.end() ? 0 : it->second;
}

int64_t MemoryTier::TenantPinnedBytes(const std::string& tenant) const {
  return pins_.Get(tenant);
}

MemoryTier::~MemoryTier() = default;

absl::StatusOr<std::unique_ptr<MemoryTier>> MemoryTier::Create(const MemoryTierOptions& options) {
  if (options.capacity_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory capacity_bytes must be > 0, got ", options.capacity_bytes));
  }
  if (options.shards < 1 || options.shards > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory shards must be in 1..256, got ", options.shards));
  }
  if (!(options.protected_fraction >= 0.0 && options.protected_fraction <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "memory protected_fraction must be in 0..1, got ", options.protected_fraction));
  }
  return absl::WrapUnique(new MemoryTier(options));
}

MemoryTier::Shard& MemoryTier::ShardFor(const SpanKey& key) const {
  // The span hash is already uniform; mix in the tenant so that one hash
  // stored by many tenants spreads too.
  const uint64_t h = key.hash.low ^ (key.hash.high * 0x9e3779b97f4a7c15ULL) ^
                     (key.tenant.empty() ? 0 : absl::HashOf(key.tenant));
  return shards_[h % static_cast<uint64_t>(options_.shards)];
}

absl::Time MemoryTier::Now() const { return options_.clock ? options_.clock() : absl::Now(); }

absl::Status MemoryTier::Put(StoredSpanPtr span, const TierPutOptions& options,
                             std::vector<SpanKey>* victims) {
  victims->clear();
  const int64_t charge = static_cast<int64_t>(span->payload.size());
  if (charge > shard_capacity_) {
    return absl::ResourceExhaustedError(absl::StrCat("span of ", charge,
                                                     " bytes exceeds a memory shard's capacity (",
                                                     shard_capacity_, " bytes)"));
  }
  const absl::Time now = Now();
  Shard& shard = ShardFor(span->key);
  absl::MutexLock lock(&shard.mu);
  shard.ReleaseExpiredPins(now, protected_capacity_);

  auto it = shard.map.find(span->key);
  Entry* existing = it == shard.map.end() ? nullptr : it->second.get();
  const bool existing_pinned = existing != nullptr && existing->where == Where::kPinned;
  const bool existing_evictable = existing != nullptr && existing->where != Where::kPinned &&
                                  existing->where != Where::kLeaving;
  const int64_t existing_live =
      existing != nullptr && existing->where != Where::kLeaving ? existing->charge : 0;

  // Check first, so that a refusal changes nothing.
  if (existing_pinned && shard.pinned_bytes - existing->charge + charge > shard_capacity_) {
    return absl::ResourceExhaustedError("a pinned span cannot grow past its shard's capacity");
  }
  const int64_t live = shard.usage - shard.leaving_bytes - existing_live;
  const int64_t evictable = shard.usage - shard.pinned_bytes - shard.leaving_bytes -
                            (existing_evictable ? existing->charge : 0);
  int64_t need = live + charge - shard_capacity_;
  if (need > evictable) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "memory shard full: ", shard.pinned_bytes, " of ", shard_capacity_, " bytes pinned, ",
        shard.leaving_bytes, " bytes still being demoted; span needs ", charge));
  }
  // The tenant's share: past it, the tenant's own spans make room.
  const std::string& tenant = span->key.tenant;
  int64_t own_need = 0;
  if (tenant_shard_capacity_ > 0) {
    auto t = shard.tenant_live.find(tenant);
    const int64_t own_live = (t == shard.tenant_live.end() ? 0 : t->second) - existing_live;
    own_need = own_live + charge - tenant_shard_capacity_;
    if (own_need > 0) {
      int64_t own_evictable = 0;
      for (const std::list<Entry*>* list : {&shard.probation, &shard.protected_list}) {
        for (const Entry* e : *list) {
          if (e != existing && e->span->key.tenant == tenant) own_evictable += e->charge;
        }
      }
      if (own_need > own_evictable) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "tenant quota --tenant_memory_bytes=", options_.tenant_capacity_bytes,
            " (", tenant_shard_capacity_, " bytes per memory shard): the tenant holds ",
            own_live, " bytes in this shard, ", own_live - own_evictable,
            " of them pinned or being demoted; the span needs ", charge));
      }
    }
  }

  // New spans, promoted ones included, start on probation.
  Where where = Where::kProbation;
  std::vector<absl::Time> pins;
  if (existing != nullptr) {
    if (existing->where == Where::kProtected) where = Where::kProtected;
    pins = std::move(existing->pins);
    shard.Unlink(existing);
    shard.usage -= existing->charge;
    shard.map.erase(it);
    metrics_.bytes->Add(-existing->charge);
    metrics_.spans->Add(-1);
  }
  if (!pins.empty()) where = Where::kPinned;

  for (std::list<Entry*>* list : {&shard.probation, &shard.protected_list}) {
    for (auto it2 = list->begin(); own_need > 0 && it2 != list->end();) {
      Entry* victim = *it2++;
      if (victim->span->key.tenant != tenant) continue;
      shard.Unlink(victim);
      shard.Link(victim, Where::kLeaving, protected_capacity_);
      own_need -= victim->charge;
      need -= victim->charge;
      victims->push_back(victim->span->key);
    }
  }
  while (need > 0) {
    std::list<Entry*>& from = !shard.probation.empty() ? shard.probation : shard.protected_list;
    if (from.empty()) break;  // only when pinned bytes grew; checked above
    Entry* victim = from.front();
    shard.Unlink(victim);
    shard.Link(victim, Where::kLeaving, protected_capacity_);
    need -= victim->charge;
    victims->push_back(victim->span->key);
  }

  auto entry = std::make_unique<Entry>();
  entry->charge = charge;
  entry->pins = std::move(pins);
  entry->span = std::move(span);
  Entry* e = entry.get();
  shard.map.emplace(e->span->key, std::move(entry));
  shard.usage += charge;
  shard.Link(e, where, protected_capacity_);
  metrics_.bytes->Add(charge);
  metrics_.spans->Add(1);
  metrics_.CountOrigin(options.origin);
  return absl::OkStatus();
}

absl::StatusOr<StoredSpanPtr> MemoryTier::Get(const SpanKey& key) {
  Shard& shard = ShardFor(key);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.map.find(key);
  if (it == shard.map.end()) {
    metrics_.misses->Increment();
    return absl::NotFoundError("not in memory");
  }
  Entry* e = it->second.get();
  if (e->where == Where::kProbation) {
    shard.Unlink(e);
    shard.Link(e, Where::kProtected, protected_capacity_);
  } else if (e->where == Where::kProtected) {
    shard.protected_list.splice(shard.protected_list.end(), shard.protected_list, e->pos);
  }
  metrics_.hits->Increment();
  return e->span;
}

absl::StatusOr<StoredSpanPtr> MemoryTier::GetVictim(const SpanKey& key) {
  Shard& shard = ShardFor(key);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.map.find(key);
  if (it == shard.map.end() || it->second->where != Where::kLeaving) {
    return absl::NotFoundError("not leaving memory");
  }
  return it->second->span;
}

bool MemoryTier::FinishEviction(const SpanKey& key) {
  Shard& shard = ShardFor(key);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.map.find(key);
  if (it == shard.map.end() || it->second->where != Where::kLeaving) return false;
  Entry* e = it->second.get();
  shard.Unlink(e);
  shard.usage -= e->charge;
  metrics_.bytes->Add(-e->charge);
  metrics_.spans->Add(-1);
  metrics_.evictions->Increment();
  shard.map.erase(it);
  return true;
}

bool MemoryTier::Contains(const SpanKey& key) const {
  Shard& shard = ShardFor(key);
  absl::MutexLock lock(&shard.mu);
  return shard.map.contains(key);
}

absl::Status MemoryTier::Delete(const SpanKey& key) {
  Shard& shard = ShardFor(key);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.map.find(key);
  if (it == shard.map.end()) return absl::NotFoundError("not in memory");
  Entry* e = it->second.get();
  shard.Unlink(e);
  shard.usage -= e->charge;
  metrics_.bytes->Add(-e->charge);
  metrics_.spans->Add(-1);
  shard.map.erase(it);
  return absl::OkStatus();
}

void MemoryTier::ForEachSpan(const std::function<void(const SpanKey&, const SpanMeta&)>& fn) const {
  for (int32_t i = 0; i < options_.shards; ++i) {
    Shard& shard = shards_[i];
    absl::MutexLock lock(&shard.mu);
    for (const auto& [key, entry] : shard.map) fn(key, entry->span->meta);
  }
}

TierStats MemoryTier::Stats() const { return metrics_.Snapshot(); }

absl::Status MemoryTier::Pin(const SpanKey& key, absl::Time deadline) {
  const absl::Time now = Now();
  if (deadline <= now) return absl::InvalidArgumentError("pin deadline is not in the future");
  Shard& shard = ShardFor(key);
  absl::MutexLock lock(&shard.mu);
  shard.ReleaseExpiredPins(now, protected_capacity_);
  auto it = shard.map.find(key);
  if (it == shard.map.end()) return absl::NotFoundError("not in memory");
  Entry* e = it->second.get();
  if (e->where != Where::kPinned) {
    if (options_.tenant_pinned_bytes > 0 &&
        pins_.Get(key.tenant) + e->charge > options_.tenant_pinned_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "tenant quota --tenant_pinned_bytes=", options_.tenant_pinned_bytes, ": the tenant has ",
          pins_.Get(key.tenant), " bytes pinned; pinning ", e->charge, " more would exceed it"));
    }
    if (shard.pinned_bytes + e->charge > shard_capacity_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("pinning ", e->charge, " more bytes would exceed the memory shard's ",
                       shard_capacity_, " bytes (", shard.pinned_bytes, " pinned)"));
    }
    shard.Unlink(e);
    shard.Link(e, Where::kPinned, protected_capacity_);
  }
  e->pins.push_back(deadline);
  shard.next_pin_expiry = std::min(shard.next_pin_expiry, deadline);
  return absl::OkStatus();
}

absl::Status MemoryTier::Unpin(const SpanKey& key) {
  const absl::Time now = Now();
  Shard& shard = ShardFor(key);
  absl::MutexLock lock(&shard.mu);
  shard.ReleaseExpiredPins(now, protected_capacity_);
  auto it = shard.map.find(key);
  if (it == shard.map.end()) return absl::NotFoundError("not in memory");
  Entry* e = it->second.get();
  if (e->pins.empty()) return absl::FailedPreconditionError("span is not pinned");
  e->pins.erase(std::max_element(e->pins.begin(), e->pins.end()));
  if (e->pins.empty()) {
    shard.Unlink(e);
    shard.Link(e, Where::kProtected, protected_capacity_);
  }
  return absl::OkStatus();
}

int64_t MemoryTier::PinnedSpans() {
  const absl::Time now = Now();
  int64_t n = 0;
  for (int32_t i = 0; i < options_.shards; ++i) {
    Shard& shard = shards_[i];
    absl::MutexLock lock(&shard.mu);
    shard.ReleaseExpiredPins(now, protected_capacity_);
    n += static_cast<int64_t>(shard.pinned.size());
  }
  return n;
}

int32_t MemoryTier::PinCount(const SpanKey& key) {
  const absl::Time now = Now();
  Shard& shard = ShardFor(key);
  absl::MutexLock lock(&shard.mu);
  shard.ReleaseExpiredPins(now, protected_capacity_);
  auto it = shard.map.find(key);
  return it == shard.map.end() ? 0 : static_cast<int32_t>(it->second->pins.size());
}

}  // namespace kvrecall::store
