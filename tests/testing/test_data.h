#pragma once

// Paths of test data, resolved from the source tree (ctest sets
// KVRECALL_SOURCE_DIR; tests also run from the repository root).

#include <cstdlib>
#include <string>

namespace kvrecall::testing {

// The repository root.
inline std::string SourceDir() {
  const char* dir = std::getenv("KVRECALL_SOURCE_DIR");
  return dir != nullptr ? std::string(dir) : std::string(".");
}

// The shared test data ($KVRECALL_SHARED_DIR, by default `shared` beside the
// repository): the attention captures (data/attn-dev) and the tiny model.
// A test that needs it and cannot find it calls KVR_SKIP_WITHOUT_SHARED_DATA.
inline std::string SharedDir() {
  const char* dir = std::getenv("KVRECALL_SHARED_DIR");
  return dir != nullptr ? std::string(dir) : SourceDir() + "/../shared";
}

// True when $KVRECALL_REQUIRE_SHARED_DATA is set to anything but "" or "0"
// (deploy/test.sh sets it): a test whose shared data is missing then fails
// instead of skipping, so that CI cannot pass without running it.
inline bool SharedDataRequired() {
  const char* v = std::getenv("KVRECALL_REQUIRE_SHARED_DATA");
  return v != nullptr && *v != '\0' && std::string(v) != "0";
}

// A fresh, empty temporary directory for one test (removed by the OS's tmp
// cleaning, not by the test, so that failures can be inspected).
std::string MakeTempDir(const std::string& prefix = "kvrecall-test");

}  // namespace kvrecall::testing

// In a test body whose shared data is missing: skips with `message`, or
// fails with it when SharedDataRequired(). Returns from the test either way.
#define KVR_SKIP_WITHOUT_SHARED_DATA(message)                                           \
  do {                                                                                 \
    if (::kvrecall::testing::SharedDataRequired()) {                                   \
      GTEST_FAIL() << message << " (required: KVRECALL_REQUIRE_SHARED_DATA is set; "   \
                   << "KVRECALL_SHARED_DIR names the data's directory)";              \
    }                                                                                  \
    GTEST_SKIP() << message;                                                           \
  } while (0)
