#pragma once

// InflightLimiter: the daemon-wide bound on what requests hold while they are
// being received (docs/config.md): the bytes that streamed requests buffer
// (span payloads being assembled, artifacts, training queries) and the number
// of streaming calls served by reactors (PutSpans, GetSpans), which the
// synchronous server's thread limit does not cover. A request that would go
// past either gets RESOURCE_EXHAUSTED naming the flag; nothing waits.
//
//   InflightLimiter limiter(options);
//   KVR_ASSIGN_OR_RETURN(InflightBytes held, limiter.AcquireBytes(n));  // released on destruction
//
// Thread-safe (lock-free).

#include <atomic>
#include <cstdint>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace kvrecall::rpc {

class InflightLimiter;

// A number of bytes held against the limiter; released on destruction.
// Movable, not copyable. Not thread-safe.
class InflightBytes {
 public:
  InflightBytes() = default;
  InflightBytes(InflightBytes&& other) noexcept { *this = std::move(other); }
  InflightBytes& operator=(InflightBytes&& other) noexcept;
  InflightBytes(const InflightBytes&) = delete;
  InflightBytes& operator=(const InflightBytes&) = delete;
  ~InflightBytes() { Release(); }

  int64_t bytes() const { return bytes_; }
  void Release();

 private:
  friend class InflightLimiter;
  InflightBytes(InflightLimiter* limiter, int64_t bytes) : limiter_(limiter), bytes_(bytes) {}
  InflightLimiter* limiter_ = nullptr;
  int64_t bytes_ = 0;
};

class InflightLimiter {
 public:
  // max_bytes: --max_inflight_bytes; max_streams: --max_concurrent_streams.
  // 0 means unlimited.
  InflightLimiter(int64_t max_bytes, int64_t max_streams)
      : max_bytes_(max_bytes), max_streams_(max_streams) {}

  // Holds `n` more bytes, or RESOURCE_EXHAUSTED when the total would exceed
  // max_bytes.
  absl::StatusOr<InflightBytes> AcquireBytes(int64_t n) {
    if (n <= 0) return InflightBytes(this, 0);
    int64_t now = bytes_.fetch_add(n, std::memory_order_relaxed) + n;
    if (max_bytes_ > 0 && now > max_bytes_) {
      bytes_.fetch_sub(n, std::memory_order_relaxed);
      return absl::ResourceExhaustedError(absl::StrCat(
          "the daemon buffers ", now - n, " bytes of requests in flight; ", n,
          " more would exceed --max_inflight_bytes=", max_bytes_, "; retry later"));
    }
    return InflightBytes(this, n);
  }
  // Grows `held` by `n` bytes (same rule as AcquireBytes).
  absl::Status Grow(InflightBytes* held, int64_t n) {
    auto more = AcquireBytes(n);
    if (!more.ok()) return more.status();
    held->limiter_ = this;
    held->bytes_ += more->bytes_;
    more->bytes_ = 0;
    return absl::OkStatus();
  }

  // Admits one more streaming call, or RESOURCE_EXHAUSTED.
  absl::Status EnterStream() {
    const int64_t now = streams_.fetch_add(1, std::memory_order_relaxed) + 1;
    if (max_streams_ > 0 && now > max_streams_) {
      streams_.fetch_sub(1, std::memory_order_relaxed);
      return absl::ResourceExhaustedError(absl::StrCat(
          max_streams_, " streaming calls are being served (--max_concurrent_streams); retry "
          "later"));
    }
    return absl::OkStatus();
  }
  void ExitStream() { streams_.fetch_sub(1, std::memory_order_relaxed); }

  int64_t bytes() const { return bytes_.load(std::memory_order_relaxed); }
  int64_t streams() const { return streams_.load(std::memory_order_relaxed); }

 private:
  friend class InflightBytes;
  void ReleaseBytes(int64_t n) { bytes_.fetch_sub(n, std::memory_order_relaxed); }

  const int64_t max_bytes_;
  const int64_t max_streams_;
  std::atomic<int64_t> bytes_{0};
  std::atomic<int64_t> streams_{0};
};

inline InflightBytes& InflightBytes::operator=(InflightBytes&& other) noexcept {
  if (this != &other) {
    Release();
    limiter_ = other.limiter_;
    bytes_ = other.bytes_;
    other.limiter_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

inline void InflightBytes::Release() {
  if (limiter_ != nullptr && bytes_ > 0) limiter_->ReleaseBytes(bytes_);
  bytes_ = 0;
}

}  // namespace kvrecall::rpc
