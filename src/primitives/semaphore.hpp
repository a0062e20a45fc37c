// semaphore and bounded_semaphore: asyncio.Semaphore and asyncio.BoundedSemaphore, FIFO fair.
#pragma once

#include "../platform/config.hpp"
#include "../platform/log.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/intrusive_list.hpp"
#include "../runtime/any_task.hpp"
#include "../runtime/event_loop.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/run.hpp"
#include "waiter.hpp"

#include <coroutine>
#include <cstddef>
#include <limits>
#include <stdexcept>

namespace codestare::async_utils {

class semaphore;

namespace detail {

/// co_await semaphore.acquire(). A woken waiter has been handed its unit already (asyncio's
/// release() counts it off when it wakes the waiter), so nobody can take it in between.
struct semaphore_acquire : parked_task {
  semaphore* owner;

  explicit semaphore_acquire(semaphore& s) noexcept : owner(&s) {}
  semaphore_acquire(semaphore_acquire&&) noexcept = default;
  bool await_ready() noexcept;
  void await_suspend(std::coroutine_handle<> h);
  bool await_resume();
  ~semaphore_acquire();
};

/// co_await semaphore.scoped(): acquires, then hands the caller a guard that releases.
struct semaphore_scoped : semaphore_acquire {
  using semaphore_acquire::semaphore_acquire;
  scoped_guard<semaphore> await_resume();
};

}  // namespace detail

/// asyncio.Semaphore: a counter of free units; acquire() takes one (waiting while none is
/// free), release() gives one back. FIFO fair: newcomers queue behind waiters. Loop thread only.
class semaphore {
 public:
  /// Semaphore(value): throws std::invalid_argument when value is negative.
  explicit semaphore(std::ptrdiff_t value = 1) : semaphore(value, std::numeric_limits<std::size_t>::max()) {}
  semaphore(const semaphore&) = delete;
  semaphore& operator=(const semaphore&) = delete;
  /// Waits still queued, and those handed a unit but not yet resumed, end with cancelled_error.
  ~semaphore();

  /// Semaphore.acquire(): `co_await sem.acquire()` takes a unit; yields true. Cancelled after
  /// being handed a unit, it gives the unit to the next waiter.
  [[nodiscard]] detail::semaphore_acquire acquire() noexcept { return detail::semaphore_acquire(*this); }
  /// Semaphore.release(): returns a unit, waking the first waiter. A bounded semaphore throws
  /// std::invalid_argument when that would exceed its initial value.
  void release();
  /// Semaphore.locked(): true when acquire() would wait.
  bool locked() const noexcept { return value_ == 0 || !waiters_.empty(); }
  /// `async with semaphore:` — `auto guard = co_await sem.scoped();`.
  [[nodiscard]] detail::semaphore_scoped scoped() noexcept { return detail::semaphore_scoped(*this); }

 protected:
  semaphore(std::ptrdiff_t value, std::size_t bound) : value_(checked(value)), bound_(bound) {}

 private:
  friend struct detail::semaphore_acquire;

  static std::size_t checked(std::ptrdiff_t value);
  /// Hands free units to waiters, first come first served.
  void wake_next();
  /// A unit handed to a waiter that will not use it goes back round.
  void give_back();

  std::size_t value_;
  std::size_t bound_;
  detail::intrusive_list<detail::parked_task> waiters_;
  detail::intrusive_list<detail::parked_task> handed_;  // woken, not yet resumed
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK semaphore::~semaphore() {
  detail::abandon_all(waiters_);
  detail::abandon_all(handed_);
}

ASYNC_UTILS_LINK void semaphore::release() {
  if (value_ >= bound_) throw std::invalid_argument("bounded_semaphore released too many times");
  ++value_;
  wake_next();
}

ASYNC_UTILS_LINK std::size_t semaphore::checked(std::ptrdiff_t value) {
  if (value < 0) throw std::invalid_argument("semaphore initial value must be >= 0");
  return static_cast<std::size_t>(value);
}

ASYNC_UTILS_LINK void semaphore::wake_next() {
  while (value_ > 0 && !waiters_.empty()) {
    --value_;
    detail::parked_task* w = waiters_.pop_front();
    handed_.push_back(*w);  // reachable until it resumes, for the destructor
    w->wake_up();
  }
}

ASYNC_UTILS_LINK void semaphore::give_back() {
  ++value_;
  wake_next();
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// asyncio.BoundedSemaphore: release() beyond the initial value throws std::invalid_argument.
class bounded_semaphore : public semaphore {
 public:
  /// BoundedSemaphore(value): throws std::invalid_argument when value is negative.
  explicit bounded_semaphore(std::ptrdiff_t value = 1) : semaphore(value, bound_of(value)) {}

 private:
  static std::size_t bound_of(std::ptrdiff_t value) noexcept { return value < 0 ? 0 : static_cast<std::size_t>(value); }
};

namespace detail {

inline bool semaphore_acquire::await_ready() noexcept {
  if (owner->locked()) return false;
  --owner->value_;
  return true;
}

inline void semaphore_acquire::await_suspend(std::coroutine_handle<> h) {
  bind("semaphore.acquire()");
  cancel = &withdraw_hook;  // not handed a unit yet: nothing to give back
  park(owner->waiters_, h);
}

inline bool semaphore_acquire::await_resume() {
  if (!task) return true;  // taken in await_ready
  unlink();
  throw_if_abandoned();
  const bool handed = std::exchange(woken, false);
  try {
    check_cancelled();
  } catch (...) {
    if (handed) owner->give_back();
    throw;
  }
  return true;
}

inline semaphore_acquire::~semaphore_acquire() {
  // A frame destroyed between hand-over and resumption (loop closing) returns its unit.
  unlink();
  if (woken) from_destructor("semaphore: returning a unit failed", [this] { owner->give_back(); });
}

inline scoped_guard<semaphore> semaphore_scoped::await_resume() {
  semaphore_acquire::await_resume();
  return scoped_guard<semaphore>(*owner);
}

}  // namespace detail
}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("semaphore") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("construction, counting, locked, and the bounded over-release") {
    CHECK_THROWS_AS(semaphore(-1), std::invalid_argument);
    CHECK_THROWS_AS(bounded_semaphore(-1), std::invalid_argument);
    semaphore zero(0);
    CHECK(zero.locked());
    zero.release();  // an unbounded semaphore may grow past its start
    CHECK_FALSE(zero.locked());
    semaphore sem(2);
    bounded_semaphore bounded(2);
    CHECK_THROWS_AS(bounded.release(), std::invalid_argument);
    testing::run_bounded([&]() -> coroutine<void> {
      CHECK(co_await sem.acquire());
      CHECK_FALSE(sem.locked());
      CHECK(co_await sem.acquire());
      CHECK(sem.locked());
      sem.release();
      sem.release();
      sem.release();
      CHECK_FALSE(sem.locked());

      co_await bounded.acquire();
      co_await bounded.acquire();
      CHECK(bounded.locked());
      bounded.release();
      bounded.release();
      CHECK_THROWS_AS(bounded.release(), std::invalid_argument);
      CHECK_FALSE(bounded.locked());
      {
        auto guard = co_await bounded.scoped();
        auto guard2 = co_await bounded.scoped();
        CHECK(bounded.locked());
      }
      CHECK_THROWS_AS(bounded.release(), std::invalid_argument);  // the guards gave both back
    }());
  }

