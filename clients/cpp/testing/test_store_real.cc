#include "clients/cpp/testing/test_store.h"
#include "service/store/tiered_store.h"

namespace kvrecall::client::testing {

rpc::StoreOpener TestStoreOpener() { return &store::TieredStore::Open; }
const char* TestStoreName() { return "tiered"; }

}  // namespace kvrecall::client::testing
