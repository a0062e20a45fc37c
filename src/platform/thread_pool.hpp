// executor / thread_pool_executor: concurrent.futures' Executor and ThreadPoolExecutor, as plain
// job runners (no futures: the loop side brings its own result slot, executor.hpp).
#pragma once

#include "config.hpp"
#include "log.hpp"
#include "posix.hpp"
#include "signal_source.hpp"

#if ASYNC_UTILS_DEFINITIONS
#include <algorithm>
#endif
#include <atomic>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace codestare::async_utils {

/// concurrent.futures.Executor as an event loop uses it: something that runs jobs on other
/// threads. Implement it to give a loop your own pool (event_loop::set_default_executor).
class executor {
 public:
  virtual ~executor() = default;
  /// Runs job once on some thread; throws std::runtime_error after shutdown(). A job must
  /// not throw (the loop's jobs catch everything themselves).
  virtual void submit(std::function<void()> job) = 0;
  /// Stops accepting jobs; queued jobs still run. wait = true returns once all have run and
  /// every thread is joined. Safe to call more than once and from several threads.
  virtual void shutdown(bool wait) = 0;
};

/// concurrent.futures.ThreadPoolExecutor: up to max_workers threads, started lazily (one more
/// whenever a job finds no idle worker), a FIFO queue without a size limit, every signal
/// blocked in the workers so that they never take a signal meant for an event loop.
class thread_pool_executor final : public executor {
 public:
  /// Python's default: min(32, cpu count + 4).
  static std::size_t default_max_workers() noexcept;

  /// Throws std::invalid_argument when max_workers is 0 (Python's ValueError).
  explicit thread_pool_executor(std::size_t max_workers = default_max_workers());
  thread_pool_executor(const thread_pool_executor&) = delete;
  thread_pool_executor& operator=(const thread_pool_executor&) = delete;
  /// Waits for the queued jobs and joins (Python's `with ThreadPoolExecutor()` exit).
  ~thread_pool_executor() override { shutdown(true); }

  void submit(std::function<void()> job) override;

  void shutdown(bool wait) override;

  std::size_t max_workers() const noexcept { return max_workers_; }
  /// Threads started so far (and not yet joined).
  std::size_t worker_count() const;

 private:
  void work() noexcept;

  /// Changes the word the parked workers sleep on, then wakes up to count of them.
  void wake_all(int count) noexcept;

  static void report(const char* what) noexcept;

