#pragma once

// Record checksums: XXH3-64 (seed 0) over the bytes of a record. Every stored
// span payload carries one and it is verified on every read (a mismatch is
// DATA_LOSS, never wrong data).

#include <cstddef>
#include <cstdint>

#include "absl/strings/string_view.h"

namespace kvrecall {

// XXH3-64 of `data` with seed 0.
uint64_t Checksum64(absl::string_view data);
uint64_t Checksum64(const void* data, size_t size);

// Incremental XXH3-64 over several pieces; equal to Checksum64 of their
// concatenation. Not thread-safe.
class Checksum64Builder {
 public:
  Checksum64Builder();
  ~Checksum64Builder();
  Checksum64Builder(const Checksum64Builder&) = delete;
  Checksum64Builder& operator=(const Checksum64Builder&) = delete;

  void Update(const void* data, size_t size);
  void Update(absl::string_view data) { Update(data.data(), data.size()); }
  uint64_t Digest() const;

 private:
  void* state_;  // XXH3_state_t*, owned
};

}  // namespace kvrecall
