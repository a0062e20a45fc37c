// lock: asyncio.Lock, a FIFO-fair mutual exclusion lock for tasks, and its scoped guard awaiter.
#pragma once

#include "../platform/config.hpp"
#include "../platform/log.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/intrusive_list.hpp"
#include "../runtime/future_core.hpp"
#include "../runtime/any_task.hpp"
#include "../runtime/event_loop.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/run.hpp"
#include "waiter.hpp"

#include <coroutine>
#include <stdexcept>

namespace codestare::async_utils {

class lock;
class condition;

namespace detail {

/// co_await lock.acquire(). A woken waiter stays at the head of the queue until it resumes, so
/// the lock is free in between (as in asyncio) but nobody can barge past it.
struct lock_acquire : parked_task {
  lock* owner;

  explicit lock_acquire(lock& l) noexcept : owner(&l) {}
  lock_acquire(lock_acquire&&) noexcept = default;
  bool await_ready() noexcept;
  void await_suspend(std::coroutine_handle<> h);
  bool await_resume();
  ~lock_acquire();
};

/// co_await lock.scoped(): acquires, then hands the caller a guard that releases.
struct lock_scoped : lock_acquire {
  using lock_acquire::lock_acquire;
  scoped_guard<lock> await_resume();
};

struct condition_wait;

}  // namespace detail

/// asyncio.Lock: not owned by a task (any task may release it), FIFO fair: a task arriving
/// while others wait queues behind them even if the lock happens to be free. Loop thread only.
class lock {
 public:
  lock() noexcept = default;
  lock(const lock&) = delete;
  lock& operator=(const lock&) = delete;
  /// Waits still queued (woken ones too) end with cancelled_error.
  ~lock() { detail::abandon_all(waiters_); }

  /// Lock.acquire(): `co_await lk.acquire()` waits until the lock is ours; yields true.
  /// Cancelled while waiting, it throws cancelled_error and leaves the lock to the next waiter.
  [[nodiscard]] detail::lock_acquire acquire() noexcept { return detail::lock_acquire(*this); }
  /// Lock.release(): frees the lock and wakes the first waiter. Throws std::runtime_error when
  /// the lock is not locked.
  void release();
  /// Lock.locked().
  bool locked() const noexcept { return locked_; }
  /// `async with lock:` — `auto guard = co_await lk.scoped();` releases when guard dies.
  [[nodiscard]] detail::lock_scoped scoped() noexcept { return detail::lock_scoped(*this); }

 private:
  friend struct detail::lock_acquire;
  friend struct detail::condition_wait;

  /// Takes the lock at once when that does not jump the queue.
  bool try_take() noexcept;
  /// Hands the free lock to the head waiter, unless it was handed to it already.
  void wake_first();

  bool locked_ = false;
  detail::intrusive_list<detail::parked_task> waiters_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void lock::release() {
  if (!locked_) throw std::runtime_error("lock.release(): the lock is not acquired");
  locked_ = false;
  wake_first();
}

ASYNC_UTILS_LINK bool lock::try_take() noexcept {
  if (locked_ || !waiters_.empty()) return false;
  locked_ = true;
  return true;
}

ASYNC_UTILS_LINK void lock::wake_first() {
  if (locked_ || waiters_.empty() || waiters_.front().woken) return;
  waiters_.front().wake_up();
}
#endif  // ASYNC_UTILS_DEFINITIONS

namespace detail {

inline bool lock_acquire::await_ready() noexcept { return owner->try_take(); }

inline void lock_acquire::await_suspend(std::coroutine_handle<> h) {
  bind("lock.acquire()");
  cancel = [](cancel_hook* c) {
    auto* self = static_cast<lock_acquire*>(c);
    self->withdraw();
    self->owner->wake_first();
    return true;
  };
  park(owner->waiters_, h);
}

inline bool lock_acquire::await_resume() {
  if (!task) return true;  // taken in await_ready
  unlink();
  throw_if_abandoned();
  try {
    check_cancelled();
  } catch (...) {
    // Cancelled after being woken: the wake-up must reach the next waiter instead.
    owner->wake_first();
    throw;
  }
  owner->locked_ = true;
  return true;
}

inline lock_acquire::~lock_acquire() {
  // A frame destroyed between wake-up and resumption (loop closing) passes the lock on.
  if (woken && linked()) {
    unlink();
    from_destructor("lock: waking the next waiter failed", [this] { owner->wake_first(); });
  }
}

inline scoped_guard<lock> lock_scoped::await_resume() {
  lock_acquire::await_resume();
  return scoped_guard<lock>(*owner);
}

}  // namespace detail
}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("lock") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("acquire, release, locked, and releasing an unlocked lock") {
    lock lk;
    CHECK_FALSE(lk.locked());
    CHECK_THROWS_AS(lk.release(), std::runtime_error);
    testing::run_bounded([&]() -> coroutine<void> {
      CHECK(co_await lk.acquire());
      CHECK(lk.locked());
      lk.release();
      CHECK_FALSE(lk.locked());
      CHECK_THROWS_AS(lk.release(), std::runtime_error);
      CHECK_FALSE(lk.locked());
    }());
  }

