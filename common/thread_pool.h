#pragma once

// A fixed pool of worker threads with Schedule() for fire-and-forget tasks
// and ParallelFor() for data-parallel loops.
//
// ParallelFor() runs chunks on the calling thread too, so it never deadlocks
// when called from inside a pool task (nested loops degrade to serial).
//
// Thread-safe.

#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include <deque>

namespace kvrecall {

class ThreadPool {
 public:
  // Starts `num_threads` workers (at least 1).
  explicit ThreadPool(int num_threads);
  // Finishes every scheduled task, then joins the workers.
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // A process-wide pool with one worker per hardware thread.
  static ThreadPool* Default();

  int num_threads() const { return static_cast<int>(workers_.size()); }

  // Runs `fn` on some worker, later.
  void Schedule(std::function<void()> fn);

  // Calls fn(begin, end) over [0, n) in chunks of about `grain` items (at
  // least 1), in parallel over at most `max_parallelism` threads (<= 0: the
  // pool size + the caller), and returns when all chunks are done.
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn,
                   int max_parallelism = 0);

 private:
  void WorkerLoop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvrecall
