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
using ::kvrecall::testing::RandomChain;
using ::kvrecall::testing::RandomPayload;
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
  return RandomChain(kCampaignModel, kChainSpans, kCampaignTokens, kCampaignSpanBytes, rng,
                     RandomPayload::kFiniteBf16);
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

std::vector<client::SpanToPut> ToPut(const std::vector<client::OwnedSpan>& chain, uint64_t id) {
  std::vector<client::SpanToPut> put;
  for (const auto& s : chain) {
    put.push_back({s.hash, s.parent, kCampaignTokens, s.token_ids, s.payload, Durable(id)});
  }
  return put;
}

// What the campaign's clients did, across trials, and what the checks after
// each restart counted. The load runs on four threads; the checks run after
// they are joined.
class Campaign {
 public:
  explicit Campaign(std::string dir) : dir_(std::move(dir)) {}

  // Starts the load of one trial: durable puts, deletes, pins and index
  // builds, each on its own thread until Stop() or the daemon dies. The
  // deletes, pins and builds draw their choices from seeds of `rng`.
  std::vector<std::thread> StartLoad(client::KvStoreClient* kv, client::RetrievalClient* rc,
                                     std::mt19937_64& rng) {
    {
      absl::MutexLock lock(&st_.mu);
      st_.stop = false;
      st_.ops = 0;
    }
    std::vector<std::thread> load;
    load.emplace_back([this, kv] { PutLoop(kv); });
    load.emplace_back([this, kv, r = std::mt19937_64(rng())]() mutable { DeleteLoop(kv, r); });
    load.emplace_back([this, kv, r = std::mt19937_64(rng())]() mutable { PinLoop(kv, r); });
    load.emplace_back([this, rc, r = std::mt19937_64(rng())]() mutable { BuildLoop(rc, r); });
    return load;
  }

  void Stop() {
    absl::MutexLock lock(&st_.mu);
    st_.stop = true;
  }

