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

// `../shared` beside the repository: attention captures and the tiny model.
// Tests that need it GTEST_SKIP() when it is absent.
inline std::string SharedDir() {
  const char* dir = std::getenv("KVRECALL_SHARED_DIR");
  return dir != nullptr ? std::string(dir) : SourceDir() + "/../shared";
}

// A fresh, empty temporary directory for one test (removed by the OS's tmp
// cleaning, not by the test, so that failures can be inspected).
std::string MakeTempDir(const std::string& prefix = "kvrecall-test");

}  // namespace kvrecall::testing
