// condition: asyncio.Condition, a condition variable for tasks over an own or shared lock.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../platform/log.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/intrusive_list.hpp"
#include "../runtime/future_core.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/wait_for.hpp"
#include "../runtime/run.hpp"
#include "waiter.hpp"
#include "lock.hpp"

#include <concepts>
#include <coroutine>
#include <cstddef>
#include <limits>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <type_traits>

namespace codestare::async_utils {
namespace detail {

/// co_await condition.wait(). One node, two queues: first the condition's (until notified or
/// cancelled), then the lock's, so re-acquiring keeps its place and never allocates.
struct condition_wait : parked_task {
  condition* cond;
  lock* lk;
  bool notified = false;
  bool cancelled = false;  // cancelled before the notification: rethrown once the lock is back

  condition_wait(condition& c, lock& l) noexcept : cond(&c), lk(&l) {}
  condition_wait(condition_wait&&) noexcept = default;
  bool await_ready() const {
    if (!lk->locked()) throw std::runtime_error("condition.wait(): the lock is not acquired");
    return false;
  }
  void await_suspend(std::coroutine_handle<> h) {
    bind("condition.wait()");
    start_waiting(h);
  }
  bool await_resume();
  ~condition_wait() {
    if (woken && linked()) {  // destroyed after the lock was handed to it (loop closing)
      unlink();
      from_destructor("condition: waking the next lock waiter failed", [this] { lk->wake_first(); });
    }
  }

  /// Releases the lock and parks the (bound) task in the condition's queue.
  void start_waiting(std::coroutine_handle<> h);
  /// Only the lock wakes us, and it is free and promised to us: take it.
  void take_lock() noexcept;

  /// Notified or cancelled: from now on the wait is for the lock. That part is not withdrawn on
  /// cancel (the hook refuses, so the task keeps a pending cancellation that await_resume
  /// throws once the lock is ours), as asyncio retries the acquire until it succeeds.
  void queue_for_lock() {
    unlink();
    cancel = [](cancel_hook*) { return false; };
    lk->waiters_.push_back(*this);
    lk->wake_first();
  }
};

/// co_await condition.wait_for(pred) without a coroutine frame: pred is evaluated with the lock
/// held in await_ready, then, after every wake-up, by a resume gate that runs in the task's step
/// before the coroutine would resume. A falsy value parks the task again right there, so the
/// coroutine only resumes with the final value, an exception from pred, or cancelled_error.
template <class Predicate>
struct condition_wait_for_awaiter : condition_wait, resume_gate {
  using result_type = std::decay_t<std::invoke_result_t<Predicate&>>;
  Predicate* predicate;
  std::optional<result_type> result;
  std::exception_ptr error;  // thrown by pred after a wake-up
  std::coroutine_handle<> where;

  condition_wait_for_awaiter(condition& c, lock& l, Predicate& p) noexcept : condition_wait(c, l), predicate(&p) {
    pass = &gate;
  }
  bool await_ready() {
    if (!lk->locked()) throw std::runtime_error("condition.wait_for(): the lock is not acquired");
    result.emplace((*predicate)());
    return static_cast<bool>(*result);
  }
  void await_suspend(std::coroutine_handle<> h) {
    bind("condition.wait_for()");
    where = h;
    start_waiting(h);
    task->set_resume_gate(this);  // after anything that can throw
  }
  result_type await_resume() {
    if (task) {
      condition_wait::await_resume();  // cancelled: throws, passing a notification on
      if (error) std::rethrow_exception(error);
    }
    return std::move(*result);
  }

