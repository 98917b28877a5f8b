// The kvrecall command against a real server on a loopback port.

#include "clients/cli/cli.h"

#include "clients/cli/cli_test_fixture.h"

#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "clients/cpp/testing/test_store.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/rpc/server.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>

namespace kvrecall::cli {
namespace {

using ::testing::HasSubstr;

class CliTest : public testing::CliFixture {
 protected:
  void SetUp() override { StartServer("cli-test", /*retrieval=*/false); }

  void Register() {
    ASSERT_EQ(Run({"register", "--model=m", "--layers=2", "--q_heads=4", "--kv_heads=2",
                   "--head_dim=8", "--dtype=f16", "--block_tokens=16"}),
              0)
        << err_.str();
  }

};

TEST_F(CliTest, RegisterModelsPutRandomGetLookup) {
  Register();
  EXPECT_THAT(out_.str(), HasSubstr("registered: m"));
  ASSERT_EQ(Run({"models"}), 0);
  EXPECT_THAT(out_.str(), HasSubstr("m "));

  const std::string hashes = dir_ + "/hashes.txt";
  ASSERT_EQ(Run({"--json", "put", "--model=m", "--random=5", "--seed=3", "--durable",
                 "--hashes_out=" + hashes}),
            0)
      << err_.str();
  google::protobuf::Struct put = Json();
  EXPECT_EQ(put.fields().at("spans").number_value(), 5);
  EXPECT_EQ(put.fields().at("payload_bytes").number_value(), 5 * 2 * 2 * 2 * 16 * 8 * 2);
  ASSERT_EQ(put.fields().at("hashes").list_value().values_size(), 5);

  ASSERT_EQ(Run({"lookup", "--model=m", "--hashes_file=" + hashes}), 0) << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("stored prefix: 5 of 5 spans (80 tokens)"));

  const std::string npy = dir_ + "/out.npy";
  ASSERT_EQ(Run({"get", "--model=m", "--hashes_file=" + hashes, "--layers=1:2", "-o", npy}), 0)
      << err_.str();
  KVR_ASSERT_OK_AND_ASSIGN(NpyArray a, ReadNpy(npy));
  EXPECT_EQ(a.descr, "<f2");
  EXPECT_THAT(a.shape, ::testing::ElementsAre(1, 2, 2, 80, 8));

  // The same random seed gives the same chain: a second put changes nothing.
  ASSERT_EQ(Run({"--json", "put", "--model=m", "--random=5", "--seed=3"}), 0);
  EXPECT_EQ(Json().fields().at("already_present").number_value(), 5);
}

TEST_F(CliTest, PutNpyWithTextTokensThenGetReturnsTheSameArray) {
  Register();
  NpyArray kv;
  kv.descr = "<f2";
  kv.shape = {2, 2, 2, 20, 8};  // one full span of 16 tokens + a partial one of 4
  kv.data.resize(2 * 2 * 2 * 20 * 8 * 2);
  for (size_t i = 0; i < kv.data.size(); i += 2) kv.data[i + 1] = static_cast<char>(0x3c);  // 1.0
  for (size_t i = 0; i < kv.data.size(); i += 2) kv.data[i] = static_cast<char>(i / 2);
  KVR_ASSERT_OK(WriteNpy(dir_ + "/kv.npy", kv));
  KVR_ASSERT_OK(WriteStringToFileAtomic(dir_ + "/prompt.txt", "The quick brown fox."));
  ASSERT_EQ(Run({"put", "--model=m", "--npy=" + dir_ + "/kv.npy", "--text=" + dir_ + "/prompt.txt"}),
            0)
      << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("stored 2 spans"));

  ASSERT_EQ(Run({"--json", "lookup", "--model=m", "--text=" + dir_ + "/prompt.txt"}), 0);
  EXPECT_EQ(Json().fields().at("prefix_tokens").number_value(), 20);

  const std::string out = dir_ + "/back.npy";
  ASSERT_EQ(Run({"get", "--model=m", "--text=" + dir_ + "/prompt.txt", "-o", out}), 0) << err_.str();
  KVR_ASSERT_OK_AND_ASSIGN(NpyArray back, ReadNpy(out));
  EXPECT_EQ(back.shape, kv.shape);
  EXPECT_EQ(back.data, kv.data);

  // A token file of the wrong length is refused before anything is stored.
  KVR_ASSERT_OK(WriteStringToFileAtomic(dir_ + "/short.txt", "The"));
  EXPECT_EQ(Run({"put", "--model=m", "--npy=" + dir_ + "/kv.npy", "--text=" + dir_ + "/short.txt"}),
            1);
  EXPECT_THAT(err_.str(), HasSubstr("INVALID_ARGUMENT: 3 token ids for 20 tokens"));
}

TEST_F(CliTest, MissesAreExplainedAndFailTheCommand) {
  Register();
  ASSERT_EQ(Run({"put", "--model=m", "--random=2", "--hashes_out=" + dir_ + "/h"}), 0);
  KVR_ASSERT_OK_AND_ASSIGN(std::string text, ReadFileToString(dir_ + "/h"));
  std::vector<std::string> hashes = absl::StrSplit(text, '\n', absl::SkipEmpty());
  ASSERT_EQ(Run({"rm", "--hashes=" + hashes[0]}), 0);
  EXPECT_EQ(Run({"get", "--model=m", "--hashes_file=" + dir_ + "/h", "-o", dir_ + "/x.npy"}), 1);
  EXPECT_THAT(out_.str(), HasSubstr("missing (deleted)"));
  EXPECT_THAT(out_.str(), HasSubstr("nothing written"));
  ASSERT_EQ(Run({"lookup", "--model=m", "--hashes_file=" + dir_ + "/h"}), 0);
  EXPECT_THAT(out_.str(), HasSubstr(": deleted"));
  EXPECT_THAT(out_.str(), HasSubstr(": parent_missing"));
  ASSERT_EQ(Run({"pin", "--hashes=" + hashes[1], "--ttl_s=30"}), 0);
  EXPECT_EQ(Run({"pin", "--hashes=" + hashes[0]}), 1);
  EXPECT_THAT(out_.str(), HasSubstr("NOT_FOUND"));
  ASSERT_EQ(Run({"stats"}), 0);
  EXPECT_THAT(out_.str(), ::testing::ContainsRegex("deleted=[1-9]"));
  ASSERT_EQ(Run({"--json", "stats"}), 0);
  EXPECT_GT(Json().fields().at("rpcs").list_value().values_size(), 3);
  ASSERT_EQ(Run({"config"}), 0);
  EXPECT_THAT(out_.str(), HasSubstr("span hash kvrecall.span.v1"));
}

TEST_F(CliTest, UsageErrorsAndUnknownModels) {
  EXPECT_EQ(Run({}), 2);
  EXPECT_EQ(Run({"put"}), 2);
  EXPECT_THAT(err_.str(), HasSubstr("--model is required"));
  EXPECT_EQ(Run({"put", "--model=nope", "--random=1"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("NOT_FOUND"));
  Register();
  EXPECT_EQ(Run({"put", "--model=m"}), 2);
  EXPECT_THAT(err_.str(), HasSubstr("exactly one of"));
  EXPECT_EQ(Run({"get", "--model=m", "--hashes=xyz"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("bad span hash"));
  EXPECT_EQ(Run({"get", "--model=m", "--hashes=" + std::string(32, 'a'), "--layers=5"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("BEGIN:END"));
  EXPECT_EQ(Run({"bench", "gpu"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("gpu_bench is not built"));
  EXPECT_EQ(Run({"bench", "nonsense"}), 2);
}

}  // namespace
}  // namespace kvrecall::cli
