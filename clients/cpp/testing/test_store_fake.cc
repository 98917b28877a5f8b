#include "clients/cpp/testing/test_store.h"
#include "service/rpc/testing/fake_tiered_store.h"

namespace kvrecall::client::testing {

rpc::StoreOpener TestStoreOpener() { return &rpc::testing::FakeTieredStore::Open; }
const char* TestStoreName() { return "fake"; }

}  // namespace kvrecall::client::testing
