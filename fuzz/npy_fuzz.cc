// libFuzzer target: the .npy reader (common/npy.h) on untrusted bytes.
#include <cstddef>
#include <cstdint>

#include "common/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto parsed = kvrecall::ParseNpy(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  if (parsed.ok()) {
    // A parsed array must serialize again.
    (void)kvrecall::SerializeNpy(*parsed).ok();
  }
  return 0;
}