  static constexpr std::chrono::microseconds spin_time{30};
  const std::size_t max_workers_;
  mutable std::mutex mutex_;
  detail::park_word wake_word_{0};  // parked workers sleep on it; changed before every wake-up
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> workers_;
  std::size_t idle_ = 0;      // workers spinning or waiting for a job
  std::size_t spinning_ = 0;  // of which spinning (changed under the lock only)
  std::size_t parked_ = 0;    // of which parked on wake_word_ or about to be (under the lock)
  std::atomic<std::size_t> queued_{0};  // jobs_.size(), for spinners, who read it without the lock
  bool stopping_ = false;
  std::mutex join_mutex_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::size_t thread_pool_executor::default_max_workers() noexcept {
  return std::min<std::size_t>(32, std::size_t{std::thread::hardware_concurrency()} + 4);
}

ASYNC_UTILS_LINK thread_pool_executor::thread_pool_executor(std::size_t max_workers) : max_workers_(max_workers) {
  if (max_workers == 0) throw std::invalid_argument("thread_pool_executor: max_workers must be greater than 0");
}

ASYNC_UTILS_LINK void thread_pool_executor::submit(std::function<void()> job) {
  if (!job) throw std::invalid_argument("thread_pool_executor::submit: empty job");
  bool wake = false;
  {
    std::lock_guard guard(mutex_);
    if (stopping_) throw std::runtime_error("cannot schedule new jobs after shutdown");
    jobs_.push_back(std::move(job));
    if (jobs_.size() > idle_ && workers_.size() < max_workers_) {
      try {
        workers_.push_back(detail::start_thread_without_signals([this] { work(); }));
      } catch (...) {
        if (workers_.empty()) {  // nobody could ever run it: undo and report
          jobs_.pop_back();
          throw;
        }
      }
    }
    queued_.store(jobs_.size(), std::memory_order_release);
    // A spinning worker takes a job by itself: wake a parked one only for the jobs spinners
    // cannot take (a worker stops spinning only under the lock, and then looks at the queue),
    // and not at all when nobody is parked (no system call for a worker already awake).
    wake = parked_ > 0 && jobs_.size() > spinning_;
  }
  // After the unlock: a woken worker does not run into the lock we still hold.
  if (wake) wake_all(1);
}

ASYNC_UTILS_LINK void thread_pool_executor::shutdown(bool wait) {
  {
    std::lock_guard guard(mutex_);
    stopping_ = true;
  }
  wake_all(INT_MAX);
  if (!wait) return;
  std::lock_guard joining(join_mutex_);  // a second caller waits for the first to finish
  std::vector<std::thread> workers;
  {
    std::lock_guard guard(mutex_);
    workers.swap(workers_);
  }
  for (auto& t : workers) {
    if (t.get_id() == std::this_thread::get_id()) t.detach();  // shutdown from one of our jobs
    else t.join();
  }
}

ASYNC_UTILS_LINK std::size_t thread_pool_executor::worker_count() const {
  std::lock_guard guard(mutex_);
  return workers_.size();
}

ASYNC_UTILS_LINK void thread_pool_executor::work() noexcept {
  std::unique_lock lock(mutex_);
  detail::adaptive_spin spin;
  for (;;) {
    ++idle_;
    if (jobs_.empty() && !stopping_ && detail::may_spin()) {
      // Spin a moment before sleeping: a caller that submits one job after another (an
      // awaited run_in_executor in a loop) then never pays a wake-up.
      ++spinning_;
      lock.unlock();
      spin.wait([this] { return queued_.load(std::memory_order_acquire) != 0; }, spin_time);
      lock.lock();
      --spinning_;
    }
    while (jobs_.empty() && !stopping_) {
      // Park on our own word rather than a condition variable: the word is read under the
      // lock, so a job queued after we looked changes it and the park returns at once; and
      // nothing re-takes the lock as contended on the way out (glibc's condition variable
      // did, which cost an extra FUTEX_WAKE per job).
      const std::uint32_t seen = wake_word_.load(std::memory_order_relaxed);
      ++parked_;
      lock.unlock();
      detail::park(wake_word_, seen);
      lock.lock();
      --parked_;
    }
    --idle_;
    if (jobs_.empty()) return;  // stopping, and nothing left to do
    std::function<void()> job = std::move(jobs_.front());
    jobs_.pop_front();
    queued_.store(jobs_.size(), std::memory_order_relaxed);
    lock.unlock();
    try {
      job();
    } catch (const std::exception& e) {
      report(e.what());
    } catch (...) {
      report("unknown exception");
    }
    job = nullptr;  // whatever it holds goes before we sleep again
    lock.lock();
  }
}

ASYNC_UTILS_LINK void thread_pool_executor::wake_all(int count) noexcept {
  wake_word_.fetch_add(1, std::memory_order_relaxed);
  detail::unpark(wake_word_, count);
}

ASYNC_UTILS_LINK void thread_pool_executor::report(const char* what) noexcept {
  try {
    log(log_level::error, std::string("Exception in executor job: ") + what);
  } catch (...) {
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("thread_pool") {
  using namespace codestare::async_utils;

  TEST_CASE("runs every job, starts threads lazily up to max_workers, joins on shutdown") {
    std::atomic<int> ran{0};
    {
      thread_pool_executor pool(3);
      CHECK(pool.worker_count() == 0);
      for (int i = 0; i < 1000; ++i) pool.submit([&] { ++ran; });
      CHECK(pool.worker_count() >= 1);
      CHECK(pool.worker_count() <= 3);
      pool.shutdown(true);
      CHECK(ran == 1000);
      CHECK(pool.worker_count() == 0);
      CHECK_THROWS_AS(pool.submit([] {}), std::runtime_error);
      pool.shutdown(true);  // again: harmless
    }
    CHECK(thread_pool_executor::default_max_workers() >= 4);
    CHECK(thread_pool_executor::default_max_workers() <= 32);
    CHECK_THROWS_AS(thread_pool_executor(0), std::invalid_argument);
  }

  TEST_CASE("one job after another (a worker spins between them), from several threads, then shutdown") {
    std::atomic<int> ran{0};
    thread_pool_executor pool(2);
    for (int i = 0; i < 300; ++i) {
      std::atomic<bool> done{false};
      pool.submit([&] {
        ++ran;
        done = true;
      });
      while (!done) std::this_thread::yield();
    }
    std::vector<std::thread> submitters;
    for (int t = 0; t < 3; ++t)
      submitters.emplace_back([&] {
        for (int i = 0; i < 200; ++i) pool.submit([&] { ++ran; });
      });
    for (auto& t : submitters) t.join();
    pool.shutdown(true);  // workers spinning or asleep both leave
    CHECK(ran == 900);
    CHECK(pool.worker_count() == 0);
  }

  TEST_CASE("a job queued while one worker is busy wakes a parked one; shutdown wakes parked workers") {
    thread_pool_executor pool(2);
    std::atomic<int> started{0};
    std::atomic<bool> release{false};
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);  // bound: fail, never hang
    auto blocker = [&] {
      ++started;
      while (!release && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
    };
    pool.submit(blocker);  // two jobs at once: both workers start
    pool.submit(blocker);
    while (started != 2 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
    release = true;
    for (int round = 0; round < 20; ++round) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // past any spin: both park
      std::atomic<bool> second_ran{false};
      std::atomic<bool> first_saw_second{false};
      pool.submit([&] {  // waits for the next job, which only the other worker can run
        while (!second_ran && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
        first_saw_second = second_ran.load();
      });
      pool.submit([&] { second_ran = true; });
      while (!first_saw_second && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
      REQUIRE(first_saw_second);
    }
    CHECK(pool.worker_count() == 2);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    pool.shutdown(true);  // both parked: joined, not left asleep
    CHECK(pool.worker_count() == 0);
  }

  TEST_CASE("workers block every signal") {
    thread_pool_executor pool(1);
    std::atomic<bool> all_blocked{false};
    pool.submit([&] {
      sigset_t now;
      pthread_sigmask(SIG_BLOCK, nullptr, &now);
      all_blocked = sigismember(&now, SIGINT) == 1 && sigismember(&now, SIGTERM) == 1 && sigismember(&now, SIGUSR1) == 1;
    });
    pool.shutdown(true);
    CHECK(all_blocked);
  }
}
#endif
