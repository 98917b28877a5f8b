#include "clients/cli/inputs.h"

#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/npy.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::cli {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

v1::ModelGeometry Model(v1::DType dtype) {
  v1::ModelGeometry g;
  g.set_model_id("m");
  g.set_num_layers(2);
  g.set_num_q_heads(2);
  g.set_num_kv_heads(1);
  g.set_head_dim(4);
  g.set_dtype(dtype);
  g.set_block_tokens(4);
  return g;
}

TEST(InputsTest, TokenIdsFromNpyOrText) {
  const std::string dir = kvrecall::testing::MakeTempDir("cli-inputs");
  NpyArray ids;
  ids.descr = "<i8";
  ids.shape = {3};
  const int64_t values[] = {5, 0, 4000000000};
  ids.data.assign(reinterpret_cast<const char*>(values), sizeof(values));
  KVR_ASSERT_OK(WriteNpy(dir + "/ids.npy", ids));
  KVR_ASSERT_OK_AND_ASSIGN(auto tokens, ReadTokenIds(dir + "/ids.npy", ""));
  EXPECT_THAT(tokens, ::testing::ElementsAre(5, 0, 4000000000u));

  KVR_ASSERT_OK(WriteStringToFileAtomic(dir + "/t.txt", "Ab"));
  KVR_ASSERT_OK_AND_ASSIGN(auto bytes, ReadTokenIds("", dir + "/t.txt"));
  EXPECT_THAT(bytes, ::testing::ElementsAre(65, 98));

  EXPECT_THAT(ReadTokenIds("", ""), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ReadTokenIds(dir + "/ids.npy", dir + "/t.txt"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ids.descr = "<f4";
  ids.data.resize(12);
  KVR_ASSERT_OK(WriteNpy(dir + "/f.npy", ids));
  EXPECT_THAT(ReadTokenIds(dir + "/f.npy", ""),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("integers")));
  const int64_t negative[] = {-1, 2, 3};
  ids.descr = "<i8";
  ids.data.assign(reinterpret_cast<const char*>(negative), sizeof(negative));
  KVR_ASSERT_OK(WriteNpy(dir + "/neg.npy", ids));
  EXPECT_THAT(ReadTokenIds(dir + "/neg.npy", ""),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("-1")));
}

TEST(InputsTest, SequenceNpyIsConvertedToTheModelDType) {
  const std::string dir = kvrecall::testing::MakeTempDir("cli-inputs");
  NpyArray a;
  a.descr = "<f4";
  a.shape = {2, 2, 1, 3, 4};
  std::vector<float> values(48);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.25f * static_cast<float>(i) - 3.0f;
  a.data.assign(reinterpret_cast<const char*>(values.data()), values.size() * 4);
  KVR_ASSERT_OK(WriteNpy(dir + "/kv.npy", a));
  KVR_ASSERT_OK_AND_ASSIGN(SequenceData f16, ReadSequenceNpy(dir + "/kv.npy", Model(v1::DTYPE_F16)));
  EXPECT_EQ(f16.num_tokens, 3);
  ASSERT_EQ(f16.kv.size(), 96u);
  std::vector<float> back(48);
  ConvertToFloat(f16.kv.data(), DType::kF16, 48, back.data());
  EXPECT_EQ(back, values);  // multiples of 0.25 are exact in f16
  KVR_ASSERT_OK_AND_ASSIGN(SequenceData f32, ReadSequenceNpy(dir + "/kv.npy", Model(v1::DTYPE_F32)));
  EXPECT_EQ(f32.kv, a.data);

  v1::ModelGeometry wrong = Model(v1::DTYPE_F16);
  wrong.set_head_dim(8);
  EXPECT_THAT(ReadSequenceNpy(dir + "/kv.npy", wrong),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("is not [2, 2, 1, tokens, 8]")));

  KVR_ASSERT_OK_AND_ASSIGN(NpyArray out, SequenceToNpy(f16.kv, Model(v1::DTYPE_F16), 2, 3, true));
  EXPECT_EQ(out.descr, "<f4");
  EXPECT_EQ(out.data, a.data);
  KVR_ASSERT_OK_AND_ASSIGN(NpyArray raw, SequenceToNpy(f16.kv, Model(v1::DTYPE_BF16), 2, 3, false));
  EXPECT_EQ(raw.descr, "<u2");
}

// Writes a .safetensors file by hand (8-byte header length, JSON, data).
std::string Safetensors(const std::vector<std::pair<std::string, std::string>>& tensors,
                        const std::vector<std::string>& specs) {
  std::string json = "{";
  std::string data;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const size_t begin = data.size();
    data += tensors[i].second;
    absl::StrAppend(&json, i ? "," : "", "\"", tensors[i].first, "\":{", specs[i],
                    ",\"data_offsets\":[", begin, ",", data.size(), "]}");
  }
  json += ",\"__metadata__\":{\"format\":\"pt\"}}";
  const uint64_t n = json.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + json + data;
}

TEST(InputsTest, SafetensorsKeysValuesAndTokenIds) {
  const std::string dir = kvrecall::testing::MakeTempDir("cli-inputs");
  // keys/values [layers=2, kv_heads=1, tokens=2, head_dim=4], f32
  std::vector<float> k(16), v(16);
  for (int i = 0; i < 16; ++i) {
    k[i] = static_cast<float>(i);
    v[i] = static_cast<float>(100 + i);
  }
  const int32_t ids[] = {7, 8};
  const std::string file = Safetensors(
      {{"keys", std::string(reinterpret_cast<const char*>(k.data()), 64)},
       {"values", std::string(reinterpret_cast<const char*>(v.data()), 64)},
       {"token_ids", std::string(reinterpret_cast<const char*>(ids), 8)}},
      {"\"dtype\":\"F32\",\"shape\":[2,1,2,4]", "\"dtype\":\"F32\",\"shape\":[2,1,2,4]",
       "\"dtype\":\"I32\",\"shape\":[2]"});
  KVR_ASSERT_OK(WriteStringToFileAtomic(dir + "/kv.safetensors", file));
  KVR_ASSERT_OK_AND_ASSIGN(SequenceData s,
                           ReadSafetensors(dir + "/kv.safetensors", Model(v1::DTYPE_F32)));
  EXPECT_EQ(s.num_tokens, 2);
  EXPECT_THAT(s.token_ids, ::testing::ElementsAre(7, 8));
  ASSERT_EQ(s.kv.size(), 128u);
  std::vector<float> got(32);
  std::memcpy(got.data(), s.kv.data(), 128);
  // [layer][K|V][head][token][dim]: layer 0 K, layer 0 V, layer 1 K, layer 1 V
  EXPECT_EQ(got[0], 0.0f);
  EXPECT_EQ(got[8], 100.0f);
  EXPECT_EQ(got[16], 8.0f);
  EXPECT_EQ(got[24], 108.0f);

  KVR_ASSERT_OK(WriteStringToFileAtomic(dir + "/bad.safetensors", file.substr(0, 20)));
  EXPECT_THAT(ReadSafetensors(dir + "/bad.safetensors", Model(v1::DTYPE_F32)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ReadSafetensors(dir + "/kv.safetensors", Model(v1::DTYPE_F16)).status(),
              ::kvrecall::testing::IsOk());
  v1::ModelGeometry three_layers = Model(v1::DTYPE_F32);
  three_layers.set_num_layers(3);
  EXPECT_THAT(ReadSafetensors(dir + "/kv.safetensors", three_layers),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("keys and values")));
}

}  // namespace
}  // namespace kvrecall::cli
