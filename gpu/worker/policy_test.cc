// Role tables: JSON round trips, validation errors naming the layer and the
// field, presets.

#include "gpu/worker/policy.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::worker {
namespace {

using ::testing::HasSubstr;

LayerSpec Full(int32_t k = 0) {
  LayerSpec s;
  s.budget.k = k;
  return s;
}
LayerSpec Reuse(int32_t source) {
  LayerSpec s;
  s.role = LayerRole::kReuse;
  s.source = source;
  return s;
}
LayerSpec Select(SelectWhere where, std::string kind, Budget budget, int64_t effort = 0,
                 std::string knobs = "") {
  LayerSpec s;
  s.role = LayerRole::kSelect;
  s.where = where;
  s.kind = std::move(kind);
  s.budget = budget;
  s.effort = effort;
  s.knobs = std::move(knobs);
  return s;
}

// The example of policy.h's comment.
LayerPolicy Example() {
  LayerPolicy p;
  p.name = "tidal-r3";
  p.model_id = "kvr-tiny-llama";
  p.sinks = 4;
  p.window = 64;
  p.layers = {Full(),
              Full(128),
              Reuse(1),
              Select(SelectWhere::kLocal, "loki", {0, 0.02}, 0, "rank=32"),
              Select(SelectWhere::kRemote, "roar", {256, 0}, 128),
              Reuse(4),
              Select(SelectWhere::kLocal, "quest", {0, 1.0}, 0, "page=16"),
              Select(SelectWhere::kRemote, "all", {0, 0.125}, 0, "foo=bar,x=1")};
  return p;
}

// A policy JSON with `layers` spliced in.
std::string WithLayers(const std::string& layers, const std::string& extra = "") {
  int n = layers.empty() ? 0 : 1;
  int depth = 0;
  for (char c : layers) {
    if (c == '{') ++depth;
    if (c == '}') --depth;
    if (c == ',' && depth == 0) ++n;
  }
  return "{\"format\": \"kvrecall.layer_policy.v1\", \"name\": \"t\", \"num_layers\": " +
         std::to_string(n) + extra + ", \"layers\": [" + layers + "]}";
}

TEST(BudgetTest, ResolvesKOrAFractionRoundedUp) {
  EXPECT_EQ((Budget{128, 0}).Resolve(10), 128);
  EXPECT_EQ((Budget{0, 0.02}).Resolve(100), 2);  // 0.02 * 100 is 2.0000000000000004
  EXPECT_EQ((Budget{0, 0.02}).Resolve(101), 3);
  EXPECT_EQ((Budget{0, 0.02}).Resolve(8192), 164);
  EXPECT_EQ((Budget{0, 0.001}).Resolve(10), 1);
  EXPECT_EQ((Budget{0, 0}).Resolve(1000), 0);
  EXPECT_TRUE((Budget{}).empty());
}

TEST(PolicyJsonTest, RoundTripsExactly) {
  const LayerPolicy p = Example();
  KVR_ASSERT_OK(ValidatePolicy(p));
  const std::string json = PolicyToJson(p);
  KVR_ASSERT_OK_AND_ASSIGN(LayerPolicy back, ParsePolicyJson(json));
  EXPECT_EQ(back, p);
  EXPECT_EQ(PolicyToJson(back), json);
  // Fixed field order, one line per layer.
  EXPECT_THAT(json, HasSubstr("    {\"role\": \"full\", \"k\": 128},\n"));
  EXPECT_THAT(json, HasSubstr("{\"role\": \"select\", \"where\": \"local\", \"kind\": \"loki\", "
                              "\"budget\": 0.02, \"knobs\": \"rank=32\"}"));
  EXPECT_THAT(json, HasSubstr("{\"role\": \"select\", \"where\": \"remote\", \"kind\": \"roar\", "
                              "\"k\": 256, \"effort\": 128}"));
  EXPECT_THAT(json, HasSubstr("{\"role\": \"reuse\", \"source\": 4}"));
  EXPECT_EQ(json.rfind("{\n  \"format\": \"kvrecall.layer_policy.v1\",\n  \"name\": \"tidal-r3\",\n"
                       "  \"model\": \"kvr-tiny-llama\",\n  \"num_layers\": 8,\n  \"sinks\": 4,\n"
                       "  \"window\": 64,\n  \"layers\": [\n",
                       0),
            0u)
      << json;

  // Names with characters JSON must escape, and awkward fractions.
  LayerPolicy q = p;
  q.name = "quote\" back\\slash\n tab\t ünïcode";
  q.model_id.clear();
  q.layers[3].budget.fraction = 1.0 / 3.0;
  q.sinks = 0;
  q.window = 1;
  KVR_ASSERT_OK_AND_ASSIGN(LayerPolicy q2, ParsePolicyJson(PolicyToJson(q)));
  EXPECT_EQ(q2, q);
  EXPECT_THAT(PolicyToJson(q), ::testing::Not(HasSubstr("\"model\"")));
}

TEST(PolicyJsonTest, SinksAndWindowDefaultAndNameIsOptional) {
  KVR_ASSERT_OK_AND_ASSIGN(
      LayerPolicy p,
      ParsePolicyJson("{\"format\": \"kvrecall.layer_policy.v1\", \"num_layers\": 1, "
                      "\"layers\": [{\"role\": \"full\"}]}"));
  EXPECT_EQ(p.sinks, 4);
  EXPECT_EQ(p.window, 64);
  EXPECT_EQ(p.name, "");
  EXPECT_EQ(p.num_layers(), 1);
}

TEST(PolicyJsonTest, BadJsonNamesThePosition) {
  absl::StatusOr<LayerPolicy> r = ParsePolicyJson("{\"format\": \"kvrecall.layer_policy.v1\",\n"
                                                  "  \"num_layers\": 1,,\n}");
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("not valid JSON"));
  EXPECT_THAT(r.status().message(), HasSubstr("line 2"));
  EXPECT_EQ(ParsePolicyJson("").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ParsePolicyJson("[1, 2]").status().message(), HasSubstr("JSON object"));
}

