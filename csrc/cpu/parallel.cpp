// The worker pool behind parallel_chunks (parallel.h).
//
// One job slot: a caller publishes a job (shared with the workers through a shared_ptr, so a worker
// that wakes after the caller has returned finds an exhausted counter and touches nothing else),
// wakes the workers, and claims chunks itself. A worker runs body only for a chunk it claimed, and
// the caller returns only when every chunk has completed, so body (and what it refers to on the
// caller's stack) is never used after the call. Concurrent callers are safe: each finishes its own
// job alone if the workers are busy elsewhere. Idle workers poll for 250 us after a job, then block
// on a condition variable (no lasting spin that would take CPU from other processes); they are
// detached and never destroyed, and a forked child starts a pool of its own.
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QF_PAUSE() _mm_pause()
#else
#define QF_PAUSE() std::this_thread::yield()
#endif

namespace qframe {
namespace cpu {
namespace {

struct Job {
  int64_t n = 0, chunk = 1, chunks = 0;
  int helpers = 0;  // workers with index < helpers may take part
  const std::function<void(int64_t, int64_t)>* body = nullptr;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;  // with cv: the last chunk's finisher wakes a caller that went to sleep
  std::condition_variable cv;

  // Claims and runs chunks until none is left.
  void work() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      (*body)(c * chunk, std::min(n, (c + 1) * chunk));
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }

  // The caller, once nothing is left to claim: waits for chunks other threads still run. It polls
  // briefly, then sleeps, which frees its core for a descheduled worker to finish on.
  void wait() {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
    while (done.load(std::memory_order_acquire) < chunks) {
      if (std::chrono::steady_clock::now() > until) {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return done.load(std::memory_order_acquire) >= chunks; });
        return;
      }
      QF_PAUSE();
    }
  }
};

class Pool {
 public:
  void run(const std::shared_ptr<Job>& job) {
    ensure_workers(job->helpers);
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      ++generation_;
      published_.store(generation_, std::memory_order_release);
    }
    cv_.notify_all();
  }

 private:
  void ensure_workers(int count) {
    std::lock_guard<std::mutex> lock(mu_);
    while ((int)started_ < count) {
      const int index = started_++;
      std::thread([this, index] { loop(index); }).detach();
    }
  }

  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      // Layer after layer, calls come back to back: poll a little before sleeping, so that the
      // next job starts without a wake-up (which can take longer than a small GEMV).
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (published_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        for (int i = 0; i < 64; ++i) QF_PAUSE();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      if (job && index < job->helpers) job->work();
    }
  }

  static constexpr std::chrono::microseconds kSpin{250};
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
  std::atomic<uint64_t> published_{0};
  int started_ = 0;
};

Pool* pool_instance = nullptr;
std::once_flag pool_once;

void forget_pool_in_child() { pool_instance = new Pool(); }  // the parent's workers do not exist here

Pool& pool() {
  std::call_once(pool_once, [] {
    pool_instance = new Pool();  // never destroyed: detached workers may still wait on it at exit
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork(nullptr, nullptr, forget_pool_in_child);
#endif
  });
  return *pool_instance;
}

}  // namespace

void parallel_chunks(int64_t n, int64_t chunk, int threads, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int helpers = (int)std::min<int64_t>(std::max(threads, 1) - 1, chunks - 1);
  if (helpers <= 0) {
    body(0, n);
    return;
  }
  auto job = std::make_shared<Job>();
  job->n = n, job->chunk = chunk, job->chunks = chunks, job->helpers = helpers, job->body = &body;
  pool().run(job);
  job->work();
  job->wait();
}

}  // namespace cpu
}  // namespace qframe
