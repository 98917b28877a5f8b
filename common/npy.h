#pragma once

// Reading and writing NumPy .npy files (format version 1.0/2.0/3.0 read,
// 1.0 written; little-endian, C order only). Used for attention captures,
// CLI input/output and test data.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrecall {

// A dense array read from or written to .npy. Value type; thread-compatible.
struct NpyArray {
  std::string descr;           // NumPy dtype string: "<f2", "<f4", "<f8", "<i4", "<i8", "<u4", "|u1", ...
  std::vector<int64_t> shape;  // C order
  std::string data;            // raw little-endian elements, num_elements() * item_size() bytes

  int64_t num_elements() const;
  size_t item_size() const;  // from descr; 0 when unknown

  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(data.data());
  }
};

// Parses the bytes of a .npy file. INVALID_ARGUMENT on a bad magic, header,
// Fortran order, big-endian dtype or a size that does not match the shape.
absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes);

// Reads and parses `path`. NOT_FOUND when the file does not exist.
absl::StatusOr<NpyArray> ReadNpy(const std::string& path);

// Serialises `array` as .npy version 1.0 bytes.
// REQUIRES: array.data.size() == num_elements() * item_size().
absl::StatusOr<std::string> SerializeNpy(const NpyArray& array);

// Writes `array` to `path` (via a temporary file and rename).
absl::Status WriteNpy(const std::string& path, const NpyArray& array);

// Reads a whole file into a string. NOT_FOUND / INTERNAL with the errno text.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Writes `data` to `path` atomically (temporary file, fsync, rename).
absl::Status WriteStringToFileAtomic(const std::string& path, absl::string_view data);

}  // namespace kvrecall
