#include "service/rpc/server_options.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::rpc {
namespace {

using ::kvrecall::testing::IsOk;
using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

TEST(ServerOptionsTest, DefaultsAreValidAndAsDocumented) {
  ServerOptions o;
  EXPECT_THAT(ValidateServerOptions(o), IsOk());
  EXPECT_EQ(o.listen_address, "127.0.0.1:7878");
  EXPECT_EQ(o.store.data_dir, "./data");
  EXPECT_EQ(o.store.memory_capacity_bytes, int64_t{4} << 30);
  EXPECT_EQ(o.store.disk_capacity_bytes, int64_t{64} << 30);
  EXPECT_EQ(o.store.rocksdb_capacity_bytes, int64_t{256} << 30);
}

TEST(ServerOptionsTest, OutOfRangeNamesTheFlag) {
  ServerOptions o;
  o.rpc_threads = 1;
  EXPECT_THAT(ValidateServerOptions(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--rpc_threads")));
  o = ServerOptions();
  o.store.rocksdb_compression = "gzip";
  EXPECT_THAT(ValidateServerOptions(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--rocksdb_compression")));
  o = ServerOptions();
  o.get_chunk_bytes = o.max_message_bytes;
  EXPECT_THAT(ValidateServerOptions(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--get_chunk_bytes")));
  o = ServerOptions();
  o.store.disk_compaction_live_fraction = 1.5;
  EXPECT_THAT(ValidateServerOptions(o), StatusIs(absl::StatusCode::kInvalidArgument,
                                                 HasSubstr("--disk_compaction_live_fraction")));
  o = ServerOptions();
  o.store.data_dir = "";
  EXPECT_THAT(ValidateServerOptions(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--data_dir")));
}

TEST(ServerOptionsTest, ListenAddressParsing) {
  std::string host;
  int port = -1;
  KVR_ASSERT_OK(ParseListenAddress("127.0.0.1:0", &host, &port));
  EXPECT_EQ(host, "127.0.0.1");
  EXPECT_EQ(port, 0);
  KVR_ASSERT_OK(ParseListenAddress("[::1]:7878", &host, &port));
  EXPECT_EQ(host, "::1");
  EXPECT_EQ(port, 7878);
  for (const char* bad : {"7878", "host:", ":7878", "h:70000", "h:x", "[::1:1"}) {
    EXPECT_THAT(ParseListenAddress(bad, &host, &port),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--listen")))
        << bad;
  }
}

TEST(ServerOptionsTest, FlagsListIsSortedAndComplete) {
  const auto flags = ServerOptionsToFlags(ServerOptions());
  ASSERT_FALSE(flags.empty());
  for (size_t i = 1; i < flags.size(); ++i) EXPECT_LT(flags[i - 1].first, flags[i].first);
  bool has_listen = false;
  for (const auto& [name, value] : flags) {
    if (name == "listen") {
      has_listen = true;
      EXPECT_EQ(value, "127.0.0.1:7878");
    }
  }
  EXPECT_TRUE(has_listen);
}

}  // namespace
}  // namespace kvrecall::rpc
