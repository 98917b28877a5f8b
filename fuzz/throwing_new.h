// A cap on single `new` requests while a fuzz target runs its code under test
// (fuzz/throwing_new.cc, linked only into targets that need it).
#ifndef KVRECALL_FUZZ_THROWING_NEW_H_
#define KVRECALL_FUZZ_THROWING_NEW_H_

#include <cstddef>

namespace kvrecall::fuzz {

// While alive, a `new` of more than `bytes` throws std::bad_alloc.
class NewLimit {
 public:
  explicit NewLimit(std::size_t bytes);
  ~NewLimit();
  NewLimit(const NewLimit&) = delete;
  NewLimit& operator=(const NewLimit&) = delete;

 private:
  std::size_t saved_;
};

}  // namespace kvrecall::fuzz

#endif  // KVRECALL_FUZZ_THROWING_NEW_H_
