#include "service/rpc/proto_convert.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/status_matchers.h"

namespace kvrecall::rpc {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

v1::ModelGeometry Tiny() {
  v1::ModelGeometry g;
  g.set_model_id("tiny");
  g.set_num_layers(2);
  g.set_num_q_heads(4);
  g.set_num_kv_heads(2);
  g.set_head_dim(8);
  g.set_dtype(v1::DTYPE_BF16);
  g.set_keys_post_rope(true);
  return g;
}

TEST(ProtoConvertTest, GeometryRoundTripFillsDefaultBlock) {
  KVR_ASSERT_OK_AND_ASSIGN(store::ModelGeometry g, GeometryFromProto(Tiny()));
  EXPECT_EQ(g.block_tokens, 256);
  EXPECT_EQ(g.dtype, DType::kBf16);
  v1::ModelGeometry back = GeometryToProto(g);
  EXPECT_EQ(back.block_tokens(), 256);
  back.set_block_tokens(0);
  EXPECT_EQ(back.SerializeAsString(), Tiny().SerializeAsString());
}

TEST(ProtoConvertTest, GeometryValidationNamesTheField) {
  v1::ModelGeometry g = Tiny();
  g.set_model_id("");
  EXPECT_THAT(GeometryFromProto(g),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model_id")));
  g = Tiny();
  g.set_num_layers(0);
  EXPECT_THAT(GeometryFromProto(g),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_layers")));
  g = Tiny();
  g.set_num_q_heads(3);
  EXPECT_THAT(GeometryFromProto(g),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("multiple")));
  g = Tiny();
  g.set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_THAT(GeometryFromProto(g),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model.dtype")));
  g = Tiny();
  g.set_block_tokens(-1);
  EXPECT_THAT(GeometryFromProto(g),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("block_tokens")));
}

TEST(ProtoConvertTest, HashMustBe16Bytes) {
  EXPECT_THAT(HashFromProto("short", "hashes[3]"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("hashes[3]")));
  const Hash128 h{0x0102030405060708ULL, 0x1112131415161718ULL};
  KVR_ASSERT_OK_AND_ASSIGN(Hash128 back, HashFromProto(h.ToBytes(), "hash"));
  EXPECT_EQ(back, h);
}

TEST(ProtoConvertTest, EnumsMapEveryValue) {
  EXPECT_EQ(MissReasonToProto(store::MissReason::kNeverStored), v1::MISS_REASON_NEVER_STORED);
  EXPECT_EQ(MissReasonToProto(store::MissReason::kEvicted), v1::MISS_REASON_EVICTED);
  EXPECT_EQ(MissReasonToProto(store::MissReason::kDeleted), v1::MISS_REASON_DELETED);
  EXPECT_EQ(MissReasonToProto(store::MissReason::kModelMismatch), v1::MISS_REASON_MODEL_MISMATCH);
  EXPECT_EQ(MissReasonToProto(store::MissReason::kChecksumFailure),
            v1::MISS_REASON_CHECKSUM_FAILURE);
  EXPECT_EQ(MissReasonToProto(store::MissReason::kOtherNamespace),
            v1::MISS_REASON_OTHER_NAMESPACE);
  EXPECT_EQ(MissReasonToProto(store::MissReason::kParentMissing), v1::MISS_REASON_PARENT_MISSING);
  EXPECT_EQ(TierToProto(store::TierId::kMemory), v1::TIER_MEMORY);
  EXPECT_EQ(TierToProto(store::TierId::kDisk), v1::TIER_DISK);
  EXPECT_EQ(TierToProto(store::TierId::kRocksDb), v1::TIER_ROCKSDB);
  for (DType d : {DType::kF16, DType::kBf16, DType::kF32}) {
    KVR_ASSERT_OK_AND_ASSIGN(DType back, DTypeFromProto(DTypeToProto(d), "dtype"));
    EXPECT_EQ(back, d);
  }
}

}  // namespace
}  // namespace kvrecall::rpc
