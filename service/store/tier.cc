#include "service/store/tier.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace kvrecall::store {

TierMetrics::TierMetrics(TierId tier, int64_t capacity, MetricsRegistry* registry) : tier_(tier) {
  if (registry != nullptr) {
    const std::string labels = absl::StrCat("tier=\"", TierName(tier), "\"");
    hits = registry->GetCounter("kvrecall_store_tier_hits_total", labels);
    misses = registry->GetCounter("kvrecall_store_tier_misses_total", labels);
    evictions = registry->GetCounter("kvrecall_store_tier_evictions_total", labels);
    promotions = registry->GetCounter("kvrecall_store_tier_promotions_total", labels);
    demotions = registry->GetCounter("kvrecall_store_tier_demotions_total", labels);
    checksum_failures = registry->GetCounter("kvrecall_store_tier_checksum_failures_total", labels);
    bytes = registry->GetGauge("kvrecall_store_tier_bytes", labels);
    spans = registry->GetGauge("kvrecall_store_tier_spans", labels);
    capacity_bytes = registry->GetGauge("kvrecall_store_tier_capacity_bytes", labels);
    // A registry shared with an earlier store of this process keeps old
    // values; gauges describe this tier from now on.
    bytes->Set(0);
    spans->Set(0);
  } else {
    own_counters_ = std::make_unique<Counter[]>(6);
    own_gauges_ = std::make_unique<Gauge[]>(3);
    hits = &own_counters_[0];
    misses = &own_counters_[1];
    evictions = &own_counters_[2];
    promotions = &own_counters_[3];
    demotions = &own_counters_[4];
    checksum_failures = &own_counters_[5];
    bytes = &own_gauges_[0];
    spans = &own_gauges_[1];
    capacity_bytes = &own_gauges_[2];
  }
  capacity_bytes->Set(capacity);
}

void TierMetrics::CountOrigin(TierPutOptions::Origin origin) {
  switch (origin) {
    case TierPutOptions::Origin::kPromotion:
      promotions->Increment();
      break;
    case TierPutOptions::Origin::kDemotion:
      demotions->Increment();
      break;
    case TierPutOptions::Origin::kWrite:
      break;
  }
}

TierStats TierMetrics::Snapshot() const {
  TierStats s;
  s.tier = tier_;
  s.capacity_bytes = capacity_bytes->value();
  s.bytes = bytes->value();
  s.spans = spans->value();
  s.hits = hits->value();
  s.misses = misses->value();
  s.evictions = evictions->value();
  s.promotions = promotions->value();
  s.demotions = demotions->value();
  s.checksum_failures = checksum_failures->value();
  return s;
}

}  // namespace kvrecall::store
