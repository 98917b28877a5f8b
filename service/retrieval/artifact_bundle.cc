#include "service/retrieval/artifact_bundle.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/checksum.h"
#include "common/status_macros.h"
#include "index/index_format.h"

namespace kvrecall::retrieval {
namespace {
constexpr char kMagic[8] = {'K', 'V', 'R', 'B', 'U', 'N', 'D', 'L'};
constexpr uint32_t kVersion = 1;
}  // namespace

std::string ArtifactBundle::EntryName(int32_t layer, int32_t kv_head) {
  return absl::StrCat("L", layer, "/H", kv_head);
}

const std::string* ArtifactBundle::Find(absl::string_view name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

std::string ArtifactBundle::Serialize() const {
  std::string out(kMagic, sizeof(kMagic));
  index::ByteWriter w(&out);
  w.Put<uint32_t>(kVersion);
  w.Put<uint32_t>(static_cast<uint32_t>(entries_.size()));
  for (const auto& [name, bytes] : entries_) {
    w.PutString(name);
    w.Put<uint64_t>(bytes.size());
    w.PutBytes(bytes.data(), bytes.size());
  }
  w.Put<uint64_t>(Checksum64(out));
  return out;
}

absl::StatusOr<ArtifactBundle> ArtifactBundle::Parse(absl::string_view bytes) {
  if (bytes.size() < sizeof(kMagic) + 16 || std::memcmp(bytes.data(), kMagic, 8) != 0) {
    return absl::DataLossError("not an artifact bundle (bad magic)");
  }
  const absl::string_view body = bytes.substr(0, bytes.size() - 8);
  uint64_t checksum;
  std::memcpy(&checksum, bytes.data() + body.size(), 8);
  if (Checksum64(body) != checksum) return absl::DataLossError("artifact bundle checksum mismatch");
  index::ByteReader r(body.substr(8));
  KVR_ASSIGN_OR_RETURN(uint32_t version, r.Get<uint32_t>());
  if (version != kVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("artifact bundle version ", version, " is not supported"));
  }
  KVR_ASSIGN_OR_RETURN(uint32_t count, r.Get<uint32_t>());
  ArtifactBundle bundle;
  for (uint32_t i = 0; i < count; ++i) {
    KVR_ASSIGN_OR_RETURN(std::string name, r.GetString());
    KVR_ASSIGN_OR_RETURN(uint64_t size, r.Get<uint64_t>());
    if (size > r.remaining()) return absl::DataLossError("artifact bundle truncated");
    std::string data(size, '\0');
    KVR_RETURN_IF_ERROR(r.GetBytes(data.data(), size));
    bundle.Put(name, std::move(data));
  }
  return bundle;
}

}  // namespace kvrecall::retrieval
