#pragma once

// The store the client tests run the in-process server on: the real
// TieredStore in the temporary directory of each test's ServerOptions.

#include "service/rpc/server.h"
#include "service/store/tiered_store.h"

namespace kvrecall::client::testing {

inline rpc::StoreOpener TestStoreOpener() { return &store::TieredStore::Open; }
inline const char* TestStoreName() { return "tiered"; }

}  // namespace kvrecall::client::testing
