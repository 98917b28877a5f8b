// kill -9 while a client streams durable puts: after a restart on the same
// data directory every acknowledged span is intact, and nothing corrupt is
// served (an unacknowledged span is either absent or exactly right).

#include <signal.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/retrieval_client.h"
#include "clients/cpp/span_keys.h"
#include "common/span_hash.h"
#include "common/status_macros.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/integration/random_spans.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall {
namespace {

using ::kvrecall::testing::DaemonProcess;
using ::kvrecall::testing::RandomSpan;
using ::kvrecall::testing::SmallModel;
using ::kvrecall::testing::SpanHashes;

constexpr char kModel[] = "e2e-model";
constexpr int kTokens = 64;
constexpr int64_t kSpanBytes = 4 * 2 * 4 * kTokens * 16 * 2;  // 64 KiB
constexpr int kSpansPerStream = 4;

v1::ModelGeometry Model() {
  return SmallModel(kModel, v1::DTYPE_BF16, 4, 8, 4, kTokens);
}

// Span i of the chain of `seed`: deterministic tokens and payload, so the
// checker can recompute what every span must hold.
struct ChainGen {
  explicit ChainGen(uint64_t seed) : seed(seed), parent(SpanRootHash(kModel)) {}
  client::OwnedSpan Next() {
    std::mt19937_64 rng(seed * 1000003 + index++);
    client::OwnedSpan s = RandomSpan(parent, kTokens, kSpanBytes, rng);
    parent = s.hash;
    return s;
  }
  uint64_t seed;
  uint64_t index = 0;
  Hash128 parent;
};

std::unique_ptr<client::KvStoreClient> Connect(const DaemonProcess& d, int max_attempts) {
  client::ClientOptions o;
  o.target = d.address();
  o.deadline_ms = 60000;
  o.max_attempts = max_attempts;
  o.chunk_bytes = 16 << 10;  // several messages per span: the kill lands mid-span too
  auto c = client::KvStoreClient::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(c).value();
}

TEST(Kill9Test, EveryAcknowledgedDurableSpanSurvivesSigkill) {
  const uint64_t seed = 9009;
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  const std::string dir = kvrecall::testing::MakeTempDir("kvrecalld-kill9");
  DaemonProcess daemon(dir + "/data", {"--memory_capacity_bytes=256MiB"});
  KVR_ASSERT_OK(daemon.Start());
  KVR_ASSERT_OK(Connect(daemon, 4)->RegisterModel(Model()).status());

  std::vector<client::OwnedSpan> acked;    // acknowledged, in chain order
  std::vector<client::OwnedSpan> attempted;  // sent but not acknowledged
  int total_acked = 0;
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    auto writer_client = Connect(daemon, /*max_attempts=*/1);
    absl::Mutex mu;
    int acked_this_round = 0;
    ChainGen gen(seed + round);
    std::vector<client::OwnedSpan> round_acked, round_attempted;
    absl::Status writer_status;
    std::thread writer([&] {
      for (;;) {
        std::vector<client::OwnedSpan> batch;
        for (int i = 0; i < kSpansPerStream; ++i) batch.push_back(gen.Next());
        std::vector<client::SpanToPut> put;
        for (const auto& s : batch) {
          put.push_back(client::SpanToPut{s.hash, s.parent, kTokens, s.token_ids, s.payload, true});
        }
        auto results = writer_client->PutSpans(kModel, put);
        absl::MutexLock lock(&mu);
        if (!results.ok()) {
          writer_status = results.status();
          round_attempted = std::move(batch);
          return;
        }
        for (auto& s : batch) round_acked.push_back(std::move(s));
        acked_this_round += kSpansPerStream;
      }
    });
    {
      // Kill while the writer is streaming, once a good number is acknowledged.
      absl::MutexLock lock(&mu);
      auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
        return acked_this_round >= 96 || !writer_status.ok();
      };
      ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(&enough), absl::Seconds(120)));
      ASSERT_TRUE(writer_status.ok()) << writer_status;
    }
    KVR_ASSERT_OK(daemon.Kill());
    writer.join();
    EXPECT_FALSE(writer_status.ok()) << "the writer must notice the daemon died";
    total_acked += static_cast<int>(round_acked.size());

    KVR_ASSERT_OK(daemon.Start());
    auto checker = Connect(daemon, 4);
    // Every acknowledged span of this round is there, byte for byte.
    std::vector<Hash128> hashes;
    for (const auto& s : round_acked) hashes.push_back(s.hash);
    KVR_ASSERT_OK_AND_ASSIGN(auto lookup, checker->Lookup(kModel, hashes));
    EXPECT_EQ(lookup.prefix_spans, static_cast<int>(round_acked.size()));
    KVR_ASSERT_OK_AND_ASSIGN(auto got, checker->GetSpans(kModel, hashes));
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(got[i].found) << "acknowledged span " << i << " lost: "
                                << client::MissReasonName(got[i].miss_reason);
      ASSERT_EQ(got[i].payload, round_acked[i].payload) << "acknowledged span " << i;
    }
    // The batch in flight at the kill: each span is absent or exact.
    std::vector<Hash128> in_flight;
    for (const auto& s : round_attempted) in_flight.push_back(s.hash);
    if (!in_flight.empty()) {
      KVR_ASSERT_OK_AND_ASSIGN(auto maybe, checker->GetSpans(kModel, in_flight));
      for (size_t i = 0; i < maybe.size(); ++i) {
        if (maybe[i].found) {
          EXPECT_EQ(maybe[i].payload, round_attempted[i].payload) << "unacknowledged span " << i;
        } else {
          EXPECT_EQ(maybe[i].miss_reason, v1::MISS_REASON_NEVER_STORED);
        }
      }
    }
    for (auto& s : round_acked) acked.push_back(std::move(s));
  }

  // After both crashes, the first round's spans are still all there.
  auto checker = Connect(daemon, 4);
  std::vector<Hash128> all;
  for (const auto& s : acked) all.push_back(s.hash);
  KVR_ASSERT_OK_AND_ASSIGN(auto got, checker->GetSpans(kModel, all));
  int intact = 0;
  for (size_t i = 0; i < got.size(); ++i) intact += got[i].found && got[i].payload == acked[i].payload;
  EXPECT_EQ(intact, total_acked);
  KVR_ASSERT_OK_AND_ASSIGN(v1::StatsResponse stats, checker->Stats());
  for (const auto& t : stats.tiers()) EXPECT_EQ(t.checksum_failures(), 0);
  KVR_EXPECT_OK(daemon.Stop());
}


