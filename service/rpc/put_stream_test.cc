// PutStream's wire-format parsing and span assembly, without gRPC calls.

#include "service/rpc/put_stream.h"

#include <random>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/checksum.h"
#include "common/span_hash.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/store/tiered_store.h"
#include "tests/testing/largest_allocation.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"

namespace kvrecall::rpc {
namespace {

using ::kvrecall::testing::StatusIs;
using ::testing::HasSubstr;

class PutStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store::TieredStoreOptions o;
    o.data_dir = kvrecall::testing::MakeTempDir("put-stream-test");
    o.memory_capacity_bytes = 16 << 20;
    KVR_ASSERT_OK_AND_ASSIGN(store_, store::TieredStore::Open(o));
    store::ModelGeometry g;
    g.model_id = "m";
    g.num_layers = 1;
    g.num_q_heads = 1;
    g.num_kv_heads = 1;
    g.head_dim = 4;
    g.dtype = DType::kF32;
    g.block_tokens = 8;
    KVR_ASSERT_OK(store_->RegisterModel(g));
    std::mt19937 rng(5);
    payload_.resize(2 * 8 * 4 * 4);  // K and V of 8 tokens x 4 f32
    for (char& c : payload_) c = static_cast<char>(rng());
    tokens_ = {1, 2, 3, 4, 5, 6, 7, 8};
    hash_ = SpanHash(SpanRootHash("m"), tokens_);
  }

  v1::PutSpanHeader Header() {
    v1::PutSpanHeader h;
    h.set_model_id("m");
    h.set_hash(hash_.ToBytes());
    h.set_parent_hash(SpanRootHash("m").ToBytes());
    h.set_num_tokens(8);
    h.mutable_token_ids()->Add(tokens_.begin(), tokens_.end());
    h.set_payload_bytes(static_cast<int64_t>(payload_.size()));
    h.set_payload_checksum(Checksum64(payload_));
    return h;
  }

  // Field 2 (payload_chunk) encoded by hand.
  static std::string Chunk(absl::string_view bytes) {
    v1::PutSpansRequest m;
    m.set_payload_chunk(std::string(bytes));
    return m.SerializeAsString();
  }
  static std::string HeaderField(const v1::PutSpanHeader& h) {
    v1::PutSpansRequest m;
    *m.mutable_header() = h;
    return m.SerializeAsString();
  }

  grpc::ByteBuffer Split(const std::string& bytes, size_t piece) {
    std::vector<grpc::Slice> slices;
    for (size_t at = 0; at < bytes.size(); at += piece) {
      slices.emplace_back(bytes.substr(at, piece));
    }
    return grpc::ByteBuffer(slices.data(), slices.size());
  }

  std::unique_ptr<store::TieredStore> store_;
  std::string payload_;
  std::vector<uint32_t> tokens_;
  Hash128 hash_;
};

TEST_F(PutStreamTest, AssemblesChunksSplitOverSlicesAndStoresTheSpan) {
  PutStream stream(store_.get(), "", 1 << 20);
  bool complete = false;
  // Payload field first, then the header: protobuf allows any field order.
  const std::string first = Chunk(payload_.substr(0, 100)) + HeaderField(Header());
  KVR_ASSERT_OK(stream.Consume(Split(first, 7), &complete));
  EXPECT_FALSE(complete);
  KVR_ASSERT_OK(stream.Consume(Split(Chunk(payload_.substr(100)), 13), &complete));
  ASSERT_TRUE(complete);
  KVR_ASSERT_OK(stream.StoreComplete());
  KVR_ASSERT_OK(stream.End());
  EXPECT_EQ(stream.response().results_size(), 1);
  EXPECT_EQ(stream.response().payload_bytes(), static_cast<int64_t>(payload_.size()));
  store::GetResult got = store_->Get(store::SpanKey{"", hash_}, "m");
  ASSERT_NE(got.span, nullptr);
  EXPECT_EQ(got.span->payload, payload_);
}

TEST_F(PutStreamTest, SpanBuffersAreHeldAgainstTheInflightBound) {
  // Room for one span's payload in flight, not two.
  InflightLimiter limiter(static_cast<int64_t>(payload_.size()) + 10, 0);
  PutStream first(store_.get(), "", 1 << 20, true, &limiter);
  PutStream second(store_.get(), "", 1 << 20, true, &limiter);
  bool complete = false;
  KVR_ASSERT_OK(first.ConsumeBytes(HeaderField(Header()) + Chunk(payload_.substr(0, 8)),
                                   &complete));
  EXPECT_EQ(limiter.bytes(), static_cast<int64_t>(payload_.size()));
  EXPECT_THAT(second.ConsumeBytes(HeaderField(Header()), &complete),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("--max_inflight_bytes")));
  KVR_ASSERT_OK(first.ConsumeBytes(Chunk(payload_.substr(8)), &complete));
  ASSERT_TRUE(complete);
  KVR_ASSERT_OK(first.StoreComplete());
  EXPECT_EQ(limiter.bytes(), 0);  // stored: released
  KVR_ASSERT_OK(second.ConsumeBytes(HeaderField(Header()), &complete));
}

TEST_F(PutStreamTest, HeadersWithoutTokenIdsAreRefusedUnlessAllowed) {
  v1::PutSpanHeader h = Header();
  h.clear_token_ids();
  bool complete = false;
  PutStream strict(store_.get(), "", 1 << 20);
  EXPECT_THAT(strict.ConsumeBytes(HeaderField(h) + Chunk(payload_), &complete),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("token_ids: required")));
  PutStream lax(store_.get(), "", 1 << 20, /*require_token_ids=*/false);
  KVR_ASSERT_OK(lax.ConsumeBytes(HeaderField(h) + Chunk(payload_), &complete));
  EXPECT_TRUE(complete);
}

