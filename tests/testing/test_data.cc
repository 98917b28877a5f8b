#include "tests/testing/test_data.h"

#include <cstdlib>
#include <string>

namespace kvrecall::testing {

std::string MakeTempDir(const std::string& prefix) {
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = std::string(tmp != nullptr ? tmp : "/tmp") + "/" + prefix + "-XXXXXX";
  char* made = ::mkdtemp(templ.data());
  if (made == nullptr) std::abort();
  return templ;
}

}  // namespace kvrecall::testing