 private:
  static bool gate(resume_gate* g) noexcept {
    auto* self = static_cast<condition_wait_for_awaiter*>(g);
    if (self->abandoned) return true;  // its condition or lock is gone: await_resume throws
    self->take_lock();
    if (self->cancelled || self->task->cancel_pending()) return true;  // await_resume throws
    try {
      self->result.emplace((*self->predicate)());
      if (static_cast<bool>(*self->result)) return true;
      self->notified = false;  // wait again, as a fresh wait()
      self->woken = false;
      self->start_waiting(self->where);
      self->task->set_resume_gate(self);
      return false;
    } catch (...) {
      self->error = std::current_exception();
      return true;
    }
  }
};

/// What condition.wait_for(pred) returns: keeps the predicate in the awaiting frame.
template <class Predicate>
struct condition_wait_for {
  using result_type = std::decay_t<std::invoke_result_t<Predicate&>>;
  condition* cond;
  Predicate predicate;

  condition_wait_for_awaiter<Predicate> operator co_await() &;
  condition_wait_for_awaiter<Predicate> operator co_await() && { return operator co_await(); }
};

}  // namespace detail

/// asyncio.Condition: tasks wait() until another task, holding the same lock, notifies them.
/// "Holding" means the lock is locked (asyncio's locks have no owner). Loop thread only.
class condition {
 public:
  /// Condition() with a lock of its own.
  condition() noexcept : lock_(&own_) {}
  /// Condition(lock) sharing `shared`; throws std::invalid_argument when it is null.
  explicit condition(std::shared_ptr<lock> shared);
  /// Condition(lock) over a lock the caller keeps alive for as long as this condition.
  explicit condition(lock& borrowed) noexcept : lock_(&borrowed) {}
  condition(const condition&) = delete;
  condition& operator=(const condition&) = delete;
  /// Waits not yet notified end with cancelled_error, without the lock (own_'s destructor
  /// does the same for those queued for it).
  ~condition() { detail::abandon_all(waiters_); }

  /// Condition.acquire() / release() / locked(): the underlying lock's.
  [[nodiscard]] detail::lock_acquire acquire() noexcept { return lock_->acquire(); }
  void release() { lock_->release(); }
  bool locked() const noexcept { return lock_->locked(); }
  /// `async with condition:` — `auto guard = co_await cond.scoped();`.
  [[nodiscard]] detail::lock_scoped scoped() noexcept { return lock_->scoped(); }

  /// Condition.wait(): releases the lock, waits for a notification, re-acquires the lock and
  /// yields true. Throws std::runtime_error when the lock is not held. Cancelled, it still
  /// re-acquires the lock before cancelled_error leaves it; a notification it received but can
  /// no longer act on goes to the next waiter.
  [[nodiscard]] detail::condition_wait wait() noexcept { return detail::condition_wait(*this, *lock_); }

  /// Condition.wait_for(predicate): `co_await cond.wait_for(pred)` waits until pred() is
  /// truthy, evaluating it (with the lock held) first and after every wake-up, and yields its
  /// last value. Allocates nothing: the awaiter lives in the awaiting frame.
  template <class Predicate>
    requires std::invocable<Predicate&>
  [[nodiscard]] detail::condition_wait_for<Predicate> wait_for(Predicate predicate) {
    using result_type = std::decay_t<std::invoke_result_t<Predicate&>>;
    static_assert(std::is_constructible_v<bool, result_type>, "wait_for: the predicate must return something testable as bool");
    return {this, std::move(predicate)};
  }

  /// Condition.notify(n): wakes up to n waiters, longest waiting first. Throws
  /// std::runtime_error when the lock is not held.
  void notify(std::size_t n = 1);
  /// Condition.notify_all().
  void notify_all();

 private:
  friend struct detail::condition_wait;
  template <class Predicate>
  friend struct detail::condition_wait_for;

  void wake(std::size_t n);

