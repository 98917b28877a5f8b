#pragma once

// Helpers shared by the store tests: a tiny model geometry, valid spans with
// seeded random payloads, and file corruption. Test-only.

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/checksum.h"
#include "common/span_hash.h"
#include "service/store/span.h"

namespace kvrecall::store::testing {

// 2 layers x 2 KV heads x 16 dims, bf16, `block_tokens` tokens per span:
// 4 KiB per full span of 16 tokens.
inline ModelGeometry TinyModel(const std::string& id = "tiny", int32_t block_tokens = 16) {
  ModelGeometry m;
  m.model_id = id;
  m.num_layers = 2;
  m.num_q_heads = 4;
  m.num_kv_heads = 2;
  m.head_dim = 16;
  m.dtype = DType::kBf16;
  m.block_tokens = block_tokens;
  return m;
}

// A clock the test moves by hand (injected as TieredStoreOptions::clock).
// Thread-safe.
class FakeClock {
 public:
  absl::Time Now() const {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }
  std::function<absl::Time()> AsFunction() {
    return [this] { return Now(); };
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ = absl::FromUnixSeconds(1700000000);
};

// The seed of a test's randomness: $KVRECALL_TEST_SEED when set, else `fallback`.
// Tests print it with SCOPED_TRACE so that a failure can be replayed.
inline uint64_t TestSeed(uint64_t fallback) {
  const char* env = std::getenv("KVRECALL_TEST_SEED");
  uint64_t seed = fallback;
  if (env != nullptr && !absl::SimpleAtoi(env, &seed)) seed = fallback;
  return seed;
}

// A valid span: random token ids and payload, hash chained from `parent`.
inline StoredSpan MakeSpan(const ModelGeometry& m, const Hash128& parent, std::mt19937_64& rng,
                           const std::string& tenant = "", int32_t num_tokens = 0,
                           bool durable = false) {
  if (num_tokens == 0) num_tokens = m.block_tokens;
  StoredSpan s;
  s.key.tenant = tenant;
  s.meta.model_id = m.model_id;
  s.meta.parent = parent;
  s.meta.num_tokens = num_tokens;
  s.meta.token_ids.resize(static_cast<size_t>(num_tokens));
  for (auto& t : s.meta.token_ids) t = static_cast<uint32_t>(rng() % 32000);
  s.key.hash = SpanHash(parent, s.meta.token_ids);
  s.payload.resize(static_cast<size_t>(m.SpanPayloadBytes(num_tokens)));
  for (size_t i = 0; i < s.payload.size(); i += 8) {
    const uint64_t r = rng();
    for (size_t j = 0; j < 8 && i + j < s.payload.size(); ++j) {
      s.payload[i + j] = static_cast<char>((r >> (8 * j)) & 0xff);
    }
  }
  s.meta.payload_bytes = static_cast<int64_t>(s.payload.size());
  s.meta.payload_checksum = Checksum64(s.payload);
  s.meta.durable = durable;
  return s;
}

// `n` chained spans of the model's root (salt "").
inline std::vector<StoredSpan> MakeChain(const ModelGeometry& m, int n, std::mt19937_64& rng,
                                         const std::string& tenant = "", bool durable = false) {
  std::vector<StoredSpan> chain;
  Hash128 parent = SpanRootHash(m.model_id);
  for (int i = 0; i < n; ++i) {
    chain.push_back(MakeSpan(m, parent, rng, tenant, 0, durable));
    parent = chain.back().key.hash;
  }
  return chain;
}

// Spans with unrelated random keys (for tier tests, which do not check hashes).
inline StoredSpanPtr MakeLooseSpan(const ModelGeometry& m, std::mt19937_64& rng,
                                   const std::string& tenant = "", int32_t num_tokens = 0) {
  Hash128 parent{rng(), rng()};
  return std::make_shared<const StoredSpan>(MakeSpan(m, parent, rng, tenant, num_tokens));
}

}  // namespace kvrecall::store::testing
