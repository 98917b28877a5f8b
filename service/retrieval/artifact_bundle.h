#pragma once

// ArtifactBundle: named byte blobs in one versioned artifact, e.g. a model's
// Loki PCA bases, one entry per (layer, KV head) named "L<layer>/H<kv_head>"
// (docs/formats/artifact_bundle.md).
//
//   "KVRBUNDL" | u32le version (1) | u32le count |
//   count × (u32le name length, name, u64le size, bytes) | u64le XXH3-64 of all before

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrecall::retrieval {

// Value type; thread-compatible.
class ArtifactBundle {
 public:
  // Entry name of a per-(layer, KV head) artifact.
  static std::string EntryName(int32_t layer, int32_t kv_head);

  void Put(absl::string_view name, std::string bytes) { entries_[std::string(name)] = std::move(bytes); }
  // nullptr when absent.
  const std::string* Find(absl::string_view name) const;
  const std::map<std::string, std::string, std::less<>>& entries() const { return entries_; }

  std::string Serialize() const;
  // DATA_LOSS on a bad magic, truncation or checksum mismatch.
  static absl::StatusOr<ArtifactBundle> Parse(absl::string_view bytes);

 private:
  std::map<std::string, std::string, std::less<>> entries_;
};

}  // namespace kvrecall::retrieval