struct BadCase {
  std::string json;
  std::string message;
};

TEST(PolicyJsonTest, RejectsBadDocumentsNamingTheFieldAndLayer) {
  const std::string fmt = "\"format\": \"kvrecall.layer_policy.v1\"";
  const std::vector<BadCase> cases = {
      {"{\"num_layers\": 1, \"layers\": [{\"role\": \"full\"}]}", "field 'format' is required"},
      {"{\"format\": \"kvrecall.layer_policy.v9\", \"num_layers\": 1, \"layers\": []}",
       "unknown format \"kvrecall.layer_policy.v9\""},
      {"{" + fmt + ", \"num_layers\": 1, \"layers\": [{\"role\": \"full\"}], \"extra\": 1}",
       "unknown field 'extra'"},
      {"{" + fmt + ", \"num_layers\": \"2\", \"layers\": []}",
       "field 'num_layers' must be an integer, got string \"2\""},
      {"{" + fmt + ", \"num_layers\": 2, \"layers\": [{\"role\": \"full\"}]}",
       "num_layers is 2 but 'layers' has 1 entries"},
      {"{" + fmt + ", \"num_layers\": 1, \"layers\": {}}", "field 'layers' must be an array"},
      {"{" + fmt + "}", "field 'num_layers' is required"},
      {"{" + fmt + ", \"num_layers\": 1, \"num_layers\": 1, \"layers\": [{\"role\": \"full\"}]}",
       "field 'num_layers' appears twice"},
      {WithLayers("{\"role\": \"full\"}", ", \"sinks\": -1"), "field 'sinks' must be in [0,"},
      {WithLayers("{\"role\": \"full\"}", ", \"window\": 0"), "field 'window' must be in [1,"},
      {WithLayers("{\"role\": \"full\"}", ", \"window\": 1.5"),
       "field 'window' must be an integer, got number 1.5"},
      {WithLayers("{\"role\": \"full\"}", ", \"model\": 3"), "field 'model' must be a string"},
      {WithLayers("{\"role\": \"full\"}, 7"), "layer 1: must be an object, got number 7"},
      {WithLayers("{\"role\": \"full\"}, {\"source\": 0}"), "layer 1: field 'role' is required"},
      {WithLayers("{\"role\": \"sparse\"}"), "layer 0: unknown role \"sparse\""},
      {WithLayers("{\"role\": 2}"), "layer 0: field 'role' must be a string, got number 2"},
      {WithLayers("{\"role\": \"full\", \"colour\": \"red\"}"), "layer 0: unknown field 'colour'"},
      {WithLayers("{\"role\": \"full\", \"source\": 0}"),
       "layer 0: field 'source' does not apply to a full layer"},
      {WithLayers("{\"role\": \"full\", \"k\": 8}, {\"role\": \"reuse\", \"source\": 0, \"k\": 4}"),
       "layer 1: field 'k' does not apply to a reuse layer"},
      {WithLayers("{\"role\": \"full\", \"k\": 0}"), "layer 0: field 'k' must be in [1,"},
      {WithLayers("{\"role\": \"full\", \"k\": 12.5}"),
       "layer 0: field 'k' must be an integer, got number 12.5"},
      {WithLayers("{\"role\": \"full\", \"budget\": 1.5}"),
       "layer 0: field 'budget' must be a fraction in (0, 1], got 1.5"},
      {WithLayers("{\"role\": \"full\", \"budget\": \"2%\"}"),
       "layer 0: field 'budget' must be a number in (0, 1], got string"},
      {WithLayers("{\"role\": \"full\", \"budget\": 0.1, \"k\": 3}"),
       "layer 0: a full layer takes k or budget, not both"},
      {WithLayers("{\"role\": \"full\"}, {\"role\": \"select\", \"kind\": \"loki\", \"k\": 8}"),
       "layer 1: field 'where' is required for a select layer"},
      {WithLayers("{\"role\": \"select\", \"where\": \"gpu\", \"kind\": \"loki\", \"k\": 8}"),
       "layer 0: field 'where' must be \"local\" or \"remote\", got \"gpu\""},
      {WithLayers("{\"role\": \"select\", \"where\": \"local\", \"k\": 8}"),
       "layer 0: a select layer needs a kind (exact, loki, quest)"},
      {WithLayers("{\"role\": \"select\", \"where\": \"local\", \"kind\": \"roar\", \"k\": 8}"),
       "layer 0: unknown local kind \"roar\" (exact, loki, quest)"},
      {WithLayers("{\"role\": \"select\", \"where\": \"remote\", \"kind\": \"exact\", \"k\": 8}"),
       "layer 0: unknown remote kind \"exact\""},
      {WithLayers("{\"role\": \"select\", \"where\": \"remote\", \"kind\": \"roar\"}"),
       "layer 0: a select layer needs k or budget"},
      {WithLayers("{\"role\": \"select\", \"where\": \"local\", \"kind\": \"loki\", \"k\": 8, "
                  "\"effort\": 64}"),
       "layer 0: effort applies to remote selection only"},
      {WithLayers("{\"role\": \"select\", \"where\": \"remote\", \"kind\": \"roar\", \"k\": 8, "
                  "\"effort\": -1}"),
       "layer 0: field 'effort' must be in [0,"},
      {WithLayers("{\"role\": \"select\", \"where\": \"local\", \"kind\": \"loki\", \"k\": 8, "
                  "\"knobs\": \"rank=24\"}"),
       "layer 0: local loki knob rank=24: use 16, 32 or 64"},
      {WithLayers("{\"role\": \"select\", \"where\": \"local\", \"kind\": \"quest\", \"k\": 8, "
                  "\"knobs\": \"page=0\"}"),
       "layer 0: local quest knob page=0"},
      {WithLayers("{\"role\": \"select\", \"where\": \"local\", \"kind\": \"exact\", \"k\": 8, "
                  "\"knobs\": \"rank=16\"}"),
       "layer 0: local exact has no knob \"rank\" (it takes none)"},
      {WithLayers("{\"role\": \"select\", \"where\": \"remote\", \"kind\": \"roar\", \"k\": 8, "
                  "\"knobs\": \"ef\"}"),
       "layer 0: knobs \"ef\": entry \"ef\" is not key=value"},
      {WithLayers("{\"role\": \"select\", \"where\": \"remote\", \"kind\": \"roar\", \"k\": 8, "
                  "\"knobs\": \"a=1,a=2\"}"),
       "layer 0: knobs \"a=1,a=2\": key \"a\" repeats"},
      {WithLayers("{\"role\": \"full\", \"k\": 8}, {\"role\": \"reuse\"}"),
       "layer 1: field 'source' is required for a reuse layer"},
      {WithLayers("{\"role\": \"full\", \"k\": 8}, {\"role\": \"reuse\", \"source\": -1}"),
       "layer 1: field 'source' must be in [0,"},
      // The two errors the issue names.
      {WithLayers("{\"role\": \"full\", \"k\": 8}, {\"role\": \"full\"}, {\"role\": \"full\"}, "
                  "{\"role\": \"full\"}, {\"role\": \"full\"}, {\"role\": \"reuse\", \"source\": 7}"),
       "layer 5: reuse of layer 7, which is not an earlier layer"},
      {WithLayers("{\"role\": \"full\"}, {\"role\": \"full\", \"k\": 4}, {\"role\": \"full\"}, "
                  "{\"role\": \"reuse\", \"source\": 0}"),
       "layer 3: reuse of layer 0, which selects nothing (a full layer without a budget)"},
      {WithLayers("{\"role\": \"reuse\", \"source\": 0}"),
       "layer 0: reuse of layer 0, which is not an earlier layer"},
      {WithLayers("{\"role\": \"full\", \"k\": 4}, {\"role\": \"reuse\", \"source\": 0}, "
                  "{\"role\": \"reuse\", \"source\": 1}"),
       "layer 2: reuse of layer 1, which selects nothing (it reuses layer 0; name that layer)"},
      {"{" + fmt + ", \"num_layers\": 0, \"layers\": []}", "field 'num_layers' must be in [1,"},
  };
  for (const BadCase& c : cases) {
    absl::StatusOr<LayerPolicy> r = ParsePolicyJson(c.json);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.json;
    EXPECT_THAT(r.status().message(), HasSubstr(c.message)) << c.json;
  }
}

