#include "service/store/compression.h"

#include <lz4.h>
#include <zstd.h>

#include <algorithm>
#include <limits>
#include <memory>

#include "absl/strings/str_cat.h"

namespace kvrecall::store {

absl::StatusOr<Compression> ParseCompression(absl::string_view name) {
  if (name == "none") return Compression::kNone;
  if (name == "lz4") return Compression::kLz4;
  if (name == "zstd") return Compression::kZstd;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown compression '", name, "': expected zstd, lz4 or none"));
}

absl::string_view CompressionName(Compression c) {
  switch (c) {
    case Compression::kNone:
      return "none";
    case Compression::kLz4:
      return "lz4";
    case Compression::kZstd:
      return "zstd";
  }
  return "unknown";
}

Compression Compress(Compression c, absl::string_view raw, std::string* out) {
  const size_t keep_below = raw.size() - raw.size() / 64;
  if (c == Compression::kLz4 && raw.size() <= static_cast<size_t>(LZ4_MAX_INPUT_SIZE)) {
    out->resize(static_cast<size_t>(LZ4_compressBound(static_cast<int>(raw.size()))));
    const int n = LZ4_compress_default(raw.data(), out->data(), static_cast<int>(raw.size()),
                                       static_cast<int>(out->size()));
    if (n > 0 && static_cast<size_t>(n) < keep_below) {
      out->resize(static_cast<size_t>(n));
      return Compression::kLz4;
    }
  } else if (c == Compression::kZstd) {
    out->resize(ZSTD_compressBound(raw.size()));
    const size_t n = ZSTD_compress(out->data(), out->size(), raw.data(), raw.size(), 1);
    if (!ZSTD_isError(n) && n < keep_below) {
      out->resize(n);
      return Compression::kZstd;
    }
  }
  out->clear();
  return Compression::kNone;
}

namespace {

// Streams one zstd frame into `*out`, which grows with the output (doubling,
// from 1 MiB) rather than by `raw_size`: a damaged size allocates only what
// really decompresses. True when the frame is whole, consumes `stored`
// exactly and yields exactly `raw_size` bytes.
bool DecompressZstd(absl::string_view stored, size_t raw_size, std::string* out) {
  std::unique_ptr<ZSTD_DStream, size_t (*)(ZSTD_DStream*)> stream(ZSTD_createDStream(),
                                                                  ZSTD_freeDStream);
  if (stream == nullptr || ZSTD_isError(ZSTD_initDStream(stream.get()))) return false;
  ZSTD_inBuffer in{stored.data(), stored.size(), 0};
  size_t produced = 0;
  out->clear();
  while (true) {
    // One byte past raw_size, so that an overlong frame shows.
    const size_t room = std::min(std::max(produced, size_t{1} << 20), raw_size + 1 - produced);
    out->resize(produced + room);
    ZSTD_outBuffer o{out->data(), out->size(), produced};
    const size_t r = ZSTD_decompressStream(stream.get(), &o, &in);
    if (ZSTD_isError(r)) return false;
    const bool progressed = o.pos > produced;
    produced = o.pos;
    if (produced > raw_size) return false;
    if (r == 0) break;                                              // the frame is complete
    if (!progressed && in.pos == in.size && o.pos < o.size) return false;  // truncated
  }
  out->resize(produced);
  return produced == raw_size && in.pos == in.size;
}

}  // namespace

absl::Status Decompress(Compression c, absl::string_view stored, int64_t raw_size,
                        std::string* out) {
  if (raw_size < 0 || raw_size > (int64_t{1} << 36)) {
    return absl::DataLossError(absl::StrCat("implausible stored payload size ", raw_size));
  }
  switch (c) {
    case Compression::kNone:
      if (static_cast<int64_t>(stored.size()) != raw_size) break;
      out->assign(stored.data(), stored.size());
      return absl::OkStatus();
    case Compression::kLz4: {
      // LZ4 expands at most 255:1: a larger size is damage, refused before
      // anything is allocated for it.
      if (raw_size > std::numeric_limits<int>::max() ||
          stored.size() > static_cast<size_t>(std::numeric_limits<int>::max()) ||
          raw_size > static_cast<int64_t>(stored.size()) * 255 + 16) {
        break;
      }
      out->resize(static_cast<size_t>(raw_size));
      const int n = LZ4_decompress_safe(stored.data(), out->data(), static_cast<int>(stored.size()),
                                        static_cast<int>(raw_size));
      if (n == raw_size) return absl::OkStatus();
      break;
    }
    case Compression::kZstd:
      if (DecompressZstd(stored, static_cast<size_t>(raw_size), out)) return absl::OkStatus();
      break;
  }
  out->clear();
  return absl::DataLossError(absl::StrCat("stored payload does not decompress (",
                                          CompressionName(c), ") to ", raw_size, " bytes"));
}

}  // namespace kvrecall::store
