#include "service/daemon/server_flags.h"

#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::daemon {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

TEST(ByteSizeTest, ParsesPlainAndSuffixedCounts) {
  ByteSize size;
  std::string error;
  ASSERT_TRUE(AbslParseFlag("1048576", &size, &error));
  EXPECT_EQ(size.bytes, 1048576);
  ASSERT_TRUE(AbslParseFlag("4GiB", &size, &error));
  EXPECT_EQ(size.bytes, int64_t{4} << 30);
  ASSERT_TRUE(AbslParseFlag("64g", &size, &error));
  EXPECT_EQ(size.bytes, int64_t{64} << 30);
  ASSERT_TRUE(AbslParseFlag("256 MiB", &size, &error));
  EXPECT_EQ(size.bytes, int64_t{256} << 20);
  ASSERT_TRUE(AbslParseFlag("0", &size, &error));
  EXPECT_EQ(size.bytes, 0);
  EXPECT_FALSE(AbslParseFlag("-1", &size, &error));
  EXPECT_FALSE(AbslParseFlag("4GB2", &size, &error));
  EXPECT_FALSE(AbslParseFlag("", &size, &error));
  EXPECT_FALSE(AbslParseFlag("9999999999T", &size, &error));
  EXPECT_THAT(error, HasSubstr("overflows"));
  EXPECT_EQ(AbslUnparseFlag(ByteSize{123}), "123");
}

TEST(ServerFlagsTest, DefaultsGiveTheDocumentedOptions) {
  absl::FlagSaver saver;
  KVR_ASSERT_OK_AND_ASSIGN(rpc::ServerOptions o, ServerOptionsFromFlags());
  EXPECT_EQ(o.listen_address, "127.0.0.1:7878");
  EXPECT_EQ(o.store.data_dir, "./data");
  EXPECT_EQ(o.store.memory_capacity_bytes, int64_t{4} << 30);
  EXPECT_EQ(o.store.disk_capacity_bytes, int64_t{64} << 30);
  EXPECT_EQ(o.store.rocksdb_capacity_bytes, int64_t{256} << 30);
  EXPECT_EQ(o.metrics_port, 0);
  EXPECT_TRUE(o.tenants_file.empty());
}

TEST(ServerFlagsTest, FlagsReachTheOptions) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_listen, "0.0.0.0:9000");
  absl::SetFlag(&FLAGS_data_dir, "/var/lib/kvrecall");
  absl::SetFlag(&FLAGS_memory_capacity_bytes, ByteSize{int64_t{1} << 30});
  absl::SetFlag(&FLAGS_rocksdb_compression, "zstd");
  absl::SetFlag(&FLAGS_metrics_port, 9090);
  absl::SetFlag(&FLAGS_rpc_threads, 16);
  absl::SetFlag(&FLAGS_insecure, true);
  absl::SetFlag(&FLAGS_tenant_pinned_bytes, ByteSize{int64_t{1} << 20});
  absl::SetFlag(&FLAGS_tenant_stored_bytes, ByteSize{int64_t{1} << 30});
  absl::SetFlag(&FLAGS_tenant_contexts, 3);
  KVR_ASSERT_OK_AND_ASSIGN(rpc::ServerOptions o, ServerOptionsFromFlags());
  EXPECT_TRUE(o.insecure);
  EXPECT_EQ(o.store.tenant_pinned_bytes, int64_t{1} << 20);
  EXPECT_EQ(o.store.tenant_stored_bytes, int64_t{1} << 30);
  EXPECT_EQ(o.tenant_contexts, 3);
  EXPECT_EQ(o.listen_address, "0.0.0.0:9000");
  EXPECT_EQ(o.store.data_dir, "/var/lib/kvrecall");
  EXPECT_EQ(o.store.memory_capacity_bytes, int64_t{1} << 30);
  EXPECT_EQ(o.store.rocksdb_compression, "zstd");
  EXPECT_EQ(o.metrics_port, 9090);
  EXPECT_EQ(o.rpc_threads, 16);
}

TEST(ServerFlagsTest, ListeningBeyondLoopbackNeedsTlsAndTenantsOrInsecure) {
  absl::FlagSaver saver;
  for (const char* address : {"0.0.0.0:9000", "[::]:9000", "10.1.2.3:9000", "myhost:9000"}) {
    absl::SetFlag(&FLAGS_listen, address);
    EXPECT_THAT(ServerOptionsFromFlags(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--insecure")))
        << address;
  }
  absl::SetFlag(&FLAGS_tls_cert_file, "/etc/kvrecall/server.pem");
  absl::SetFlag(&FLAGS_tls_key_file, "/etc/kvrecall/server.key");
  EXPECT_THAT(ServerOptionsFromFlags(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--tenants_file")));
  absl::SetFlag(&FLAGS_tenants_file, "/etc/kvrecall/tenants");
  KVR_EXPECT_OK(ServerOptionsFromFlags().status());
  absl::SetFlag(&FLAGS_tls_key_file, "");
  EXPECT_THAT(ServerOptionsFromFlags(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("go together")));
  for (const char* address : {"127.0.0.1:0", "127.0.0.9:9000", "[::1]:9000", "localhost:9000"}) {
    absl::SetFlag(&FLAGS_listen, address);
    absl::SetFlag(&FLAGS_tls_cert_file, "");
    absl::SetFlag(&FLAGS_tenants_file, "");
    KVR_EXPECT_OK(ServerOptionsFromFlags().status()) << address;
  }
}

TEST(ServerFlagsTest, BadValuesNameTheFlag) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_listen, "localhost");
  EXPECT_THAT(ServerOptionsFromFlags(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--listen")));
  absl::SetFlag(&FLAGS_listen, "127.0.0.1:7878");
  absl::SetFlag(&FLAGS_memory_shards, 0);
  EXPECT_THAT(ServerOptionsFromFlags(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--memory_shards")));
  absl::SetFlag(&FLAGS_memory_shards, 16);
  absl::SetFlag(&FLAGS_metrics_port, 70000);
  EXPECT_THAT(ServerOptionsFromFlags(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--metrics_port")));
}

}  // namespace
}  // namespace kvrecall::daemon
