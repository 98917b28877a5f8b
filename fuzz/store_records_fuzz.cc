// libFuzzer target: decoding of on-disk records from untrusted bytes: disk
// segment headers and records (service/store/segment_format.h), span meta,
// model and cold-span records of the RocksDB catalog (service/store/codec.h),
// and the decompression of a cold span's stored bytes by the size its record
// claims (service/store/compression.h).
#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "service/store/codec.h"
#include "service/store/compression.h"
#include "service/store/segment_format.h"

using namespace kvrecall::store;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view in(reinterpret_cast<const char*>(data), size);
  (void)DecodeSegmentHeader(in.substr(0, 32)).ok();
  if (in.size() >= kRecordHeaderBytes) {
    auto header = ParseRecordHeader(in.substr(0, kRecordHeaderBytes));
    if (header.ok()) {
      const absl::string_view rest = in.substr(kRecordHeaderBytes);
      const absl::string_view meta = rest.substr(0, std::min<size_t>(rest.size(), header->meta_len));
      (void)VerifyHeaderChecksum(*header, in.substr(0, kRecordHeaderBytes), meta);
      SpanKey key;
      SpanMeta span_meta;
      (void)DecodeRecordMeta(*header, meta, true, &key, &span_meta);
      (void)DecodeRecordMeta(*header, meta, false, &key, nullptr);
    }
  }
  {
    ByteReader reader(in);
    SpanMeta meta;
    (void)DecodeSpanMeta(&reader, true, &meta);
  }
  {
    // A cold-span record, then its stored bytes: the first byte splits them.
    const size_t split = in.empty() ? 0 : std::min<size_t>(in.size() - 1, uint8_t(in[0]) * 4);
    ColdRecord rec;
    if (!in.empty() && DecodeColdRecord(in.substr(1, split), true, &rec)) {
      std::string out;
      (void)Decompress(rec.compression, in.substr(1 + split), rec.meta.payload_bytes, &out).ok();
    }
    // Decompression alone, with a size from the input.
    if (in.size() >= 9) {
      int64_t claim;
      std::memcpy(&claim, in.data() + 1, 8);
      std::string out;
      (void)Decompress(static_cast<Compression>(uint8_t(in[0]) % 3), in.substr(9), claim, &out).ok();
    }
  }
  auto model = DecodeModel(in);
  if (model.ok()) (void)ValidateModel(*model).ok();
  return 0;
}