// The kill -9 campaign: `KVRECALL_KILL9_TRIALS` kills (default 2 here; 20 for
// the figures in docs/reliability.md) at random moments while four clients
// run durable puts, deletes, pins and index builds against a daemon whose
// small memory tier and segments push spans to disk and RocksDB and keep
// compaction busy. All trials share one data directory. After each restart:
// every acknowledged span not deleted is there byte for byte; a span whose
// put or delete was in flight, or whose delete was acknowledged, is absent
// or exact (never corrupt); no tier counted a checksum failure; every index
// whose build finished loads and answers a search, and one in flight either
// loads or is rebuilt. KVRECALL_KILL9_SEED picks the random moments.
constexpr char kCampaignModel[] = "kill9-campaign";
constexpr int kCampaignTokens = 16;
constexpr int64_t kCampaignSpanBytes = 2 * 2 * 2 * kCampaignTokens * 16 * 2;  // 4 KiB
constexpr int kChainSpans = 4;

v1::ModelGeometry CampaignModel() {
  return SmallModel(kCampaignModel, v1::DTYPE_BF16, 2, 4, 2, kCampaignTokens);
}

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

// One chain of kChainSpans spans per put call; `id` picks its role: deleted
// (id % 3 == 0), pinned (1) or indexed (2), and whether it is put durable
// (half of them: the others live in memory and the disk tier, which a kill
// may lose, but which must never be served corrupt).
bool Durable(uint64_t id) { return (id / 3) % 2 == 0; }

std::vector<client::OwnedSpan> CampaignChain(uint64_t id) {
  std::mt19937_64 rng(id * 7919 + 17);
  std::vector<client::OwnedSpan> chain;
  Hash128 parent = SpanRootHash(kCampaignModel);
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  for (int i = 0; i < kChainSpans; ++i) {
    client::OwnedSpan s;
    s.parent = parent;
    s.token_ids.resize(kCampaignTokens);
    for (auto& t : s.token_ids) t = static_cast<uint32_t>(rng() % 128000);
    s.hash = SpanHash(parent, s.token_ids);
    // Finite bf16 values (index builds read them as keys): a float's top half.
    s.payload.resize(kCampaignSpanBytes);
    for (size_t b = 0; b < s.payload.size(); b += 2) {
      const float f = value(rng);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      const uint16_t bf16 = static_cast<uint16_t>(bits >> 16);
      std::memcpy(s.payload.data() + b, &bf16, 2);
    }
    parent = s.hash;
    chain.push_back(std::move(s));
  }
  return chain;
}

