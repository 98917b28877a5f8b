// The retrieval commands of `kvrecall` against a real server (with the
// Retrieval service) on a loopback port.

#include <filesystem>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "clients/cli/cli.h"
#include "clients/cli/cli_test_fixture.h"
#include "clients/cpp/testing/test_store.h"
#include "common/half.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/rpc/retrieval_rpc_service.h"
#include "service/rpc/server.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>

namespace kvrecall::cli {
namespace {

using ::testing::HasSubstr;

NpyArray F32Npy(std::vector<int64_t> shape, uint32_t seed) {
  NpyArray a;
  a.descr = "<f4";
  a.shape = std::move(shape);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(static_cast<size_t>(a.num_elements()));
  for (float& x : v) x = dist(rng);
  a.data.assign(reinterpret_cast<const char*>(v.data()), v.size() * 4);
  return a;
}

class RetrievalCommandsTest : public testing::CliFixture {
 protected:
  void SetUp() override { StartServer("cli-retrieval-test", /*retrieval=*/true); }
};

TEST_F(RetrievalCommandsTest, OpenBuildSearchAttendArtifactsFitLoki) {
  ASSERT_EQ(Run({"register", "--model=m", "--layers=2", "--q_heads=4", "--kv_heads=2",
                 "--head_dim=8", "--dtype=f16", "--block_tokens=16"}),
            0)
      << err_.str();
  const std::string hashes = dir_ + "/hashes.txt";
  ASSERT_EQ(Run({"put", "--model=m", "--random=5", "--hashes_out=" + hashes}), 0) << err_.str();

  ASSERT_EQ(Run({"--json", "open", "--model=m", "--hashes_file=" + hashes}), 0) << err_.str();
  const std::string ctx = Json().fields().at("context").string_value();
  EXPECT_EQ(ctx.size(), 32u);
  EXPECT_EQ(Json().fields().at("num_tokens").number_value(), 80);

  // Prefill queries in the capture layout [q_heads, n, d].
  KVR_ASSERT_OK(WriteNpy(dir_ + "/prefill.npy", F32Npy({4, 80, 8}, 1)));
  ASSERT_EQ(Run({"queries", "--context=" + ctx, "--layer=1", "--npy=" + dir_ + "/prefill.npy",
                 "--layout=hnd"}),
            0)
      << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("stored 80 query rows"));

  KVR_ASSERT_OK(WriteNpy(dir_ + "/q.npy", F32Npy({4, 8}, 2)));
  const std::vector<std::string> retrieve = {"--context=" + ctx, "--layer=1",
                                             "--queries=" + dir_ + "/q.npy", "--k=3"};
  auto with = [&](std::string verb, std::vector<std::string> extra) {
    std::vector<std::string> args = {verb};
    args.insert(args.end(), retrieve.begin(), retrieve.end());
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  };
  EXPECT_EQ(Run(with("search", {"--kind=roar"})), 1);
  EXPECT_THAT(err_.str(), HasSubstr("FAILED_PRECONDITION"));
  EXPECT_THAT(err_.str(), HasSubstr("index build"));

  ASSERT_EQ(Run({"index", "build", "--context=" + ctx, "--kind=roar"}), 0) << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("done"));
  ASSERT_EQ(Run({"--json", "index", "ls", "--context=" + ctx}), 0) << err_.str();
  EXPECT_EQ(Json().fields().at("indexes").list_value().values_size(), 4);

  ASSERT_EQ(Run(with("search", {"--kind=roar", "--effort=1000"})), 0) << err_.str();
  const std::string roar = out_.str();
  ASSERT_EQ(Run(with("search", {"--kind=all"})), 0) << err_.str();
  // At maximum effort roar's positions are the exact ones (the first lines).
  EXPECT_EQ(roar.substr(0, roar.find("keys scanned")).substr(0, 40),
            out_.str().substr(0, 40));

  ASSERT_EQ(Run(with("attend", {"--kind=roar", "--exclude=0:4", "-o", dir_ + "/o.npy"})), 0)
      << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("lse_natural"));
  KVR_ASSERT_OK_AND_ASSIGN(NpyArray o, ReadNpy(dir_ + "/o.npy"));
  EXPECT_EQ(o.shape, (std::vector<int64_t>{4, 8}));
  EXPECT_EQ(Run(with("attend", {"--kind=all", "--exclude=10:5"})), 1);
  EXPECT_THAT(err_.str(), HasSubstr("INVALID_ARGUMENT"));

  // Loki bases fitted from the stored context, uploaded, then used by a loki build.
  ASSERT_EQ(Run({"fit-loki", "--model=m", "--hashes_file=" + hashes, "--upload",
                 "-o", dir_ + "/basis.bin"}),
            0)
      << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("stored loki_basis version 1"));
  ASSERT_EQ(Run({"index", "build", "--context=" + ctx, "--kind=loki", "--layers=0"}), 0)
      << err_.str();
  ASSERT_EQ(Run({"artifacts", "ls", "--model=m"}), 0) << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("loki_basis"));
  ASSERT_EQ(Run({"artifacts", "put", "--model=m", "--kind=layer_policy",
                 "--file=" + dir_ + "/basis.bin"}),
            0)
      << err_.str();
  ASSERT_EQ(Run({"artifacts", "get", "--model=m", "--kind=loki_basis", "-o", dir_ + "/back.bin"}),
            0)
      << err_.str();
  KVR_ASSERT_OK_AND_ASSIGN(std::string a, ReadFileToString(dir_ + "/basis.bin"));
  KVR_ASSERT_OK_AND_ASSIGN(std::string b, ReadFileToString(dir_ + "/back.bin"));
  EXPECT_EQ(a, b);

  ASSERT_EQ(Run({"index", "rm", "--context=" + ctx, "--kind=roar"}), 0) << err_.str();
  EXPECT_EQ(Run(with("search", {"--kind=roar"})), 1);
}

TEST_F(RetrievalCommandsTest, BuildIndexFromCapturesOffline) {
  const std::string caps = dir_ + "/captures";
  std::filesystem::create_directories(caps);
  for (int layer : {1, 3}) {
    NpyArray k = F32Npy({2, 64, 8}, 10 + layer), q = F32Npy({4, 64, 8}, 20 + layer);
    char name[64];
    std::snprintf(name, sizeof(name), "/layer%02d_", layer);
    KVR_ASSERT_OK(WriteNpy(caps + name + "k.npy", k));
    KVR_ASSERT_OK(WriteNpy(caps + name + "q.npy", q));
  }
  ASSERT_EQ(Run({"build-index", "--captures=" + caps, "--kind=roar", "--decode=8",
                 "--layers=3", "-o", dir_ + "/out"}),
            0)
      << err_.str();
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/out/L03_H0_roar.kvrindex"));
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/out/L03_H1_roar.kvrindex"));
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/out/L01_H0_roar.kvrindex"));
  EXPECT_THAT(out_.str(), HasSubstr("56 keys"));
  EXPECT_EQ(Run({"build-index", "--captures=" + caps, "--kind=roar"}), 1);  // no -o
  EXPECT_EQ(Run({"build-index", "--captures=/nonexistent", "--kind=roar", "-o", dir_}), 1);
}

}  // namespace
}  // namespace kvrecall::cli
