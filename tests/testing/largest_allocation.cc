#include "tests/testing/largest_allocation.h"

#include <atomic>
#include <cstdlib>
#include <new>

namespace {

std::atomic<bool> g_tracking{false};
std::atomic<size_t> g_largest{0};

// Not inlined into callers: GCC would otherwise see malloc and free meet new
// and delete (-Wmismatched-new-delete).
__attribute__((noinline)) void* Allocate(size_t size) {
  if (g_tracking.load(std::memory_order_relaxed)) {
    size_t seen = g_largest.load(std::memory_order_relaxed);
    while (size > seen && !g_largest.compare_exchange_weak(seen, size)) {
    }
  }
  return std::malloc(size == 0 ? 1 : size);
}

}  // namespace

__attribute__((noinline)) void* operator new(size_t size) {
  if (void* p = Allocate(size)) return p;
  throw std::bad_alloc();
}
__attribute__((noinline)) void* operator new[](size_t size) {
  if (void* p = Allocate(size)) return p;
  throw std::bad_alloc();
}
__attribute__((noinline)) void* operator new(size_t size, const std::nothrow_t&) noexcept {
  return Allocate(size);
}
__attribute__((noinline)) void* operator new[](size_t size, const std::nothrow_t&) noexcept {
  return Allocate(size);
}
__attribute__((noinline)) void operator delete(void* p) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete[](void* p) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete(void* p, size_t) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete[](void* p, size_t) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete(void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}
__attribute__((noinline)) void operator delete[](void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}

namespace kvrecall::testing {

LargestAllocation::LargestAllocation() {
  g_largest = 0;
  g_tracking = true;
}
LargestAllocation::~LargestAllocation() { g_tracking = false; }
size_t LargestAllocation::bytes() const { return g_largest.load(); }

}  // namespace kvrecall::testing