  TEST_CASE("waiters get the lock in FIFO order; another task may release it") {
    lock lk;
    std::vector<int> order;
    auto worker = [](lock& l, std::vector<int>& log, int id) -> coroutine<void> {
      co_await l.acquire();
      log.push_back(id);
      co_await sleep(0s);  // hold it across an iteration
      l.release();
    };
    testing::run_bounded([&]() -> coroutine<void> {
      co_await lk.acquire();
      std::vector<task<void>> tasks;
      for (int i = 1; i <= 4; ++i) tasks.push_back(create_task(worker(lk, order, i)));
      co_await sleep(0s);
      CHECK(order.empty());
      lk.release();
      for (auto& t : tasks) co_await t;
      CHECK(order == std::vector<int>{1, 2, 3, 4});
      CHECK_FALSE(lk.locked());
    }());
  }

  TEST_CASE("a newcomer does not barge past a woken waiter while the lock is free") {
    lock lk;
    std::vector<int> order;
    auto worker = [](lock& l, std::vector<int>& log) -> coroutine<void> {
      co_await l.acquire();
      log.push_back(1);
      l.release();
    };
    testing::run_bounded([&]() -> coroutine<void> {
      co_await lk.acquire();
      auto t = create_task(worker(lk, order));
      co_await sleep(0s);
      lk.release();
      CHECK_FALSE(lk.locked());  // free, but promised to the woken waiter
      co_await lk.acquire();     // queues behind it
      order.push_back(2);
      lk.release();
      co_await t;
      CHECK(order == std::vector<int>{1, 2});
    }());
  }

  TEST_CASE("an acquirer cancelled while waiting leaves the queue; the others proceed in order") {
    lock lk;
    std::vector<int> order;
    auto worker = [](lock& l, std::vector<int>& log, int id) -> coroutine<void> {
      co_await l.acquire();
      log.push_back(id);
      l.release();
    };
    testing::run_bounded([&]() -> coroutine<void> {
      co_await lk.acquire();
      auto t1 = create_task(worker(lk, order, 1));
      auto t2 = create_task(worker(lk, order, 2));
      auto t3 = create_task(worker(lk, order, 3));
      co_await sleep(0s);
      CHECK(t2.cancel());
      co_await wait_done(t2);
      CHECK(t2.cancelled());
      CHECK(lk.locked());  // still ours
      lk.release();
      co_await t1;
      co_await t3;
      CHECK(order == std::vector<int>{1, 3});
      CHECK_FALSE(lk.locked());
      CHECK(co_await lk.acquire());  // nothing left queued: the fast path works
      lk.release();
    }());
  }

  TEST_CASE("an acquirer cancelled after its wake-up passes the lock on") {
    lock lk;
    std::vector<int> order;
    auto worker = [](lock& l, std::vector<int>& log, int id) -> coroutine<void> {
      co_await l.acquire();
      log.push_back(id);
      l.release();
    };
    testing::run_bounded([&]() -> coroutine<void> {
      co_await lk.acquire();
      auto t1 = create_task(worker(lk, order, 1));
      auto t2 = create_task(worker(lk, order, 2));
      co_await sleep(0s);
      lk.release();  // wakes t1 ...
      t1.cancel();   // ... which is cancelled before it runs
      co_await wait_done(t1);
      CHECK(t1.cancelled());
      co_await t2;
      CHECK(order == std::vector<int>{2});
      CHECK_FALSE(lk.locked());
    }());
  }

