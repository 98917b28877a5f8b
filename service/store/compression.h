#pragma once

// Block compression of cold span payloads (RocksDbTier): LZ4 (liblz4) or
// Zstandard (libzstd, level 1), chosen by TieredStoreOptions::rocksdb_compression.
// KV payloads are dense floating-point numbers and compress little; a payload
// that does not shrink is stored raw and marked kNone.

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrecall::store {

// Stored in the span's catalog record: values are part of the format.
enum class Compression : uint8_t { kNone = 0, kLz4 = 1, kZstd = 2 };

// "none", "lz4", "zstd" (case-sensitive). INVALID_ARGUMENT otherwise.
absl::StatusOr<Compression> ParseCompression(absl::string_view name);
absl::string_view CompressionName(Compression c);

// Compresses `raw` with `c` into `*out` and returns the compression actually
// used: kNone, with `*out` left empty (store `raw` itself, no copy), when `c`
// is kNone or compression would not save at least 1/64 of the bytes.
// Thread-safe.
Compression Compress(Compression c, absl::string_view raw, std::string* out);

// Decompresses `stored` (written by Compress with result `c`) into `*out`,
// which must come out exactly `raw_size` bytes. DATA_LOSS otherwise.
// Thread-safe.
absl::Status Decompress(Compression c, absl::string_view stored, int64_t raw_size,
                        std::string* out);

}  // namespace kvrecall::store