TEST(ValidatePolicyTest, RejectsFieldsARoleDoesNotUse) {
  LayerPolicy p;
  p.layers = {Full(4), Reuse(0)};
  KVR_EXPECT_OK(ValidatePolicy(p));
  p.layers[1].budget.k = 3;
  EXPECT_THAT(ValidatePolicy(p).message(), HasSubstr("layer 1: a reuse layer takes no budget"));
  p.layers[1] = Reuse(0);
  p.layers[0].kind = "loki";
  EXPECT_THAT(ValidatePolicy(p).message(), HasSubstr("layer 0: a full layer takes no kind"));
  p.layers[0] = Full(4);
  p.layers[0].source = 0;
  EXPECT_THAT(ValidatePolicy(p).message(), HasSubstr("layer 0: a full layer takes no source"));
  p.layers[0] = Select(SelectWhere::kLocal, "exact", {4, 0});
  p.layers[0].source = 0;
  EXPECT_THAT(ValidatePolicy(p).message(), HasSubstr("layer 0: a select layer takes no source"));
  p.layers.clear();
  EXPECT_THAT(ValidatePolicy(p).message(), HasSubstr("at least one layer"));
  p.layers = {Full()};
  p.window = 0;
  EXPECT_THAT(ValidatePolicy(p).message(), HasSubstr("window must be >= 1"));
  p.window = 1;
  p.sinks = -2;
  EXPECT_THAT(ValidatePolicy(p).message(), HasSubstr("sinks must be >= 0"));
}

