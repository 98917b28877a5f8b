#pragma once

// The store the client tests run the in-process server on: the real
// TieredStore when it is built (test_store_real.cc), else the RPC layer's
// FakeTieredStore (test_store_fake.cc). Chosen at link time.

#include "service/rpc/server.h"

namespace kvrecall::client::testing {

rpc::StoreOpener TestStoreOpener();
// "tiered" or "fake".
const char* TestStoreName();

}  // namespace kvrecall::client::testing
