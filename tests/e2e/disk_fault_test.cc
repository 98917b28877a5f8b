// Disk faults under a real kvrecalld: a full file system (a small tmpfs), a
// read-only data directory (the tmpfs remounted read-only) and EIO on read
// (tests/e2e/eio_preload.c, an LD_PRELOAD injector). Each must give the
// client a clear status and lose nothing acknowledged. Mounting needs
// CAP_SYS_ADMIN: without it the two mount tests skip and say so.

#include <stdlib.h>
#include <sys/mount.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/span_keys.h"
#include "common/span_hash.h"
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
using ::kvrecall::testing::SmallModel;
using ::kvrecall::testing::SpanHashes;
using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

constexpr char kModel[] = "fault-model";
constexpr int kTokens = 64;
constexpr int64_t kSpanBytes = 4 * 2 * 4 * kTokens * 16 * 2;  // 64 KiB

v1::ModelGeometry Model() {
  return SmallModel(kModel, v1::DTYPE_BF16, 4, 8, 4, kTokens);
}

std::unique_ptr<client::KvStoreClient> Connect(const DaemonProcess& d) {
  client::ClientOptions o;
  o.target = d.address();
  o.deadline_ms = 30000;
  o.max_attempts = 1;
  auto c = client::KvStoreClient::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(c).value();
}