TEST_F(PutStreamTest, TheLastPayloadFieldOfAMessageWins) {
  PutStream stream(store_.get(), "", 1 << 20);
  bool complete = false;
  const std::string message = HeaderField(Header()) + Chunk("garbage") + Chunk(payload_);
  KVR_ASSERT_OK(stream.ConsumeBytes(message, &complete));
  ASSERT_TRUE(complete);
  KVR_ASSERT_OK(stream.StoreComplete());
  EXPECT_EQ(store_->Get(store::SpanKey{"", hash_}, "m").span->payload, payload_);
}

TEST_F(PutStreamTest, UnknownFieldsAreSkipped) {
  PutStream stream(store_.get(), "", 1 << 20);
  bool complete = false;
  // field 9 varint, field 10 fixed64, field 11 fixed32, field 12 bytes
  const std::string unknown = std::string("\x48\x05", 2) + std::string("\x51", 1) +
                              std::string(8, '\x01') + std::string("\x5d", 1) +
                              std::string(4, '\x02') + std::string("\x62\x03xyz", 5);
  KVR_ASSERT_OK(stream.ConsumeBytes(unknown + HeaderField(Header()) + Chunk(payload_), &complete));
  EXPECT_TRUE(complete);
}

TEST_F(PutStreamTest, MalformedMessagesAreInvalidArgument) {
  bool complete = false;
  for (const std::string& bad :
       {std::string("\x0a\x7f", 2),             // header length past the end
        std::string("\x12\xff\xff\xff\xff\x0f", 6),  // chunk length past the end
        std::string("\x0b", 1),                 // group wire type
        std::string("\x80", 1)}) {              // truncated varint
    PutStream stream(store_.get(), "", 1 << 20);
    EXPECT_THAT(stream.ConsumeBytes(bad, &complete), StatusIs(absl::StatusCode::kInvalidArgument))
        << absl::CHexEscape(bad);
  }
  PutStream stream(store_.get(), "", 1 << 20);
  EXPECT_THAT(stream.ConsumeBytes(HeaderField(Header()) + std::string("\x12\x02x", 3), &complete),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// Found by put_stream_fuzz (fuzz/corpus/put_stream/header_length_past_end):
// a 117-byte message whose header field claimed 58 MiB made the parser
// allocate and zero 58 MiB before it found the bytes missing, so a client
// could make the daemon allocate 64 MiB per tiny message, outside the
// in-flight byte bound.
TEST_F(PutStreamTest, ALengthPastTheEndAllocatesNothingOfIt) {
  const std::string claims_58_mib("\x0a\xf3\xc1\x87\x1d" "abc", 8);
  const std::string valid_then_claims_64_mib =
      HeaderField(Header()) + std::string("\x0a\x80\x80\x80\x20" "abc", 8);
  for (const std::string& bad : {claims_58_mib, valid_then_claims_64_mib}) {
    PutStream stream(store_.get(), "", 1 << 20);
    bool complete = false;
    kvrecall::testing::LargestAllocation largest;
    EXPECT_THAT(stream.ConsumeBytes(bad, &complete), StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_LT(largest.bytes(), size_t{1} << 20) << absl::CHexEscape(bad);
  }
}

TEST_F(PutStreamTest, EndAndCancelSayWhatIsStored) {
  PutStream empty(store_.get(), "", 1 << 20);
  EXPECT_THAT(empty.End(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty")));
  PutStream partial(store_.get(), "", 1 << 20);
  bool complete = false;
  KVR_ASSERT_OK(partial.ConsumeBytes(HeaderField(Header()) + Chunk(payload_.substr(0, 10)), &complete));
  EXPECT_THAT(partial.End(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("ended after 10 of 256")));
  EXPECT_THAT(partial.Cancelled(), StatusIs(absl::StatusCode::kCancelled));
  EXPECT_EQ(store_->Stats().tiers[0].spans, 0);
}

}  // namespace
}  // namespace kvrecall::rpc

namespace kvrecall::rpc {
namespace {

TEST(InflightLimiterTest, BytesAndStreamsAreBoundedAndReleased) {
  InflightLimiter limiter(100, 2);
  KVR_ASSERT_OK_AND_ASSIGN(InflightBytes a, limiter.AcquireBytes(60));
  EXPECT_THAT(limiter.AcquireBytes(41).status(),
              ::kvrecall::testing::StatusIs(absl::StatusCode::kResourceExhausted,
                                            ::testing::HasSubstr("--max_inflight_bytes")));
  {
    KVR_ASSERT_OK_AND_ASSIGN(InflightBytes b, limiter.AcquireBytes(40));
    EXPECT_EQ(limiter.bytes(), 100);
  }
  EXPECT_EQ(limiter.bytes(), 60);
  KVR_ASSERT_OK(limiter.Grow(&a, 40));
  EXPECT_EQ(a.bytes(), 100);
  a.Release();
  EXPECT_EQ(limiter.bytes(), 0);
  KVR_ASSERT_OK(limiter.EnterStream());
  KVR_ASSERT_OK(limiter.EnterStream());
  EXPECT_THAT(limiter.EnterStream(),
              ::kvrecall::testing::StatusIs(absl::StatusCode::kResourceExhausted,
                                            ::testing::HasSubstr("--max_concurrent_streams")));
  limiter.ExitStream();
  KVR_ASSERT_OK(limiter.EnterStream());
}

}  // namespace
}  // namespace kvrecall::rpc
