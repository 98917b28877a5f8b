// The layer-policy commands of `kvrecall` (profile-policy, policy
// put|get|ls|tidal) against a real server on a loopback port.

#include <filesystem>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "clients/cli/cli.h"
#include "clients/cli/cli_test_fixture.h"
#include "clients/cpp/testing/test_store.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gpu/worker/policy.h"
#include "gtest/gtest.h"
#include "service/rpc/retrieval_rpc_service.h"
#include "service/rpc/server.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::cli {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

class PolicyCommandsTest : public testing::CliFixture {
 protected:
  void SetUp() override {
    StartServer("cli-policy-test", /*retrieval=*/true);
    ASSERT_EQ(Run({"register", "--model=m", "--layers=4", "--q_heads=2", "--kv_heads=1",
                   "--head_dim=16", "--dtype=f16"}),
              0)
        << err_.str();
  }

  // A capture directory of random layers 0..3, where layer 2 is a copy of
  // layer 1 (identical attention).
  std::string WriteCaptures(const std::string& name) {
    const std::string caps = dir_ + "/" + name;
    std::filesystem::create_directories(caps);
    std::mt19937 rng(42);
    std::normal_distribution<float> dist;
    auto npy = [&](std::vector<int64_t> shape) {
      NpyArray a;
      a.descr = "<f4";
      a.shape = std::move(shape);
      std::vector<float> v(static_cast<size_t>(a.num_elements()));
      for (float& x : v) x = dist(rng);
      a.data.assign(reinterpret_cast<const char*>(v.data()), v.size() * 4);
      return a;
    };
    NpyArray q1, k1, v1;
    for (int layer = 0; layer < 4; ++layer) {
      NpyArray q = npy({2, 300, 16}), k = npy({1, 300, 16}), v = npy({1, 300, 16});
      if (layer == 1) q1 = q, k1 = k, v1 = v;
      if (layer == 2) q = q1, k = k1, v = v1;
      const std::string base = caps + "/layer0" + std::to_string(layer) + "_";
      EXPECT_TRUE(WriteNpy(base + "q.npy", q).ok());
      EXPECT_TRUE(WriteNpy(base + "k.npy", k).ok());
      EXPECT_TRUE(WriteNpy(base + "v.npy", v).ok());
    }
    return caps;
  }
};