  TEST_CASE("the last waiter cancelled after its wake-up leaves the lock free") {
    lock lk;
    auto worker = [](lock& l) -> coroutine<void> {
      co_await l.acquire();
      l.release();
    };
    testing::run_bounded([&]() -> coroutine<void> {
      co_await lk.acquire();
      auto t = create_task(worker(lk));
      co_await sleep(0s);
      lk.release();
      t.cancel();
      co_await wait_done(t);
      CHECK(t.cancelled());
      CHECK_FALSE(lk.locked());
      CHECK(co_await lk.acquire());
      lk.release();
    }());
  }

  TEST_CASE("a cancellation pending when the wait starts withdraws it at once") {
    lock lk;
    static bool acquired = false;
    auto worker = [](lock& l) -> coroutine<void> {
      current_task()->cancel();  // while running: lands on the next suspension
      co_await l.acquire();
      acquired = true;
    };
    testing::run_bounded([&]() -> coroutine<void> {
      co_await lk.acquire();
      auto t = create_task(worker(lk));
      co_await wait_done(t);
      CHECK(t.cancelled());
      CHECK_FALSE(acquired);
      CHECK(lk.locked());
      lk.release();
      CHECK(co_await lk.acquire());  // the queue is empty again
      lk.release();
    }());
  }

  TEST_CASE("scoped(): the guard releases on scope exit, on exceptions, and when reset") {
    lock lk;
    testing::run_bounded([&]() -> coroutine<void> {
      {
        auto guard = co_await lk.scoped();
        CHECK(guard.owns());
        CHECK(lk.locked());
        auto moved = std::move(guard);
        CHECK_FALSE(guard.owns());
        CHECK(moved);
        CHECK(lk.locked());
      }
      CHECK_FALSE(lk.locked());
      try {
        auto guard = co_await lk.scoped();
        throw std::domain_error("inside");
      } catch (const std::domain_error&) {
      }
      CHECK_FALSE(lk.locked());
      auto guard = co_await lk.scoped();
      guard.reset();
      CHECK_FALSE(lk.locked());
      guard.reset();  // a second reset does nothing
      testing::log_capture captured;
      {
        auto misused = co_await lk.scoped();
        lk.release();  // behind the guard's back: its destructor logs instead of throwing
      }
      CHECK(captured.text().find("release failed") != std::string::npos);
    }());
    CHECK_FALSE(lk.locked());
  }

  TEST_CASE("scoped() waits its turn like acquire()") {
    lock lk;
    std::vector<int> order;
    auto worker = [](lock& l, std::vector<int>& log, int id) -> coroutine<void> {
      auto guard = co_await l.scoped();
      log.push_back(id);
      co_await sleep(0s);
    };
    testing::run_bounded([&]() -> coroutine<void> {
      auto t1 = create_task(worker(lk, order, 1));
      auto t2 = create_task(worker(lk, order, 2));
      auto t3 = create_task(worker(lk, order, 3));
      co_await t1;
      co_await t2;
      co_await t3;
      CHECK(order == std::vector<int>{1, 2, 3});
      CHECK_FALSE(lk.locked());
    }());
  }

  TEST_CASE("a loop closed between a waiter's wake-up and its resumption leaves the lock usable") {
    lock lk;
    std::vector<any_task> workers;
    {
      testing::log_capture quiet;  // "Task was destroyed but it is pending"
      event_loop loop;
      auto worker = [](lock& l) -> coroutine<void> {
        co_await l.acquire();
        l.release();
      };
      auto body = [](lock& l, std::vector<any_task>& out, coroutine<void> a, coroutine<void> b) -> coroutine<void> {
        co_await l.acquire();
        out.push_back(create_task(std::move(a)));
        out.push_back(create_task(std::move(b)));
        co_await sleep(0s);
        l.release();  // wakes the first worker, which never gets to run
      };
      loop.run_until_complete(body(lk, workers, worker(lk), worker(lk)));
      CHECK_FALSE(workers[0].done());
      loop.close();
    }
    CHECK(workers[0].cancelled());
    CHECK(workers[1].cancelled());
    CHECK_FALSE(lk.locked());
    testing::run_bounded([&]() -> coroutine<void> {
      CHECK(co_await lk.acquire());  // no stale waiter ahead of us
      lk.release();
    }());
  }
}
#endif
