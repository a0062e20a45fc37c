// sleep(duration): asyncio.sleep. sleep(0s) yields to the loop once without a timer.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "test_support.hpp"
#include "timer_heap.hpp"
#include "future_core.hpp"
#include "event_loop.hpp"
#include "task_steps.hpp"
#include "coroutine.hpp"

#include <chrono>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>

namespace codestare::async_utils {
namespace detail {

/// The timed part of a sleep: a heap node and a cancel hook.
struct sleep_timer : cancel_hook, timer_node {
  future_core* task = nullptr;
  bool withdrawn = false;
};

/// co_await sleep(d). A positive delay builds a sleep_timer in place; sleep(0s) (a bare yield)
/// touches nothing but the task.
struct sleep_awaiter {
  clock::duration delay;
  future_core* task = nullptr;
  union {
    sleep_timer timer;  // alive exactly when timed()
  };

  explicit sleep_awaiter(clock::duration d) noexcept : delay(d) {
    if (timed()) ::new (static_cast<void*>(&timer)) sleep_timer();
  }
  sleep_awaiter(const sleep_awaiter&) = delete;
  sleep_awaiter& operator=(const sleep_awaiter&) = delete;
  ~sleep_awaiter() {
    if (!timed()) return;
    if (timer.scheduled() && task && task->loop()) task->loop()->remove_timer(timer);
    timer.~sleep_timer();
  }
  bool timed() const noexcept { return delay > clock::duration::zero(); }
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) {
    task = &current_task_core("sleep()");
    if (!timed()) {  // a bare yield: nothing to withdraw
      task->suspend_on(nullptr, h);
      task->wake();
      return;
    }
    timer.task = task;
    timer.fire = [](timer_node* node, bool run) {
      if (run) static_cast<sleep_timer*>(node)->task->wake();
    };
    timer.cancel = [](cancel_hook* c) {
      auto* self = static_cast<sleep_timer*>(c);
      self->task->loop()->remove_timer(*self);
      self->withdrawn = true;
      self->task->wake();
      return true;
    };
    task->loop()->add_timer(timer, saturating_add(clock::now(), delay));
    task->suspend_on(&timer, h);
  }
  void await_resume() { task->throw_if_cancelled(timed() && timer.withdrawn); }
};

/// What sleep() returns: a movable value; the awaiter (holding the timer) lives in the frame.
struct sleep_for {
  clock::duration delay;
  sleep_awaiter operator co_await() const noexcept { return sleep_awaiter(delay); }
};

/// sleep(d, result): the sleep, then the result (moved out of the awaitable).
template <class T>
struct sleep_with {
  clock::duration delay;
  T result;
  struct awaiter : sleep_awaiter {
    T* result;
    awaiter(clock::duration d, T* r) noexcept : sleep_awaiter(d), result(r) {}
    T await_resume() {
      sleep_awaiter::await_resume();
      return std::move(*result);
    }
  };
  awaiter operator co_await() & noexcept { return awaiter(delay, &result); }
  awaiter operator co_await() && noexcept { return awaiter(delay, &result); }
};

}  // namespace detail

/// Suspends the running task for `delay` (asyncio.sleep); cancellable. Any unit; a negative
/// delay yields once like sleep(0s); a delay past the clock's range (seconds::max()) sleeps
/// until cancelled.
template <class Rep, class Period>
detail::sleep_for sleep(std::chrono::duration<Rep, Period> delay) {
  return {detail::to_clock_duration(delay)};
}

/// asyncio.sleep(delay, result): sleeps, then yields `result`.
template <class Rep, class Period, class T>
detail::sleep_with<std::decay_t<T>> sleep(std::chrono::duration<Rep, Period> delay, T&& result) {
  return {detail::to_clock_duration(delay), std::forward<T>(result)};
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("sleep") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  // Sleeps `delay` while a timer cancels the sleeping task after `cancel_after`: true if the
  // sleep lasted until then (it was cancelled), false if it returned first.
  coroutine<bool> sleeps_until_cancelled(auto delay, std::chrono::milliseconds cancel_after = 3ms) {
    event_loop& loop = event_loop::current();
    detail::future_core* self = loop.running_task();
    auto h = loop.call_later(cancel_after, [self] { self->cancel("woken"); });
    try {
      co_await sleep(delay);
    } catch (const cancelled_error&) {
      self->uncancel();
      co_return true;
    }
    h.cancel();
    co_return false;
  }

  TEST_CASE("sleep with a delay past the clock's range sleeps until cancelled") {
    // Regression: seconds::max() wrapped to a negative delay and sleep returned at once.
    testing::run_bounded([]() -> coroutine<void> {
      CHECK(co_await sleeps_until_cancelled(std::chrono::seconds::max()));
      CHECK(co_await sleeps_until_cancelled(std::chrono::hours::max()));
      CHECK(co_await sleeps_until_cancelled(std::chrono::steady_clock::duration::max()));
      CHECK(co_await sleeps_until_cancelled(std::chrono::duration<double>(std::numeric_limits<double>::infinity())));
      CHECK(co_await sleeps_until_cancelled(1h));
      // Negative and zero delays yield once.
      CHECK_FALSE(co_await sleeps_until_cancelled(-1s));
      CHECK_FALSE(co_await sleeps_until_cancelled(std::chrono::hours::min()));
      CHECK_FALSE(co_await sleeps_until_cancelled(0s));
      // A late loop may find both deadlines due at once; the cancel then wins, as in asyncio.
      CHECK_FALSE(co_await sleeps_until_cancelled(1ms, 10s));
    }());
  }

  TEST_CASE("sleep(delay, result) yields the result; cancellation still lands") {
    testing::run_bounded([]() -> coroutine<void> {
      CHECK(co_await sleep(1ms, 7) == 7);
      std::string word = "kept";
      CHECK(co_await sleep(0s, word) == "kept");
      CHECK(word == "kept");  // copied, not moved from
      auto later = sleep(-1s, std::make_unique<int>(3));
      CHECK(*(co_await later) == 3);
      event_loop& loop = event_loop::current();
      detail::future_core* self = loop.running_task();
      auto h = loop.call_later(1ms, [self] { self->cancel("stop"); });
      CHECK_THROWS_AS(co_await sleep(std::chrono::hours::max(), 1), cancelled_error);
      self->uncancel();
    }());
  }
}
#endif