TEST(PolicyTest, SelectsIsReusedAndCounts) {
  const LayerPolicy p = Example();
  EXPECT_FALSE(p.Selects(0));
  EXPECT_TRUE(p.Selects(1));
  EXPECT_FALSE(p.Selects(2));
  EXPECT_TRUE(p.Selects(3));
  EXPECT_TRUE(p.Selects(4));
  EXPECT_FALSE(p.Selects(8));
  EXPECT_TRUE(p.IsReused(1));
  EXPECT_FALSE(p.IsReused(3));
  EXPECT_TRUE(p.IsReused(4));
  EXPECT_EQ(p.CountRole(LayerRole::kFull), 2);
  EXPECT_EQ(p.CountRole(LayerRole::kSelect), 4);
  EXPECT_EQ(p.CountRole(LayerRole::kReuse), 2);
}

TEST(PolicyTest, SummaryIsOneLine) {
  const std::string s = PolicySummary(Example());
  EXPECT_EQ(s,
            "L0 full | L1 full k=128 | L2 reuse(1) | L3 select local:loki budget=0.02 rank=32 | "
            "L4 select remote:roar k=256 effort=128 | L5 reuse(4) | "
            "L6 select local:quest budget=1 page=16 | L7 select remote:all budget=0.125 foo=bar,x=1"
            " ; sinks=4 window=64");
  EXPECT_EQ(s.find('\n'), std::string::npos);
}