struct CampaignState {
  absl::Mutex mu;
  std::vector<uint64_t> acked ABSL_GUARDED_BY(mu);          // chains put and acknowledged
  std::set<uint64_t> put_in_flight ABSL_GUARDED_BY(mu);     // chains sent, not acknowledged
  std::set<uint64_t> deleted ABSL_GUARDED_BY(mu);           // delete acknowledged
  std::set<uint64_t> delete_in_flight ABSL_GUARDED_BY(mu);
  std::set<std::pair<uint64_t, std::string>> built ABSL_GUARDED_BY(mu);  // build DONE
  std::set<std::pair<uint64_t, std::string>> build_in_flight ABSL_GUARDED_BY(mu);
  int64_t ops ABSL_GUARDED_BY(mu) = 0;
  bool stop ABSL_GUARDED_BY(mu) = false;
};

absl::StatusOr<Hash128> OpenChain(client::RetrievalClient& rc, uint64_t id) {
  KVR_ASSIGN_OR_RETURN(auto opened, rc.OpenContext(kCampaignModel, SpanHashes(CampaignChain(id))));
  return Hash128::FromBytes(opened.context());
}

absl::Status SearchOnce(client::RetrievalClient& rc, const Hash128& ctx, const std::string& kind) {
  std::vector<float> q(4 * 16, 0.25f);
  client::RetrieveOptions o;
  o.k = 4;
  o.kind = kind;
  return rc.Search(ctx, /*layer=*/1, q, /*num_q_heads=*/4, o).status();
}

