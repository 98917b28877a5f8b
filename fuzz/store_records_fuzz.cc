// libFuzzer target: decoding of on-disk records from untrusted bytes: disk
// segment headers and records (service/store/segment_format.h), span meta
// and model records of the RocksDB catalog (service/store/codec.h).
#include <cstddef>
#include <cstdint>

#include "service/store/codec.h"
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
  auto model = DecodeModel(in);
  if (model.ok()) (void)ValidateModel(*model).ok();
  return 0;
}