  lock own_;
  std::shared_ptr<lock> shared_;
  lock* lock_;
  detail::intrusive_list<detail::parked_task> waiters_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK condition::condition(std::shared_ptr<lock> shared) : shared_(std::move(shared)) {
  if (!shared_) throw std::invalid_argument("condition: null lock");
  lock_ = shared_.get();
}

ASYNC_UTILS_LINK void condition::notify(std::size_t n) {
  if (!locked()) throw std::runtime_error("condition.notify(): the lock is not acquired");
  wake(n);
}

ASYNC_UTILS_LINK void condition::notify_all() {
  if (!locked()) throw std::runtime_error("condition.notify_all(): the lock is not acquired");
  wake(std::numeric_limits<std::size_t>::max());
}

ASYNC_UTILS_LINK void condition::wake(std::size_t n) {
  for (; n != 0 && !waiters_.empty(); --n) {
    auto& w = static_cast<detail::condition_wait&>(waiters_.front());
    w.notified = true;
    w.queue_for_lock();
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

namespace detail {

template <class Predicate>
condition_wait_for_awaiter<Predicate> condition_wait_for<Predicate>::operator co_await() & {
  return condition_wait_for_awaiter<Predicate>(*cond, *cond->lock_, predicate);
}

inline void condition_wait::start_waiting(std::coroutine_handle<> h) {
  cancel = [](cancel_hook* c) {
    auto* self = static_cast<condition_wait*>(c);
    self->cancelled = true;
    self->queue_for_lock();
    return true;
  };
  lk->release();
  park(cond->waiters_, h);
}

inline void condition_wait::take_lock() noexcept {
  unlink();
  lk->locked_ = true;
}

inline bool condition_wait::await_resume() {
  if (abandoned) {
    unlink();
    task->throw_if_cancelled(true);
  }
  take_lock();
  try {
    task->throw_if_cancelled(cancelled);
  } catch (...) {
    if (notified) cond->wake(1);  // we will not act on it: pass it on
    throw;
  }
  return true;
}

}  // namespace detail
}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("condition") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("waiting or notifying without the lock throws std::runtime_error") {
    condition cond;
    CHECK_THROWS_AS(cond.notify(), std::runtime_error);
    CHECK_THROWS_AS(cond.notify_all(), std::runtime_error);
    CHECK_THROWS_AS(condition(std::shared_ptr<lock>()), std::invalid_argument);
    testing::run_bounded([&]() -> coroutine<void> {
      CHECK_THROWS_AS(co_await cond.wait(), std::runtime_error);
      CHECK_THROWS_AS(co_await cond.wait_for([] { return true; }), std::runtime_error);
      CHECK_FALSE(cond.locked());
      co_await cond.acquire();
      cond.notify();  // nobody waits: nothing happens
      cond.notify_all();
      cond.release();
      CHECK_THROWS_AS(cond.release(), std::runtime_error);
    }());
  }

  TEST_CASE("wait releases the lock and returns true with the lock held again") {
    condition cond;
    static bool saw_lock = false;
    auto waiter = [](condition& c) -> coroutine<void> {
      co_await c.acquire();
      CHECK(co_await c.wait());
      saw_lock = c.locked();
      c.release();
    };
    testing::run_bounded([&]() -> coroutine<void> {
      auto t = create_task(waiter(cond));
      co_await sleep(0s);
      CHECK_FALSE(cond.locked());  // released by wait()
      co_await cond.acquire();
      cond.notify();
      co_await sleep(0s);
      CHECK_FALSE(t.done());  // notified, but the lock is still ours
      cond.release();
      co_await t;
      CHECK(saw_lock);
      CHECK_FALSE(cond.locked());
    }());
  }

  TEST_CASE("notify(n) wakes exactly n waiters in FIFO order; notify_all the rest") {
    condition cond;
    std::vector<int> order;
    auto waiter = [](condition& c, std::vector<int>& log, int id) -> coroutine<void> {
      auto guard = co_await c.scoped();
      co_await c.wait();
      log.push_back(id);
    };
    testing::run_bounded([&]() -> coroutine<void> {
      std::vector<task<void>> tasks;
      for (int i = 1; i <= 6; ++i) tasks.push_back(create_task(waiter(cond, order, i)));
      co_await sleep(0s);
      auto settle = [&]() -> coroutine<void> {
        for (int i = 0; i < 5; ++i) co_await sleep(0s);
      };
      {
        auto guard = co_await cond.scoped();
        cond.notify(2);
      }
      co_await settle();
      CHECK(order == std::vector<int>{1, 2});
      {
        auto guard = co_await cond.scoped();
        cond.notify();
      }
      co_await settle();
      CHECK(order == std::vector<int>{1, 2, 3});
      {
        auto guard = co_await cond.scoped();
        cond.notify(0);
      }
      co_await settle();
      CHECK(order.size() == 3);
      {
        auto guard = co_await cond.scoped();
        cond.notify_all();
      }
      for (auto& t : tasks) co_await t;
      CHECK(order == std::vector<int>{1, 2, 3, 4, 5, 6});
      CHECK_FALSE(cond.locked());
    }());
  }

  TEST_CASE("wait_for returns at once when the predicate holds, else re-checks after every wake-up") {
    condition cond;
    static int value = 0;
    static int checks = 0;
    auto waiter = [](condition& c) -> coroutine<int> {
      auto guard = co_await c.scoped();
      co_return co_await c.wait_for([]() -> int {
        ++checks;
        return value >= 3 ? value * 10 : 0;
      });
    };
    testing::run_bounded([&]() -> coroutine<void> {
      auto t = create_task(waiter(cond));
      co_await sleep(0s);
      CHECK(checks == 1);
      for (int i = 1; i <= 3; ++i) {
        auto guard = co_await cond.scoped();
        value = i;
        cond.notify();
        guard.reset();
        co_await sleep(0s);
        co_await sleep(0s);
        CHECK(checks == i + 1);
      }
      CHECK(co_await t == 30);  // the predicate's value
      checks = 0;
      co_await cond.acquire();
      CHECK(co_await cond.wait_for([] { ++checks; return std::optional<int>(7); }) == std::optional<int>(7));
      CHECK(checks == 1);
      CHECK(cond.locked());
      cond.release();
    }());
  }

  TEST_CASE("wait_for lets an exception from the predicate out with the lock held") {
    condition cond;
    testing::run_bounded([&]() -> coroutine<void> {
      co_await cond.acquire();
      CHECK_THROWS_AS(co_await cond.wait_for([]() -> bool { throw std::domain_error("pred"); }), std::domain_error);
      CHECK(cond.locked());
      cond.release();
    }());
  }

  TEST_CASE("wait_for: cancelled while waiting or re-acquiring, it holds the lock; a dropped notification goes on") {
    condition cond;
    static int turn = 0;
    static std::vector<int> order;
    order.clear();
    auto waiter = [](condition& c, int id) -> coroutine<void> {
      auto guard = co_await c.scoped();
      try {
        int got = co_await c.wait_for([id] { return turn == id ? id : 0; });
        order.push_back(got);
      } catch (const cancelled_error&) {
        CHECK(c.locked());
        order.push_back(-id);
        throw;
      }
    };
    testing::run_bounded([&]() -> coroutine<void> {
      auto t1 = create_task(waiter(cond, 1));
      auto t2 = create_task(waiter(cond, 2));
      auto t3 = create_task(waiter(cond, 3));
      co_await sleep(0s);
      // A wake-up whose predicate is false parks the waiter again, at the back of the queue.
      co_await cond.acquire();
      cond.notify();  // t1 re-checks: false
      cond.release();
      for (int i = 0; i < 3; ++i) co_await sleep(0s);
      CHECK(order.empty());
      // Cancelled while waiting for the notification: leaves with the lock.
      co_await cond.acquire();
      t2.cancel();
      for (int i = 0; i < 2; ++i) co_await sleep(0s);
      CHECK_FALSE(t2.done());  // we hold the lock
      cond.release();
      co_await wait_done(t2);
      CHECK(t2.cancelled());
      CHECK(order == std::vector<int>{-2});
      // Notified, then cancelled while re-acquiring: the notification goes to the next waiter.
      co_await cond.acquire();
      turn = 1;
      cond.notify();  // t3 (t1 went to the back)
      co_await sleep(0s);
      t3.cancel();
      cond.release();
      co_await wait_done(t3);
      CHECK(t3.cancelled());
      co_await t1;  // got t3's notification, and its predicate holds
      CHECK(order == std::vector<int>{-2, -3, 1});
      CHECK_FALSE(cond.locked());
    }());
  }

  TEST_CASE("wait_for: a predicate that throws after a wake-up lets the exception out with the lock held") {
    condition cond;
    static int wakeups = 0;
    auto waiter = [](condition& c) -> coroutine<bool> {
      auto guard = co_await c.scoped();
      try {
        co_await c.wait_for([]() -> bool {
          if (wakeups == 2) throw std::domain_error("pred");
          return false;
        });
      } catch (const std::domain_error&) {
        co_return c.locked();
      }
      co_return false;
    };
    testing::run_bounded([&]() -> coroutine<void> {
      auto t = create_task(waiter(cond));
      co_await sleep(0s);
      for (int i = 0; i < 2; ++i) {
        co_await cond.acquire();
        ++wakeups;
        cond.notify();
        cond.release();
        co_await sleep(0s);
        co_await sleep(0s);
      }
      CHECK(co_await t);
      CHECK_FALSE(cond.locked());
    }());
  }

  TEST_CASE("conditions over a shared lock, or a borrowed one") {
    auto shared = std::make_shared<lock>();
    condition a(shared), b(shared);
    lock plain;
    condition c(plain);
    static std::vector<char> order;
    auto waiter = [](condition& cond, char id) -> coroutine<void> {
      auto guard = co_await cond.scoped();
      co_await cond.wait();
      order.push_back(id);
    };
    testing::run_bounded([&]() -> coroutine<void> {
      co_await a.acquire();
      CHECK(b.locked());
      CHECK(shared->locked());
      b.release();
      CHECK_FALSE(a.locked());
      co_await plain.acquire();
      CHECK(c.locked());
      c.release();
      CHECK_FALSE(plain.locked());

      auto ta = create_task(waiter(a, 'a'));
      auto tb = create_task(waiter(b, 'b'));
      co_await sleep(0s);
      co_await shared->acquire();
      b.notify();  // only b's waiter
      shared->release();
      co_await tb;
      CHECK(order == std::vector<char>{'b'});
      co_await a.acquire();
      a.notify();
      a.release();
      co_await ta;
      CHECK(order == std::vector<char>{'b', 'a'});
    }());
  }

  TEST_CASE("a waiter cancelled while waiting re-acquires the lock before cancelled_error leaves wait") {
    condition cond;
    static int phase = 0;
    static bool locked_in_handler = false;
    auto waiter = [](condition& c) -> coroutine<void> {
      co_await c.acquire();
      try {
        co_await c.wait();
      } catch (const cancelled_error&) {
        locked_in_handler = c.locked();
        phase = 1;
        c.release();
        throw;
      }
    };
    testing::run_bounded([&]() -> coroutine<void> {
      auto t = create_task(waiter(cond));
      co_await sleep(0s);
      co_await cond.acquire();
      t.cancel();
      for (int i = 0; i < 3; ++i) co_await sleep(0s);
      CHECK(phase == 0);  // cannot leave wait() while we hold the lock
      CHECK_FALSE(t.done());
      cond.release();
      co_await wait_done(t);
      CHECK(t.cancelled());
      CHECK(phase == 1);
      CHECK(locked_in_handler);
      CHECK_FALSE(cond.locked());
    }());
  }

  TEST_CASE("a waiter cancelled right after notify passes the notification on") {
    condition cond;
    std::vector<int> order;
    auto waiter = [](condition& c, std::vector<int>& log, int id) -> coroutine<void> {
      auto guard = co_await c.scoped();
      try {
        co_await c.wait();
      } catch (const cancelled_error&) {
        log.push_back(-id);
        CHECK(c.locked());
        throw;
      }
      log.push_back(id);
    };
    testing::run_bounded([&]() -> coroutine<void> {
      auto t1 = create_task(waiter(cond, order, 1));
      auto t2 = create_task(waiter(cond, order, 2));
      auto t3 = create_task(waiter(cond, order, 3));
      co_await sleep(0s);
      co_await cond.acquire();
      cond.notify(1);  // t1 ...
      CHECK(t1.cancel());  // ... cancelled in the same iteration
      cond.release();
      co_await wait_done(t1);
      CHECK(t1.cancelled());
      co_await t2;  // got t1's notification
      for (int i = 0; i < 3; ++i) co_await sleep(0s);
      CHECK(order == std::vector<int>{-1, 2});
      CHECK_FALSE(t3.done());  // exactly one notification went round
      co_await cond.acquire();
      cond.notify();
      cond.release();
      co_await t3;
      CHECK(order == std::vector<int>{-1, 2, 3});
    }());
  }

  TEST_CASE("a cancel during the re-acquire is deferred until the lock is back") {
    condition cond;
    std::vector<int> order;
    static bool locked_in_handler = false;
    auto waiter = [](condition& c, std::vector<int>& log, int id) -> coroutine<void> {
      co_await c.acquire();
      try {
        co_await c.wait();
      } catch (const cancelled_error&) {
        locked_in_handler = c.locked();
        log.push_back(-id);
        c.release();
        throw;
      }
      log.push_back(id);
      c.release();
    };
    testing::run_bounded([&]() -> coroutine<void> {
      auto t1 = create_task(waiter(cond, order, 1));
      auto t2 = create_task(waiter(cond, order, 2));
      co_await sleep(0s);
      co_await cond.acquire();
      cond.notify();
      co_await sleep(0s);  // t1 now waits for the lock we hold
      CHECK(t1.cancel());
      CHECK(t1.cancel());  // a second cancel changes nothing
      co_await sleep(0s);
      co_await sleep(0s);
      CHECK_FALSE(t1.done());
      CHECK(order.empty());
      cond.release();
      co_await wait_done(t1);
      CHECK(t1.cancelled());
      CHECK(locked_in_handler);
      co_await t2;  // the notification t1 dropped
      CHECK(order == std::vector<int>{-1, 2});
      CHECK_FALSE(cond.locked());
    }());
  }

  TEST_CASE("a waiter cancelled while another holds the re-acquired lock keeps FIFO lock order") {
    condition cond;
    std::vector<int> order;
    auto waiter = [](condition& c, std::vector<int>& log, int id) -> coroutine<void> {
      auto guard = co_await c.scoped();
      try {
        co_await c.wait();
        log.push_back(id);
      } catch (const cancelled_error&) {
        log.push_back(-id);
      }
      co_await sleep(0s);  // keep the lock an iteration
    };
    testing::run_bounded([&]() -> coroutine<void> {
      auto t1 = create_task(waiter(cond, order, 1));
      auto t2 = create_task(waiter(cond, order, 2));
      auto t3 = create_task(waiter(cond, order, 3));
      co_await sleep(0s);
      co_await cond.acquire();
      cond.notify();  // t1 queues for the lock first
      t3.cancel();    // t3 queues second, not notified
      cond.release();
      co_await t1;
      co_await t3;
      CHECK(order == std::vector<int>{1, -3});
      CHECK_FALSE(t2.done());
      co_await cond.acquire();
      cond.notify_all();
      cond.release();
      co_await t2;
      CHECK(order == std::vector<int>{1, -3, 2});
    }());
  }
}
#endif