  // After a restart: every acknowledged durable span not deleted is there
  // byte for byte, a span put in flight is absent or exact, and deleted
  // spans found again are counted.
  void CheckSpans(client::KvStoreClient& checker) {
    absl::MutexLock lock(&st_.mu);
    total_ops_ += st_.ops;
    std::vector<Hash128> must, may;
    std::vector<std::string> must_payload, may_payload;
    auto add = [&](uint64_t id, bool required) {
      for (auto& s : CampaignChain(id)) {
        (required ? must : may).push_back(s.hash);
        (required ? must_payload : may_payload).push_back(std::move(s.payload));
      }
    };
    for (uint64_t id : st_.acked) {
      add(id, Durable(id) && !st_.deleted.contains(id) && !st_.delete_in_flight.contains(id));
    }
    for (uint64_t id : st_.put_in_flight) add(id, false);
    trial_intact_ = static_cast<int64_t>(must.size());
    KVR_ASSERT_OK_AND_ASSIGN(auto got, checker.GetSpans(kCampaignModel, must));
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(got[i].found) << "acknowledged span " << must[i].ToHex() << " lost: "
                                << client::MissReasonName(got[i].miss_reason);
      ASSERT_EQ(got[i].payload, must_payload[i]) << "acknowledged span " << must[i].ToHex();
    }
    KVR_ASSERT_OK_AND_ASSIGN(auto maybe, checker.GetSpans(kCampaignModel, may));
    for (size_t i = 0; i < maybe.size(); ++i) {
      if (!maybe[i].found) continue;
      ASSERT_EQ(maybe[i].payload, may_payload[i]) << "span " << may[i].ToHex() << " is corrupt";
    }
    for (uint64_t id : st_.deleted) {
      KVR_ASSERT_OK_AND_ASSIGN(auto d, checker.GetSpans(kCampaignModel, SpanHashes(CampaignChain(id))));
      for (const auto& f : d) resurrected_ += f.found;
    }
  }

  // Settles what the kill left open, so the next trial starts from known
  // chains: a chain put without durability that the kill took (wholly or in
  // part) leaves the campaign, one that is there stays; chains put in
  // flight are put again (acknowledged this time); deletes in flight and
  // resurrected spans are deleted again.
  void SettleChains(client::KvStoreClient& checker) {
    absl::MutexLock lock(&st_.mu);
    std::vector<uint64_t> kept;
    for (uint64_t id : st_.acked) {
      bool whole = true;
      if (!Durable(id) && !st_.deleted.contains(id) && !st_.delete_in_flight.contains(id)) {
        KVR_ASSERT_OK_AND_ASSIGN(auto c, checker.GetSpans(kCampaignModel, SpanHashes(CampaignChain(id))));
        for (const auto& f : c) whole &= f.found;
      }
      if (whole) {
        kept.push_back(id);
      } else {
        ++volatile_lost_;
      }
    }
    st_.acked = std::move(kept);
    for (uint64_t id : st_.put_in_flight) {
      KVR_ASSERT_OK(checker.PutSpans(kCampaignModel, ToPut(CampaignChain(id), id)).status());
      st_.acked.push_back(id);
    }
    st_.put_in_flight.clear();
    for (uint64_t id : st_.delete_in_flight) st_.deleted.insert(id);  // deleted again below
    for (uint64_t id : st_.deleted) {
      (void)checker.DeleteSpans(SpanHashes(CampaignChain(id)));  // settle resurrected or in-flight ones
    }
    st_.delete_in_flight.clear();
  }

  // No tier counted a checksum failure; notes the spans each tier holds and
  // the disk segments gone since the last look (compacted or emptied).
  void CheckTiers(client::KvStoreClient& checker) {
    KVR_ASSERT_OK_AND_ASSIGN(v1::StatsResponse stats, checker.Stats());
    tiers_.clear();
    for (const auto& t : stats.tiers()) {
      ASSERT_EQ(t.checksum_failures(), 0) << v1::Tier_Name(t.tier());
      absl::StrAppend(&tiers_, tiers_.empty() ? "" : ", ", v1::Tier_Name(t.tier()), " ", t.spans());
    }
    std::set<std::string> now;
    for (const auto& e : std::filesystem::directory_iterator(dir_ + "/data/segments")) {
      now.insert(e.path().filename().string());
    }
    for (const auto& name : segments_) segments_removed_ += !now.contains(name);
    segments_ = std::move(now);
  }

  // Indexes: every finished build loads; one in flight loads or is rebuilt.
  void CheckIndexes(client::RetrievalClient& rchecker) {
    absl::MutexLock lock(&st_.mu);
    for (const auto& [id, kind] : st_.build_in_flight) {
      KVR_ASSERT_OK_AND_ASSIGN(Hash128 ctx, OpenChain(rchecker, id));
      if (!SearchOnce(rchecker, ctx, kind).ok()) {
        KVR_ASSERT_OK_AND_ASSIGN(auto op, rchecker.BuildIndex(ctx, kind));
        KVR_ASSERT_OK_AND_ASSIGN(op, rchecker.WaitOperation(op.id(), absl::Seconds(60)));
        ASSERT_EQ(op.state(), v1::OPERATION_STATE_DONE) << op.error_message();
        ++rebuilt_;
      }
      KVR_ASSERT_OK(rchecker.CloseContext(ctx));
      st_.built.insert({id, kind});
    }
    st_.build_in_flight.clear();
    for (const auto& [id, kind] : st_.built) {
      KVR_ASSERT_OK_AND_ASSIGN(Hash128 ctx, OpenChain(rchecker, id));
      KVR_ASSERT_OK(SearchOnce(rchecker, ctx, kind)) << "index " << kind << " of chain " << id;
      KVR_ASSERT_OK(rchecker.CloseContext(ctx));
      ++loaded_;
    }
  }

  void PrintTrial(int trial, int trials) {
    absl::MutexLock lock(&st_.mu);
    std::cout << "kill9 campaign: trial " << trial + 1 << "/" << trials << ": " << st_.ops
              << " operations acknowledged before the kill; " << trial_intact_
              << " acknowledged durable spans intact, " << st_.deleted.size() << " chains deleted, "
              << st_.built.size() << " indexes load" << std::endl;
  }

  void PrintSummary(int trials) const {
    std::cout << "kill9 campaign: " << trials << " kills, " << total_ops_
              << " operations acknowledged, 0 acknowledged spans lost, 0 corrupt reads, "
              << resurrected_ << " deleted spans found again after a kill, " << volatile_lost_
              << " chains put without durability lost by a kill, " << rebuilt_
              << " in-flight builds rebuilt, " << loaded_ << " index loads checked, "
              << segments_removed_ << " disk segments compacted or removed; spans held: " << tiers_
              << std::endl;
  }

 private:
  bool Stopped() {
    absl::MutexLock lock(&st_.mu);
    return st_.stop;
  }

  // An acknowledged chain of `role` (id % 3; index builds only on durable
  // ones) that is not being deleted, or 0.
  uint64_t Pick(std::mt19937_64& r, int role) {
    absl::MutexLock lock(&st_.mu);
    for (int tries = 0; tries < 16 && !st_.acked.empty(); ++tries) {
      const uint64_t id = st_.acked[r() % st_.acked.size()];
      if (static_cast<int>(id % 3) == role && (role != 2 || Durable(id)) &&
          !st_.deleted.contains(id) && !st_.delete_in_flight.contains(id)) {
        return id;
      }
    }
    return 0;
  }

  // Picks a chain of `role`; false (after a short sleep) when there is none.
  bool PickOrWait(std::mt19937_64& r, int role, uint64_t* id) {
    *id = Pick(r, role);
    if (*id == 0) absl::SleepFor(absl::Milliseconds(5));
    return *id != 0;
  }

  void PutLoop(client::KvStoreClient* kv) {
    while (!Stopped()) {
      uint64_t id;
      {
        absl::MutexLock lock(&st_.mu);
        id = next_chain_++;
        st_.put_in_flight.insert(id);
      }
      auto results = kv->PutSpans(kCampaignModel, ToPut(CampaignChain(id), id));
      if (!results.ok()) return;  // the daemon died
      absl::MutexLock lock(&st_.mu);
      st_.put_in_flight.erase(id);
      st_.acked.push_back(id);
      ++st_.ops;
    }
  }

  void DeleteLoop(client::KvStoreClient* kv, std::mt19937_64& r) {
    while (!Stopped()) {
      uint64_t id;
      if (!PickOrWait(r, 0, &id)) continue;
      {
        absl::MutexLock lock(&st_.mu);
        st_.delete_in_flight.insert(id);
      }
      auto results = kv->DeleteSpans(SpanHashes(CampaignChain(id)));
      if (!results.ok()) return;
      absl::MutexLock lock(&st_.mu);
      st_.delete_in_flight.erase(id);
      st_.deleted.insert(id);
      ++st_.ops;
    }
  }

  void PinLoop(client::KvStoreClient* kv, std::mt19937_64& r) {
    while (!Stopped()) {
      uint64_t id;
      if (!PickOrWait(r, 1, &id)) continue;
      const auto hashes = SpanHashes(CampaignChain(id));
      if (!kv->PinSpans(hashes, absl::Seconds(30)).ok()) return;
      if (r() % 2 == 0 && !kv->UnpinSpans(hashes).ok()) return;
      absl::MutexLock lock(&st_.mu);
      ++st_.ops;
    }
  }

  void BuildLoop(client::RetrievalClient* rc, std::mt19937_64& r) {
    while (!Stopped()) {
      uint64_t id;
      if (!PickOrWait(r, 2, &id)) continue;
      const std::string kind = r() % 2 == 0 ? "flat" : "quest";
      auto ctx = OpenChain(*rc, id);
      if (!ctx.ok()) return;
      {
        absl::MutexLock lock(&st_.mu);
        st_.build_in_flight.insert({id, kind});
      }
      auto op = rc->BuildIndex(*ctx, kind);
      if (op.ok()) op = rc->WaitOperation(op->id(), absl::Seconds(20));
      if (!op.ok()) return;
      EXPECT_EQ(op->state(), v1::OPERATION_STATE_DONE) << kind << ": " << op->error_message();
      rc->CloseContext(*ctx).IgnoreError();
      absl::MutexLock lock(&st_.mu);
      st_.build_in_flight.erase({id, kind});
      st_.built.insert({id, kind});
      ++st_.ops;
    }
  }

  const std::string dir_;
  CampaignState st_;
  uint64_t next_chain_ ABSL_GUARDED_BY(st_.mu) = 1;
  int64_t trial_intact_ = 0;  // acknowledged durable spans checked after the last kill
  int64_t total_ops_ = 0, resurrected_ = 0, rebuilt_ = 0, loaded_ = 0, segments_removed_ = 0;
  int64_t volatile_lost_ = 0;
  std::set<std::string> segments_;  // disk segment files at the last look
  std::string tiers_;               // spans held per tier at the last look
};

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

  Campaign campaign(dir);
  for (int trial = 0; trial < trials; ++trial) {
    SCOPED_TRACE(absl::StrCat("trial ", trial));
    client::ClientOptions o;
    o.target = daemon.address();
    o.deadline_ms = 30000;
    o.max_attempts = 1;
    auto kv = client::KvStoreClient::Create(o);
    auto rc = client::RetrievalClient::Create(o);
    KVR_ASSERT_OK(kv.status());
    KVR_ASSERT_OK(rc.status());
    std::vector<std::thread> load = campaign.StartLoad(kv->get(), rc->get(), rng);
    // Kill at a random moment once the load has made some progress.
    absl::SleepFor(absl::Milliseconds(200 + static_cast<int64_t>(rng() % 2500)));
    KVR_ASSERT_OK(daemon.Kill());
    campaign.Stop();
    for (auto& t : load) t.join();
    KVR_ASSERT_OK(daemon.Start());

    auto checker = Connect(daemon, 4);
    o.target = daemon.address();
    o.max_attempts = 4;
    auto rchecker = client::RetrievalClient::Create(o);
    KVR_ASSERT_OK(rchecker.status());
    ASSERT_NO_FATAL_FAILURE(campaign.CheckSpans(*checker));
    ASSERT_NO_FATAL_FAILURE(campaign.SettleChains(*checker));
    ASSERT_NO_FATAL_FAILURE(campaign.CheckTiers(*checker));
    ASSERT_NO_FATAL_FAILURE(campaign.CheckIndexes(**rchecker));
    campaign.PrintTrial(trial, trials);
  }
  campaign.PrintSummary(trials);
  KVR_EXPECT_OK(daemon.Stop());
  if (!::testing::Test::HasFailure()) std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvrecall
