// libFuzzer target: the tenants file parser (service/rpc/tenant_auth.h).
#include <cstddef>
#include <cstdint>

#include "service/rpc/tenant_auth.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  auto auth = kvrecall::rpc::TenantAuthenticator::FromText(text);
  if (auth.ok()) {
    // Every token of a valid file resolves; lookups of the input never crash.
    (void)(*auth)->TenantForToken(text.substr(0, 600)).ok();
    (void)(*auth)->ShareNamespace("a", "b");
  }
  return 0;
}