TEST_F(PolicyCommandsTest, TidalPutGetLs) {
  const std::string preset = dir_ + "/tidal.json";
  ASSERT_EQ(Run({"policy", "tidal", "--num_layers=4", "--reselect=3", "--k=32", "--num_full=1",
                 "--select_layer=1", "-o", preset}),
            0)
      << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("wrote " + preset + ": L0 full | L1 full k=32 | L2 reuse(1) | "
                                    "L3 full k=32 ; sinks=0 window=1"));
  // Without -o the JSON goes to stdout.
  ASSERT_EQ(Run({"policy", "tidal", "--num_layers=4", "--reselect=-1", "--budget=0.02",
                 "--remote=roar:64", "--model=m"}),
            0)
      << err_.str();
  KVR_ASSERT_OK_AND_ASSIGN(worker::LayerPolicy remote, worker::ParsePolicyJson(out_.str()));
  EXPECT_EQ(worker::PolicySummary(remote),
            "L0 full | L1 full | L2 select remote:roar budget=0.02 effort=64 | L3 reuse(2) ; "
            "sinks=0 window=1");
  EXPECT_EQ(Run({"policy", "tidal", "--num_layers=4", "--reselect=2", "--k=8"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("INVALID_ARGUMENT: TidalDecode preset: reselect_layer"));
  EXPECT_EQ(Run({"policy", "tidal", "--num_layers=4", "--reselect=3"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("--k=N"));

  ASSERT_EQ(Run({"policy", "put", preset, "--model=m"}), 0) << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("stored layer_policy version 1 of m: tidal-s1-r3-k=32: L0 full"));

  // A bad file: the error names the file, the layer and the field; nothing is stored.
  const std::string bad = dir_ + "/bad.json";
  KVR_ASSERT_OK(WriteStringToFileAtomic(
      bad, "{\"format\": \"kvrecall.layer_policy.v1\", \"num_layers\": 2, \"layers\": "
           "[{\"role\": \"full\"}, {\"role\": \"reuse\", \"source\": 0}]}"));
  EXPECT_EQ(Run({"policy", "put", bad, "--model=m"}), 1);
  EXPECT_THAT(err_.str(),
              HasSubstr("INVALID_ARGUMENT: " + bad + ": layer 1: reuse of layer 0, which selects "
                        "nothing (a full layer without a budget)"));
  KVR_ASSERT_OK(WriteStringToFileAtomic(bad, "{\"format\": \"kvrecall.layer_policy.v1\", "));
  EXPECT_EQ(Run({"policy", "put", bad, "--model=m"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("not valid JSON"));
  // A policy for another model.
  const std::string other = dir_ + "/other.json";
  ASSERT_EQ(Run({"policy", "tidal", "--num_layers=4", "--reselect=-1", "--k=8", "--model=x",
                 "-o", other}),
            0);
  EXPECT_EQ(Run({"policy", "put", other, "--model=m"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("the policy is for model \"x\", not --model=m"));
  // A policy of another layer count than the registered model's.
  const std::string eight = dir_ + "/eight.json";
  ASSERT_EQ(Run({"policy", "tidal", "--num_layers=8", "--reselect=-1", "--k=8", "-o", eight}), 0);
  EXPECT_EQ(Run({"policy", "put", eight, "--model=m"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("the policy has 8 layers but model m has 4"));
  EXPECT_EQ(Run({"policy", "put", eight, "--model=unregistered"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("NOT_FOUND"));
  EXPECT_EQ(Run({"policy", "put", dir_ + "/missing.json", "--model=m"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("NOT_FOUND"));

  ASSERT_EQ(Run({"policy", "put", preset, "--model=m", "--description=second"}), 0) << err_.str();
  ASSERT_EQ(Run({"policy", "ls", "--model=m"}), 0) << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("tidal-s1-r3-k=32"));
  const std::string listing = out_.str();
  EXPECT_EQ(std::count(listing.begin(), listing.end(), '\n'), 3) << listing;  // header + 2 versions
  ASSERT_EQ(Run({"--json", "policy", "ls", "--model=m"}), 0) << err_.str();
  nlohmann::json rows = nlohmann::json::parse(out_.str());
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[1]["version"], 2);
  EXPECT_EQ(rows[1]["description"], "second");
  EXPECT_EQ(rows[0]["valid"], true);

  ASSERT_EQ(Run({"policy", "get", "--model=m", "--version=1"}), 0) << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("layer_policy version 1 of m (tidal-s1-r3-k=32): L0 full"));
  EXPECT_THAT(out_.str(), HasSubstr("\"model\": \"m\""));  // stored with the model filled in
  const std::string back = dir_ + "/back.json";
  ASSERT_EQ(Run({"policy", "get", "--model=m", "-o", back}), 0) << err_.str();
  KVR_ASSERT_OK_AND_ASSIGN(std::string a, ReadFileToString(preset));
  KVR_ASSERT_OK_AND_ASSIGN(std::string b, ReadFileToString(back));
  KVR_ASSERT_OK_AND_ASSIGN(worker::LayerPolicy pa, worker::ParsePolicyJson(a));
  KVR_ASSERT_OK_AND_ASSIGN(worker::LayerPolicy pb, worker::ParsePolicyJson(b));
  pa.model_id = "m";
  EXPECT_EQ(pa, pb);
  EXPECT_EQ(Run({"policy", "get", "--model=m", "--version=9"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("NOT_FOUND"));

  // Bytes stored by the generic artifacts command that are not a policy.
  ASSERT_EQ(Run({"artifacts", "put", "--model=m", "--kind=layer_policy", "--file=" + bad}), 0);
  EXPECT_EQ(Run({"policy", "get", "--model=m"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("FAILED_PRECONDITION: layer_policy version 3 of m is not a "
                                    "valid policy"));
  ASSERT_EQ(Run({"policy", "ls", "--model=m"}), 0) << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("(invalid)"));
}

TEST_F(PolicyCommandsTest, ProfilePolicyFromCaptures) {
  const std::string caps = WriteCaptures("caps");
  const std::string policy = dir_ + "/hylra.json";
  ASSERT_EQ(Run({"profile-policy", "--captures=" + caps, "--model=m", "--k=16",
                 "--max_compute=3", "--steps=last:24", "--sinks=2", "--window=8", "-o", policy,
                 "--upload"},
                "auto"),
            0)
      << err_.str();
  // Not a terminal: one line per stage.
  EXPECT_THAT(err_.str(), HasSubstr("profile-policy:   0% read layer 0\n"));
  EXPECT_THAT(err_.str(), HasSubstr("layer 3 (24 steps)\n"));
  EXPECT_THAT(out_.str(), HasSubstr("ratio90"));
  EXPECT_THAT(out_.str(), HasSubstr("roles: L0 select | L1 select | L2 reuse(1) | L3 select"));
  EXPECT_THAT(out_.str(), HasSubstr("stored layer_policy version 1 of m"));
  KVR_ASSERT_OK_AND_ASSIGN(std::string text, ReadFileToString(policy));
  KVR_ASSERT_OK_AND_ASSIGN(worker::LayerPolicy p, worker::ParsePolicyJson(text));
  EXPECT_EQ(p.layers[2].role, worker::LayerRole::kReuse);
  EXPECT_EQ(p.layers[2].source, 1);
  EXPECT_EQ(p.model_id, "m");
  ASSERT_EQ(Run({"policy", "get", "--model=m"}), 0) << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("(hylra-c3-f0)"));

  // --json: matrices, sensitivities and the table; two captures jointly.
  const std::string caps2 = WriteCaptures("caps2");
  ASSERT_EQ(Run({"--json", "profile-policy", "--captures=" + caps + "," + caps2, "--model=m",
                 "--budget=0.05", "--max_compute=2", "--n_full=1", "--select=remote:roar:128",
                 "--steps=every:16", "--score=overlap", "--head_merge=mean"}),
            0)
      << err_.str();
  EXPECT_EQ(err_.str(), "");  // --progress=never
  nlohmann::json j = nlohmann::json::parse(out_.str());
  ASSERT_EQ(j["captures"].size(), 2u);
  EXPECT_EQ(j["captures"][0]["overlap"][1][2], 1.0);
  EXPECT_EQ(j["captures"][0]["ratio90"].size(), 4u);
  EXPECT_EQ(j["full_layers"].size(), 1u);
  EXPECT_EQ(j["path"]["num_compute"], 2);
  EXPECT_EQ(j["policy"]["layers"].size(), 4u);
  EXPECT_FALSE(j.contains("uploaded_version"));

  // Bad input.
  EXPECT_EQ(Run({"profile-policy", "--captures=" + caps, "--model=m", "--max_compute=2"}), 1);
  EXPECT_THAT(err_.str(), HasSubstr("--k=N"));
  EXPECT_EQ(Run({"profile-policy", "--captures=" + caps, "--model=m", "--k=4",
                 "--max_compute=2", "--select=local:roar"}),
            1);
  EXPECT_THAT(err_.str(), HasSubstr("--select=local:roar: layer 0: unknown local kind"));
  EXPECT_EQ(Run({"profile-policy", "--captures=" + caps, "--model=m", "--k=4",
                 "--max_compute=2", "--steps=first:3"}),
            1);
  EXPECT_THAT(err_.str(), HasSubstr("last:N"));
  EXPECT_EQ(Run({"profile-policy", "--captures=" + dir_ + "/nothing", "--model=m", "--k=4",
                 "--max_compute=2"}),
            1);
  EXPECT_THAT(err_.str(), HasSubstr("NOT_FOUND"));
  EXPECT_EQ(Run({"profile-policy", "--captures=" + caps, "--model=m", "--k=4",
                 "--max_compute=1", "--n_full=2"}),
            1);
  EXPECT_THAT(err_.str(), HasSubstr("max_compute=1 is below the 3 layers that must compute"));
  EXPECT_EQ(Run({"profile-policy", "--captures=" + caps, "--model=m", "--k=4"}), 2);  // usage
}

TEST_F(PolicyCommandsTest, ProfilePolicyOnTheAttnDevCapture) {
  const std::string caps = kvrecall::testing::SharedDir() + "/data/attn-dev";
  if (!std::filesystem::exists(caps + "/layer01_k.npy")) KVR_SKIP_WITHOUT_SHARED_DATA("no capture at " << caps);
  ASSERT_EQ(Run({"profile-policy", "--captures=" + caps, "--model=m", "--budget=0.02",
                 "--max_compute=2", "--n_full=1", "--renumber", "--steps=every:1024",
                 "--threads=2"}),
            0)
      << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("layers 1,3,5,7, 8192 tokens, 4 q / 2 kv heads, d=128; 4 steps"));
  EXPECT_THAT(out_.str(), HasSubstr("full layers: 0;"));
  EXPECT_THAT(out_.str(), HasSubstr("roles: L0 full | L1 select"));
  EXPECT_THAT(out_.str(), Not(HasSubstr("note:")));
  // Layers not captured are full, and the report says so.
  ASSERT_EQ(Run({"profile-policy", "--captures=" + caps, "--model=m", "--budget=0.02",
                 "--max_compute=6", "--steps=8191"}),
            0)
      << err_.str();
  EXPECT_THAT(out_.str(), HasSubstr("note: layers 0, 2, 4, 6 were not captured: FULL"));
}

}  // namespace
}  // namespace kvrecall::cli