  TEST_CASE("waiters are served in FIFO order; newcomers do not barge") {
    semaphore sem(1);
    std::vector<int> order;
    auto worker = [](semaphore& s, std::vector<int>& log, int id) -> coroutine<void> {
      auto guard = co_await s.scoped();
      log.push_back(id);
      co_await sleep(0s);
    };
    testing::run_bounded([&]() -> coroutine<void> {
      co_await sem.acquire();
      auto t1 = create_task(worker(sem, order, 1));
      auto t2 = create_task(worker(sem, order, 2));
      co_await sleep(0s);
      sem.release();         // handed to t1 ...
      CHECK(sem.locked());   // ... so nothing is free for a newcomer
      co_await sem.acquire();  // queues behind t2
      order.push_back(3);
      sem.release();
      co_await t1;
      co_await t2;
      CHECK(order == std::vector<int>{1, 2, 3});
      CHECK_FALSE(sem.locked());
    }());
  }

  TEST_CASE("several units wake several waiters; at most value tasks hold it at once") {
    semaphore sem(3);
    static int inside = 0, most = 0;
    auto worker = [](semaphore& s) -> coroutine<void> {
      auto guard = co_await s.scoped();
      most = std::max(most, ++inside);
      co_await sleep(1ms);
      --inside;
    };
    testing::run_bounded([&]() -> coroutine<void> {
      std::vector<task<void>> tasks;
      for (int i = 0; i < 10; ++i) tasks.push_back(create_task(worker(sem)));
      for (auto& t : tasks) co_await t;
      CHECK(most == 3);
      CHECK(inside == 0);
      CHECK_FALSE(sem.locked());
    }());
  }

  TEST_CASE("cancelled while waiting: no unit lost; cancelled after the hand-over: unit passed on") {
    bounded_semaphore sem(1);
    std::vector<int> order;
    auto worker = [](semaphore& s, std::vector<int>& log, int id) -> coroutine<void> {
      co_await s.acquire();
      log.push_back(id);
      s.release();
    };
    testing::run_bounded([&]() -> coroutine<void> {
      co_await sem.acquire();
      auto t1 = create_task(worker(sem, order, 1));
      auto t2 = create_task(worker(sem, order, 2));
      auto t3 = create_task(worker(sem, order, 3));
      co_await sleep(0s);
      t2.cancel();  // while waiting
      co_await wait_done(t2);
      CHECK(t2.cancelled());
      sem.release();  // handed to t1 ...
      t1.cancel();    // ... which is cancelled before it runs: t3 gets the unit
      co_await wait_done(t1);
      CHECK(t1.cancelled());
      co_await t3;
      CHECK(order == std::vector<int>{3});
      CHECK_FALSE(sem.locked());
      CHECK_THROWS_AS(sem.release(), std::invalid_argument);  // exactly one unit, back home
    }());
  }

  TEST_CASE("a loop closed between a waiter's hand-over and its resumption loses no unit") {
    bounded_semaphore sem(1);
    std::vector<any_task> workers;
    {
      testing::log_capture quiet;
      event_loop loop;
      auto worker = [](semaphore& s) -> coroutine<void> {
        co_await s.acquire();
        s.release();
      };
      auto body = [](semaphore& s, std::vector<any_task>& out, coroutine<void> a, coroutine<void> b) -> coroutine<void> {
        co_await s.acquire();
        out.push_back(create_task(std::move(a)));
        out.push_back(create_task(std::move(b)));
        co_await sleep(0s);
        s.release();  // handed to the first worker, which never gets to run
      };
      loop.run_until_complete(body(sem, workers, worker(sem), worker(sem)));
      CHECK(sem.locked());
      loop.close();
    }
    CHECK(workers[0].cancelled());
    CHECK_FALSE(sem.locked());
    CHECK_THROWS_AS(sem.release(), std::invalid_argument);  // the unit is home
  }
}
#endif
