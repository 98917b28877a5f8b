#include "common/checksum.h"

#include <xxhash.h>

namespace kvrecall {

uint64_t Checksum64(absl::string_view data) { return XXH3_64bits(data.data(), data.size()); }

uint64_t Checksum64(const void* data, size_t size) { return XXH3_64bits(data, size); }

Checksum64Builder::Checksum64Builder() : state_(XXH3_createState()) {
  XXH3_64bits_reset(static_cast<XXH3_state_t*>(state_));
}

Checksum64Builder::~Checksum64Builder() { XXH3_freeState(static_cast<XXH3_state_t*>(state_)); }

void Checksum64Builder::Update(const void* data, size_t size) {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(state_), data, size);
}

uint64_t Checksum64Builder::Digest() const {
  return XXH3_64bits_digest(static_cast<const XXH3_state_t*>(state_));
}

}  // namespace kvrecall
