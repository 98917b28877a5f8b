#include "common/thread_pool.h"

#include <algorithm>
#include <atomic>

namespace kvrecall {

ThreadPool::ThreadPool(int num_threads) {
  num_threads = std::max(1, num_threads);
  workers_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : workers_) t.join();
}

ThreadPool* ThreadPool::Default() {
  static ThreadPool* pool =
      new ThreadPool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  return pool;
}

void ThreadPool::Schedule(std::function<void()> fn) {
  absl::MutexLock lock(&mu_);
  tasks_.push_back(std::move(fn));
}

void ThreadPool::WorkerLoop() {
  while (true) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](ThreadPool* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu_) {
            return p->stopping_ || !p->tasks_.empty();
          },
          this));
      if (tasks_.empty()) return;  // stopping and drained
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

namespace {

// Shared by the caller and the helper tasks of one ParallelFor.
struct ParallelForState {
  int64_t n;
  int64_t grain;
  int64_t num_chunks;
  const std::function<void(int64_t, int64_t)>* fn;  // valid until done == num_chunks
  std::atomic<int64_t> next{0};
  absl::Mutex mu;
  int64_t done ABSL_GUARDED_BY(mu) = 0;

  // Claims and runs chunks until none are left.
  void RunChunks() {
    int64_t finished = 0;
    while (true) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= num_chunks) break;
      const int64_t begin = c * grain;
      (*fn)(begin, std::min(n, begin + grain));
      ++finished;
    }
    if (finished > 0) {
      absl::MutexLock lock(&mu);
      done += finished;
    }
  }
};

}  // namespace

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& fn,
                             int max_parallelism) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t num_chunks = (n + grain - 1) / grain;
  if (num_chunks == 1) {
    fn(0, n);
    return;
  }
  auto state = std::make_shared<ParallelForState>();
  state->n = n;
  state->grain = grain;
  state->num_chunks = num_chunks;
  state->fn = &fn;
  int helpers = num_threads();
  if (max_parallelism > 0) helpers = std::min(helpers, max_parallelism - 1);
  helpers = static_cast<int>(std::min<int64_t>(helpers, num_chunks - 1));
  for (int i = 0; i < helpers; ++i) {
    Schedule([state] { state->RunChunks(); });
  }
  state->RunChunks();
  absl::MutexLock lock(&state->mu);
  state->mu.Await(absl::Condition(
      +[](ParallelForState* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu) {
        return s->done == s->num_chunks;
      },
      state.get()));
}

}  // namespace kvrecall