TEST(PresetsTest, TidalDecodePaperDefaults) {
  KVR_ASSERT_OK_AND_ASSIGN(LayerPolicy p, TidalDecodePolicy(TidalDecodeOptions()));
  ASSERT_EQ(p.num_layers(), 32);
  EXPECT_EQ(p.sinks, 0);
  EXPECT_EQ(p.window, 1);
  EXPECT_EQ(p.layers[0], Full());
  EXPECT_EQ(p.layers[1], Full());
  EXPECT_EQ(p.layers[2], Full(128));
  for (int l = 3; l < 13; ++l) EXPECT_EQ(p.layers[l], Reuse(2)) << l;
  EXPECT_EQ(p.layers[13], Full(128));
  for (int l = 14; l < 32; ++l) EXPECT_EQ(p.layers[l], Reuse(13)) << l;
  EXPECT_EQ(p.name, "tidal-s2-r13-k=128");
  KVR_ASSERT_OK_AND_ASSIGN(LayerPolicy back, ParsePolicyJson(PolicyToJson(p)));
  EXPECT_EQ(back, p);
}

TEST(PresetsTest, TidalDecodeVariants) {
  TidalDecodeOptions o;
  o.num_layers = 8;
  o.num_full = 1;
  o.select_layer = 2;
  o.reselect_layer = -1;
  o.budget = {0, 0.02};
  o.remote_kind = "roar";
  o.remote_effort = 256;
  o.sinks = 4;
  o.window = 64;
  KVR_ASSERT_OK_AND_ASSIGN(LayerPolicy p, TidalDecodePolicy(o));
  EXPECT_EQ(p.layers[0], Full());
  EXPECT_EQ(p.layers[1], Full());  // between num_full and the selection layer
  EXPECT_EQ(p.layers[2], Select(SelectWhere::kRemote, "roar", {0, 0.02}, 256));
  for (int l = 3; l < 8; ++l) EXPECT_EQ(p.layers[l], Reuse(2));

  o.reselect_layer = 2;
  EXPECT_THAT(TidalDecodePolicy(o).status().message(), HasSubstr("reselect_layer must be in"));
  o.reselect_layer = 8;
  EXPECT_THAT(TidalDecodePolicy(o).status().message(), HasSubstr("reselect_layer must be in"));
  o.reselect_layer = 5;
  o.select_layer = 8;
  EXPECT_THAT(TidalDecodePolicy(o).status().message(), HasSubstr("select_layer must be in"));
  o.select_layer = 2;
  o.num_full = 3;
  EXPECT_THAT(TidalDecodePolicy(o).status().message(), HasSubstr("num_full must be in"));
  o.num_full = 2;
  o.budget = {};
  EXPECT_THAT(TidalDecodePolicy(o).status().message(), HasSubstr("budget"));
  o.budget = {64, 0};
  o.remote_kind = "nope";
  EXPECT_THAT(TidalDecodePolicy(o).status().message(),
              HasSubstr("layer 2: unknown remote kind \"nope\""));
}

TEST(PresetsTest, UniformSelect) {
  KVR_ASSERT_OK_AND_ASSIGN(
      LayerPolicy p,
      UniformSelectPolicy(4, Select(SelectWhere::kRemote, "roar", {0, 0.01}, 128), 1, 4, 64));
  EXPECT_EQ(p.layers[0], Full());
  for (int l = 1; l < 4; ++l) {
    EXPECT_EQ(p.layers[l], Select(SelectWhere::kRemote, "roar", {0, 0.01}, 128));
  }
  EXPECT_EQ(UniformSelectPolicy(4, Select(SelectWhere::kLocal, "roar", {8, 0}), 0, 4, 64)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UniformSelectPolicy(0, Select(SelectWhere::kLocal, "exact", {8, 0}), 0, 4, 64)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvrecall::worker
