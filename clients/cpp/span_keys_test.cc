#include "clients/cpp/span_keys.h"

#include <fstream>
#include <random>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::client {
namespace {

using ::kvrecall::testing::StatusIs;

v1::ModelGeometry Model(int block_tokens) {
  v1::ModelGeometry g;
  g.set_model_id("m");
  g.set_num_layers(3);
  g.set_num_q_heads(2);
  g.set_num_kv_heads(2);
  g.set_head_dim(4);
  g.set_dtype(v1::DTYPE_F32);
  g.set_block_tokens(block_tokens);
  return g;
}

// The client's keys are the published contract: it must reproduce every
// shared vector (tests/vectors/span_hash_vectors.tsv).
TEST(SpanKeysTest, PassesTheSharedVectors) {
  std::ifstream in(kvrecall::testing::SourceDir() + "/tests/vectors/span_hash_vectors.tsv");
  ASSERT_TRUE(in.good());
  std::string line;
  int cases = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::vector<std::string> f = absl::StrSplit(line, '\t');
    ASSERT_EQ(f.size(), 7u) << line;
    std::vector<uint32_t> tokens;
    for (absl::string_view t : absl::StrSplit(f[4], ',', absl::SkipEmpty())) {
      uint32_t v = 0;
      ASSERT_TRUE(absl::SimpleAtoi(t, &v));
      tokens.push_back(v);
    }
    uint32_t block = 0;
    ASSERT_TRUE(absl::SimpleAtoi(f[2], &block));
    EXPECT_EQ(SpanRootHash(f[0], f[1]).ToHex(), f[5]);
    std::vector<std::string> got;
    for (const Hash128& h : ChainHashes(f[0], f[1], tokens, block, f[3] == "1")) {
      got.push_back(h.ToHex());
    }
    std::vector<std::string> want = absl::StrSplit(f[6], ',', absl::SkipEmpty());
    EXPECT_EQ(got, want) << "case " << cases;
    ++cases;
  }
  EXPECT_GE(cases, 8);
}

TEST(SpanKeysTest, SequenceToSpansAndBackIsTheIdentity) {
  const uint32_t seed = 7;
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  const v1::ModelGeometry model = Model(4);
  std::vector<uint32_t> tokens(10);
  for (auto& t : tokens) t = rng() % 1000;
  std::string sequence(SpanPayloadBytes(model, 10), '\0');
  for (char& c : sequence) c = static_cast<char>(rng());

  KVR_ASSERT_OK_AND_ASSIGN(auto spans, SequenceToSpans(model, "", tokens, sequence, true));
  ASSERT_EQ(spans.size(), 3u);  // 4 + 4 + 2 tokens
  EXPECT_EQ(spans[0].parent, SpanRootHash("m"));
  EXPECT_EQ(spans[1].parent, spans[0].hash);
  EXPECT_EQ(spans[2].token_ids.size(), 2u);
  EXPECT_EQ(spans[2].hash, SpanHash(spans[1].hash, spans[2].token_ids));
  // Span 1, layer 2, V, head 1, token 3 is sequence token 7 of that row.
  const int64_t row = (2 * 2 + 1) * 2 + 1;
  EXPECT_EQ(spans[1].payload.substr((row * 4 + 3) * 16, 16), sequence.substr((row * 10 + 7) * 16, 16));

  std::vector<absl::string_view> payloads;
  std::vector<int32_t> counts;
  for (const auto& s : spans) {
    payloads.push_back(s.payload);
    counts.push_back(static_cast<int32_t>(s.token_ids.size()));
  }
  KVR_ASSERT_OK_AND_ASSIGN(std::string back, SpansToSequence(model, 3, payloads, counts));
  EXPECT_EQ(back, sequence);

  KVR_ASSERT_OK_AND_ASSIGN(auto full_only, SequenceToSpans(model, "", tokens, sequence, false));
  EXPECT_EQ(full_only.size(), 2u);
}

TEST(SpanKeysTest, SizeMismatchesAreInvalidArgument) {
  const v1::ModelGeometry model = Model(4);
  std::vector<uint32_t> tokens(4, 1);
  EXPECT_THAT(SequenceToSpans(model, "", tokens, std::string(10, 'x'), false),
              StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<absl::string_view> payloads = {"abc"};
  std::vector<int32_t> counts = {4};
  EXPECT_THAT(SpansToSequence(model, 3, payloads, counts),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kvrecall::client