// A tmpfs mounted for the test's lifetime.
class Tmpfs {
 public:
  Tmpfs(std::string dir, const std::string& options) : dir_(std::move(dir)) {
    std::filesystem::create_directories(dir_);
    if (::mount("tmpfs", dir_.c_str(), "tmpfs", 0, options.c_str()) == 0) {
      mounted_ = true;
    } else {
      error_ = std::strerror(errno);
    }
  }
  ~Tmpfs() {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  bool mounted() const { return mounted_; }
  const std::string& error() const { return error_; }
  absl::Status Remount(unsigned long flags, const std::string& options) {
    if (::mount("tmpfs", dir_.c_str(), "tmpfs", MS_REMOUNT | flags, options.c_str()) != 0) {
      return absl::InternalError(absl::StrCat("remount ", dir_, ": ", std::strerror(errno)));
    }
    return absl::OkStatus();
  }

 private:
  const std::string dir_;
  bool mounted_ = false;
  std::string error_;
};

struct Chain {
  std::vector<client::OwnedSpan> spans;
  std::vector<Hash128> hashes() const { return SpanHashes(spans); }
};

Chain MakeChain(uint64_t seed, int n) {
  std::mt19937_64 rng(seed);
  return Chain{RandomChain(kModel, n, kTokens, kSpanBytes, rng)};
}

absl::Status Put(client::KvStoreClient& kv, const Chain& c, bool durable) {
  std::vector<client::SpanToPut> put;
  for (const auto& s : c.spans) {
    put.push_back({s.hash, s.parent, kTokens, s.token_ids, s.payload, durable});
  }
  return kv.PutSpans(kModel, put).status();
}

// Every span of every chain is there, byte for byte.
void ExpectIntact(client::KvStoreClient& kv, const std::vector<Chain>& chains) {
  int checked = 0;
  for (const auto& c : chains) {
    auto got = kv.GetSpans(kModel, c.hashes());
    ASSERT_TRUE(got.ok()) << got.status();
    for (size_t i = 0; i < got->size(); ++i) {
      ASSERT_TRUE((*got)[i].found) << "acknowledged span lost: "
                                   << client::MissReasonName((*got)[i].miss_reason);
      ASSERT_EQ((*got)[i].payload, c.spans[i].payload);
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
}

TEST(DiskFaultTest, AFullDiskIsResourceExhaustedAndLosesNothingAcknowledged) {
  const std::string dir = kvrecall::testing::MakeTempDir("kvrecalld-full-disk");
  Tmpfs fs(dir + "/data", "size=24m");
  if (!fs.mounted()) GTEST_SKIP() << "cannot mount a tmpfs (" << fs.error() << "): needs CAP_SYS_ADMIN";
  DaemonProcess daemon(dir + "/data", {"--memory_capacity_bytes=1MiB"});
  KVR_ASSERT_OK(daemon.Start());
  auto kv = Connect(daemon);
  KVR_ASSERT_OK(kv->RegisterModel(Model()).status());
  std::vector<Chain> acked;
  absl::Status failed;
  for (uint64_t seed = 1; seed < 200; ++seed) {  // 200 x 256 KiB: well past 24 MiB
    Chain c = MakeChain(seed, 4);
    failed = Put(*kv, c, /*durable=*/true);
    if (!failed.ok()) break;
    acked.push_back(std::move(c));
  }
  std::cout << "full disk: " << acked.size() * 4 << " spans acknowledged, then " << failed
            << std::endl;
  EXPECT_THAT(failed, StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("space")));
  ASSERT_GT(acked.size(), 10u);
  ExpectIntact(*kv, acked);
  // Room again: the daemon restarts on the same directory, keeps everything
  // acknowledged and takes new puts.
  KVR_ASSERT_OK(fs.Remount(0, "size=96m"));
  KVR_ASSERT_OK(daemon.Kill());
  KVR_ASSERT_OK(daemon.Start());
  kv = Connect(daemon);
  ExpectIntact(*kv, acked);
  Chain more = MakeChain(1000, 4);
  KVR_EXPECT_OK(Put(*kv, more, true));
  acked.push_back(std::move(more));
  ExpectIntact(*kv, acked);
  KVR_EXPECT_OK(daemon.Stop());
}

TEST(DiskFaultTest, AReadOnlyDataDirectoryIsRefusedClearlyAndLosesNothing) {
  const std::string dir = kvrecall::testing::MakeTempDir("kvrecalld-read-only");
  Tmpfs fs(dir + "/data", "size=64m");
  if (!fs.mounted()) GTEST_SKIP() << "cannot mount a tmpfs (" << fs.error() << "): needs CAP_SYS_ADMIN";
  DaemonProcess daemon(dir + "/data", {"--memory_capacity_bytes=1MiB"});
  KVR_ASSERT_OK(daemon.Start());
  std::vector<Chain> acked;
  {
    auto kv = Connect(daemon);
    KVR_ASSERT_OK(kv->RegisterModel(Model()).status());
    for (uint64_t seed = 1; seed <= 8; ++seed) {
      acked.push_back(MakeChain(seed, 4));
      KVR_ASSERT_OK(Put(*kv, acked.back(), seed % 2 == 0));
    }
  }
  KVR_ASSERT_OK(daemon.Stop());
  KVR_ASSERT_OK(fs.Remount(MS_RDONLY, ""));
  const absl::Status start = daemon.Start(absl::Seconds(20));
  std::cout << "read-only data directory: " << start << std::endl;
  EXPECT_THAT(start, StatusIs(absl::StatusCode::kInternal, HasSubstr("Read-only file system")));
  if (daemon.running()) {
    KVR_ASSERT_OK(daemon.Kill());
  }
  KVR_ASSERT_OK(fs.Remount(0, ""));
  KVR_ASSERT_OK(daemon.Start());
  auto kv = Connect(daemon);
  std::vector<Chain> durable;
  for (size_t i = 0; i < acked.size(); ++i) {
    if (i % 2 == 1) durable.push_back(acked[i]);  // seeds 2, 4, ...
  }
  ExpectIntact(*kv, durable);
  KVR_EXPECT_OK(daemon.Stop());
}

#ifndef KVRECALL_EIO_PRELOAD
#error "KVRECALL_EIO_PRELOAD names the injector library"
#endif

TEST(DiskFaultTest, EioOnReadIsAClearErrorAndLosesNothing) {
  const std::string dir = kvrecall::testing::MakeTempDir("kvrecalld-eio");
  const std::string trigger = dir + "/eio-on";
  ::setenv("LD_PRELOAD", KVRECALL_EIO_PRELOAD, 1);
  ::setenv("KVR_EIO_PATH", "/segments/", 1);
  ::setenv("KVR_EIO_TRIGGER", trigger.c_str(), 1);
  DaemonProcess daemon(dir + "/data", {"--memory_capacity_bytes=1MiB"});
  const absl::Status started = daemon.Start();
  ::unsetenv("LD_PRELOAD");
  KVR_ASSERT_OK(started);
  auto kv = Connect(daemon);
  KVR_ASSERT_OK(kv->RegisterModel(Model()).status());
  std::vector<Chain> acked;
  for (uint64_t seed = 1; seed <= 16; ++seed) {  // 16 MiB through a 1 MiB memory tier
    acked.push_back(MakeChain(seed, 16));
    KVR_ASSERT_OK(Put(*kv, acked.back(), /*durable=*/false));
  }
  KVR_ASSERT_OK_AND_ASSIGN(v1::StatsResponse stats, kv->Stats());
  int64_t on_disk = 0;
  for (const auto& t : stats.tiers()) {
    if (t.tier() == v1::TIER_DISK) on_disk = t.spans();
  }
  ASSERT_GT(on_disk, 100);

  std::ofstream(trigger) << "on";
  int served = 0, refused = 0;
  std::set<std::string> reasons;
  absl::Status first_error;
  for (const auto& c : acked) {
    auto got = kv->GetSpans(kModel, c.hashes());
    if (!got.ok()) {
      ++refused;
      if (first_error.ok()) first_error = got.status();
      continue;
    }
    for (size_t i = 0; i < got->size(); ++i) {
      if (!(*got)[i].found) {
        ++refused;
        reasons.insert(std::string(client::MissReasonName((*got)[i].miss_reason)));
        continue;
      }
      ASSERT_EQ((*got)[i].payload, c.spans[i].payload) << "a corrupt read was served";
      ++served;
    }
  }
  std::cout << "EIO on segment reads: " << served << " spans served from memory, " << refused
            << " calls or spans refused (" << absl::StrJoin(reasons, ", ") << "); first error: " << first_error
            << std::endl;
  EXPECT_GT(refused, 0);
  EXPECT_THAT(first_error, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("Input/output error")));
  // The disk heals: nothing was dropped for it.
  std::filesystem::remove(trigger);
  ExpectIntact(*kv, acked);
  KVR_ASSERT_OK_AND_ASSIGN(stats, kv->Stats());
  for (const auto& t : stats.tiers()) EXPECT_EQ(t.checksum_failures(), 0) << v1::Tier_Name(t.tier());
  KVR_EXPECT_OK(daemon.Stop());
}

}  // namespace
}  // namespace kvrecall