TEST(Kill9Test, CampaignOfKillsUnderMixedDurableLoad) {
  const int trials = EnvInt("KVRECALL_KILL9_TRIALS", 2);
  const uint64_t seed = static_cast<uint64_t>(EnvInt("KVRECALL_KILL9_SEED", 4242));
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  const std::string dir = kvrecall::testing::MakeTempDir("kvrecalld-kill9-campaign");
  DaemonProcess daemon(dir + "/data",
                       {"--memory_capacity_bytes=256KiB", "--disk_capacity_bytes=6MiB",
                        "--disk_segment_bytes=1MiB", "--disk_compaction_live_fraction=0.9",
                        "--index_build_threads=1"});
  KVR_ASSERT_OK(daemon.Start());
  KVR_ASSERT_OK(Connect(daemon, 4)->RegisterModel(CampaignModel()).status());

  CampaignState st;
  uint64_t next_chain = 1;
  int64_t total_ops = 0, resurrected = 0, rebuilt = 0, loaded = 0, segments_removed = 0;
  int64_t volatile_lost = 0;
  std::set<std::string> segments;
  std::string tiers;
  for (int trial = 0; trial < trials; ++trial) {
    SCOPED_TRACE(absl::StrCat("trial ", trial));
    {
      absl::MutexLock lock(&st.mu);
      st.stop = false;
      st.ops = 0;
    }
    client::ClientOptions o;
    o.target = daemon.address();
    o.deadline_ms = 30000;
    o.max_attempts = 1;
    auto kv = client::KvStoreClient::Create(o);
    auto rc = client::RetrievalClient::Create(o);
    KVR_ASSERT_OK(kv.status());
    KVR_ASSERT_OK(rc.status());
    auto stopped = [&st] {
      absl::MutexLock lock(&st.mu);
      return st.stop;
    };
    // Pick an acknowledged chain of a role, or 0.
    auto pick = [&st](std::mt19937_64& r, int role) -> uint64_t {
      absl::MutexLock lock(&st.mu);
      for (int tries = 0; tries < 16 && !st.acked.empty(); ++tries) {
        const uint64_t id = st.acked[r() % st.acked.size()];
        if (static_cast<int>(id % 3) == role && (role != 2 || Durable(id)) &&
            !st.deleted.contains(id) &&
            !st.delete_in_flight.contains(id)) {
          return id;
        }
      }
      return 0;
    };
    std::vector<std::thread> load;
    load.emplace_back([&] {  // durable puts
      while (!stopped()) {
        uint64_t id;
        {
          absl::MutexLock lock(&st.mu);
          id = next_chain++;
          st.put_in_flight.insert(id);
        }
        const auto chain = CampaignChain(id);
        std::vector<client::SpanToPut> put;
        for (const auto& s : chain) {
          put.push_back({s.hash, s.parent, kCampaignTokens, s.token_ids, s.payload, Durable(id)});
        }
        auto results = (*kv)->PutSpans(kCampaignModel, put);
        if (!results.ok()) return;  // the daemon died
        absl::MutexLock lock(&st.mu);
        st.put_in_flight.erase(id);
        st.acked.push_back(id);
        ++st.ops;
      }
    });
    load.emplace_back([&, r = std::mt19937_64(rng())]() mutable {  // deletes
      while (!stopped()) {
        const uint64_t id = pick(r, 0);
        if (id == 0) {
          absl::SleepFor(absl::Milliseconds(5));
          continue;
        }
        {
          absl::MutexLock lock(&st.mu);
          st.delete_in_flight.insert(id);
        }
        auto results = (*kv)->DeleteSpans(SpanHashes(CampaignChain(id)));
        if (!results.ok()) return;
        absl::MutexLock lock(&st.mu);
        st.delete_in_flight.erase(id);
        st.deleted.insert(id);
        ++st.ops;
      }
    });
    load.emplace_back([&, r = std::mt19937_64(rng())]() mutable {  // pins
      while (!stopped()) {
        const uint64_t id = pick(r, 1);
        if (id == 0) {
          absl::SleepFor(absl::Milliseconds(5));
          continue;
        }
        const auto hashes = SpanHashes(CampaignChain(id));
        if (!(*kv)->PinSpans(hashes, absl::Seconds(30)).ok()) return;
        if (r() % 2 == 0 && !(*kv)->UnpinSpans(hashes).ok()) return;
        absl::MutexLock lock(&st.mu);
        ++st.ops;
      }
    });
    load.emplace_back([&, r = std::mt19937_64(rng())]() mutable {  // index builds
      while (!stopped()) {
        const uint64_t id = pick(r, 2);
        if (id == 0) {
          absl::SleepFor(absl::Milliseconds(5));
          continue;
        }
        const std::string kind = r() % 2 == 0 ? "flat" : "quest";
        auto ctx = OpenChain(**rc, id);
        if (!ctx.ok()) return;
        {
          absl::MutexLock lock(&st.mu);
          st.build_in_flight.insert({id, kind});
        }
        auto op = (*rc)->BuildIndex(*ctx, kind);
        if (op.ok()) op = (*rc)->WaitOperation(op->id(), absl::Seconds(20));
        if (!op.ok()) return;
        EXPECT_EQ(op->state(), v1::OPERATION_STATE_DONE) << kind << ": " << op->error_message();
        (*rc)->CloseContext(*ctx).IgnoreError();
        absl::MutexLock lock(&st.mu);
        st.build_in_flight.erase({id, kind});
        st.built.insert({id, kind});
        ++st.ops;
      }
    });
    // Kill at a random moment once the load has made some progress.
    absl::SleepFor(absl::Milliseconds(200 + static_cast<int64_t>(rng() % 2500)));
    KVR_ASSERT_OK(daemon.Kill());
    {
      absl::MutexLock lock(&st.mu);
      st.stop = true;
    }
    for (auto& t : load) t.join();
    KVR_ASSERT_OK(daemon.Start());

    auto checker = Connect(daemon, 4);
    o.target = daemon.address();
    o.max_attempts = 4;
    auto rchecker = client::RetrievalClient::Create(o);
    KVR_ASSERT_OK(rchecker.status());
    absl::MutexLock lock(&st.mu);
    total_ops += st.ops;
    std::vector<Hash128> must, may;
    std::vector<std::string> must_payload, may_payload;
    auto add = [&](uint64_t id, bool required) {
      for (auto& s : CampaignChain(id)) {
        (required ? must : may).push_back(s.hash);
        (required ? must_payload : may_payload).push_back(std::move(s.payload));
      }
    };
    for (uint64_t id : st.acked) {
      add(id, Durable(id) && !st.deleted.contains(id) && !st.delete_in_flight.contains(id));
    }
    for (uint64_t id : st.put_in_flight) add(id, false);
    KVR_ASSERT_OK_AND_ASSIGN(auto got, checker->GetSpans(kCampaignModel, must));
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(got[i].found) << "acknowledged span " << must[i].ToHex() << " lost: "
                                << client::MissReasonName(got[i].miss_reason);
      ASSERT_EQ(got[i].payload, must_payload[i]) << "acknowledged span " << must[i].ToHex();
    }
    KVR_ASSERT_OK_AND_ASSIGN(auto maybe, checker->GetSpans(kCampaignModel, may));
    for (size_t i = 0; i < maybe.size(); ++i) {
      if (!maybe[i].found) continue;
      ASSERT_EQ(maybe[i].payload, may_payload[i]) << "span " << may[i].ToHex() << " is corrupt";
    }
    for (uint64_t id : st.deleted) {
      KVR_ASSERT_OK_AND_ASSIGN(auto d, checker->GetSpans(kCampaignModel, SpanHashes(CampaignChain(id))));
      for (const auto& f : d) resurrected += f.found;
    }
    // A chain put without durability that the kill took (wholly or in part)
    // leaves the campaign; one that is there stays.
    std::vector<uint64_t> kept;
    for (uint64_t id : st.acked) {
      bool whole = true;
      if (!Durable(id) && !st.deleted.contains(id) && !st.delete_in_flight.contains(id)) {
        KVR_ASSERT_OK_AND_ASSIGN(auto c, checker->GetSpans(kCampaignModel, SpanHashes(CampaignChain(id))));
        for (const auto& f : c) whole &= f.found;
      }
      if (whole) {
        kept.push_back(id);
      } else {
        ++volatile_lost;
      }
    }
    st.acked = std::move(kept);
    for (uint64_t id : st.put_in_flight) {  // settled: put again, acknowledged this time
      std::vector<client::SpanToPut> put;
      const auto chain = CampaignChain(id);
      for (const auto& s : chain) {
        put.push_back({s.hash, s.parent, kCampaignTokens, s.token_ids, s.payload, Durable(id)});
      }
      KVR_ASSERT_OK(checker->PutSpans(kCampaignModel, put).status());
      st.acked.push_back(id);
    }
    st.put_in_flight.clear();
    for (uint64_t id : st.delete_in_flight) st.deleted.insert(id);  // deleted again below
    for (uint64_t id : st.deleted) {
      (void)checker->DeleteSpans(SpanHashes(CampaignChain(id)));  // settle resurrected or in-flight ones
    }
    st.delete_in_flight.clear();
    KVR_ASSERT_OK_AND_ASSIGN(v1::StatsResponse stats, checker->Stats());
    tiers.clear();
    for (const auto& t : stats.tiers()) {
      ASSERT_EQ(t.checksum_failures(), 0) << v1::Tier_Name(t.tier());
      absl::StrAppend(&tiers, tiers.empty() ? "" : ", ", v1::Tier_Name(t.tier()), " ", t.spans());
    }
    // Disk segments gone since the last look: compacted or emptied and removed.
    std::set<std::string> now;
    for (const auto& e : std::filesystem::directory_iterator(dir + "/data/segments")) {
      now.insert(e.path().filename().string());
    }
    for (const auto& name : segments) segments_removed += !now.contains(name);
    segments = std::move(now);
    // Indexes: every finished build loads; one in flight loads or is rebuilt.
    for (const auto& [id, kind] : st.build_in_flight) {
      KVR_ASSERT_OK_AND_ASSIGN(Hash128 ctx, OpenChain(**rchecker, id));
      if (!SearchOnce(**rchecker, ctx, kind).ok()) {
        KVR_ASSERT_OK_AND_ASSIGN(auto op, (*rchecker)->BuildIndex(ctx, kind));
        KVR_ASSERT_OK_AND_ASSIGN(op, (*rchecker)->WaitOperation(op.id(), absl::Seconds(60)));
        ASSERT_EQ(op.state(), v1::OPERATION_STATE_DONE) << op.error_message();
        ++rebuilt;
      }
      KVR_ASSERT_OK((*rchecker)->CloseContext(ctx));
      st.built.insert({id, kind});
    }
    st.build_in_flight.clear();
    for (const auto& [id, kind] : st.built) {
      KVR_ASSERT_OK_AND_ASSIGN(Hash128 ctx, OpenChain(**rchecker, id));
      KVR_ASSERT_OK(SearchOnce(**rchecker, ctx, kind)) << "index " << kind << " of chain " << id;
      KVR_ASSERT_OK((*rchecker)->CloseContext(ctx));
      ++loaded;
    }
    std::cout << "kill9 campaign: trial " << trial + 1 << "/" << trials << ": " << st.ops
              << " operations acknowledged before the kill; " << must.size()
              << " acknowledged durable spans intact, " << st.deleted.size() << " chains deleted, "
              << st.built.size() << " indexes load" << std::endl;
  }
  std::cout << "kill9 campaign: " << trials << " kills, " << total_ops
            << " operations acknowledged, 0 acknowledged spans lost, 0 corrupt reads, "
            << resurrected << " deleted spans found again after a kill, " << volatile_lost
            << " chains put without durability lost by a kill, " << rebuilt
            << " in-flight builds rebuilt, " << loaded << " index loads checked, "
            << segments_removed << " disk segments compacted or removed; spans held: " << tiers
            << std::endl;
  KVR_EXPECT_OK(daemon.Stop());
  if (!::testing::Test::HasFailure()) std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvrecall
