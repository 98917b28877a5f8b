#pragma once

// The largest single allocation (operator new, any unaligned form) made
// while a LargestAllocation is alive: a parser of untrusted or damaged bytes
// must not allocate what its input merely claims to hold. Linking this
// library replaces the global operator new and delete of the test binary
// (with malloc and free). One tracker at a time; test-only.

#include <cstddef>

namespace kvrecall::testing {

class LargestAllocation {
 public:
  LargestAllocation();
  ~LargestAllocation();
  LargestAllocation(const LargestAllocation&) = delete;
  LargestAllocation& operator=(const LargestAllocation&) = delete;

  // Bytes of the largest allocation since construction.
  size_t bytes() const;
};

}  // namespace kvrecall::testing
