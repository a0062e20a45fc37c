// wait_for(aw, timeout): asyncio.wait_for. On timeout the inner task is cancelled, awaited, and
// timeout_error is thrown.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "test_support.hpp"
#include "timer_heap.hpp"
#include "future_core.hpp"
#include "event_loop.hpp"
#include "task_steps.hpp"
#include "awaitable.hpp"
#include "future.hpp"
#include "coroutine.hpp"
#include "sleep.hpp"
#include "completion.hpp"
#include "task.hpp"

#if ASYNC_UTILS_DEFINITIONS
#include <algorithm>
#endif
#include <chrono>
#include <limits>

namespace codestare::async_utils {
namespace detail {

/// A future<R> for any awaitable argument: a copy of a future or task handle, anything else
/// in a new task (by the rules of create_task).
template <class A>
auto ensure_future(A&& aw, const char* what) {
  using H = held_t<A>;
  event_loop& loop = event_loop::current();
  if constexpr (is_future_handle<H>::value) {
    check_same_loop(*aw.state_ptr(), &loop, what);
    return future<typename H::value_type>(aw);
  } else {
    return future<argument_result_t<A>>(loop.create_task(std::forward<A>(aw)));
  }
}

ASYNC_UTILS_USER_TYPES_IN_FRAMES_BEGIN
// asyncio 3.12's wait_for, which is `async with timeout(t): return await fut`: the deadline
// cancels the waiting task, and only a cancellation that the deadline itself accounts for
// (uncancel() back to the count at entry) becomes timeout_error. An outside cancel(), before or
// after the deadline, keeps the count above it and leaves as cancelled_error.
template <class R, class H>
coroutine<R> wait_for_impl(H aw, clock::duration timeout) {
  auto fut = ensure_future(std::move(aw), "wait_for");
  auto* state = fut.state_ptr();
  if (timeout == clock::duration::zero()) {
    // asyncio 3.12: no waiting at all; cancel what is not done, wait for that to land.
    if (!state->done()) {
      state->cancel({});
      co_await completion_awaiter(state, false);  // a cancellation of ours ends here, as asyncio's
      if (state->cancelled()) throw timeout_error("wait_for: timed out");
    }
    co_return take_result(*state);
  }
  if (!state->done()) {
    future_core& me = current_task_core("wait_for");
    const unsigned cancelling_before = me.cancel_requests();
    completion_awaiter waiting(state, true);
    waiting.has_deadline = true;
    waiting.timeout = timeout;
    try {
      co_await waiting;
    } catch (const cancelled_error&) {  // a cancellation came after the awaited one had finished
      // A coroutine argument runs in a task of ours, so its outcome reaches nobody else: as
      // asyncio 3.12 (which awaits a coroutine inline) it is returned, and the cancellation waits
      // for the caller's next suspension. A handle's owner still has its outcome.
      if constexpr (!is_future_handle<H>::value) {
        if (state->done() && !state->cancelled()) {
          if (waiting.expired) me.uncancel();  // the deadline's request, handled by the value
          me.keep_cancel_pending();
          co_return take_result(*state);
        }
      }
      if (waiting.expired && me.uncancel() <= cancelling_before) throw timeout_error("wait_for: timed out");
      throw;
    }
    if (waiting.expired && me.uncancel() <= cancelling_before && state->cancelled()) throw timeout_error("wait_for: timed out");
  }
  co_return take_result(*state);
}
ASYNC_UTILS_USER_TYPES_IN_FRAMES_END

}  // namespace detail

/// Waits for `aw` at most `timeout` (asyncio.wait_for, as in Python 3.12). On timeout, cancels
/// it, waits for the cancellation to land, and throws timeout_error; if it ignored the
/// cancellation and returned, its value is returned. Cancelling the caller cancels `aw` too,
/// and such a cancellation leaves as cancelled_error even when it meets the timeout. A timeout
/// of zero or less cancels `aw` unless it is done already; duration::max() waits for ever.
template <awaitable_argument A, class Rep, class Period>
auto wait_for(A&& aw, std::chrono::duration<Rep, Period> timeout) {
  using H = detail::held_t<A>;
  if constexpr (!detail::check_by_value<A>()) return coroutine<argument_result_t<A>>();
  else return detail::wait_for_impl<argument_result_t<A>, H>(H(std::forward<A>(aw)), std::max(detail::to_clock_duration(timeout), detail::clock::duration::zero()));
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("wait_for") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("returns the result in time; on timeout cancels the inner task and throws") {
    testing::run_bounded([]() -> coroutine<void> {
      auto quick = []() -> coroutine<int> {
        co_await sleep(1ms);
        co_return 4;
      };
      CHECK(co_await wait_for(quick(), 5s) == 4);
      bool inner_cancelled = false;
      auto slow = [&]() -> coroutine<int> {
        try {
          co_await sleep(1h);
        } catch (const cancelled_error&) {
          inner_cancelled = true;
          throw;
        }
        co_return 0;
      };
      CHECK_THROWS_AS(co_await wait_for(slow(), 10ms), timeout_error);
      CHECK(inner_cancelled);
      auto t = create_task(slow());
      CHECK_THROWS_AS(co_await wait_for(t, 0s), timeout_error);
      CHECK(t.cancelled());
    }());
  }

  TEST_CASE("an inner task that swallows the cancellation returns its value") {
    testing::run_bounded([]() -> coroutine<void> {
      auto stubborn = []() -> coroutine<int> {
        try {
          co_await sleep(1h);
        } catch (const cancelled_error&) {
        }
        co_return 8;
      };
      CHECK(co_await wait_for(stubborn(), 5ms) == 8);
    }());
  }

  task<int> slow_value(int v) {
    return create_task([](int x) -> coroutine<int> {
      co_await sleep(1ms);
      co_return x;
    }(v));
  }
  // The helper: `t` dies when it returns, before wait_for starts.
  task<int> with_timeout(task<int> t) { return create_task(wait_for(t, 1s)); }

  TEST_CASE("wait_for keeps its own copy of a handle given by a helper or a loop") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<task<int>> limited;
      for (int i = 0; i < 3; ++i) {
        auto t = slow_value(i);
        limited.push_back(with_timeout(t));
        limited.push_back(create_task(wait_for(t, 1s)));
      }
      for (std::size_t i = 0; i < limited.size(); ++i) CHECK(co_await limited[i] == static_cast<int>(i / 2));
    }());
  }

  // An outside cancel() that meets the timeout, in either order. The inner task's cleanup waits
  // on a gate, and takes a second cancellation there, so both land before it ends. CPython 3.12's
  // wait_for gives "cancelled" in both orders, cancelling() 1 (checked with its code on 3.11).
  ASYNC_UTILS_USER_TYPES_IN_FRAMES_BEGIN
  coroutine<std::string> timeout_meets_cancel(bool outside_first) {
    event_loop& loop = event_loop::current();
    auto got_cancel = loop.create_future<void>();
    auto gate = loop.create_future<void>();
    auto started = loop.create_future<void>();
    auto inner = [](future<void> started, future<void> got_cancel, future<void> gate) -> coroutine<void> {
      started.set_result();
      try {
        co_await sleep(1h);
      } catch (const cancelled_error&) {
        got_cancel.set_result();
      }
      try {
        co_await gate;
      } catch (const cancelled_error&) {  // the second cancellation lands here
      }
      throw cancelled_error();
    };
    auto outer = create_task([](coroutine<void> body) -> coroutine<std::string> {
      try {
        co_await wait_for(std::move(body), 1ms);
        co_return "value";
      } catch (const timeout_error&) {
        co_return "timeout";
      } catch (const cancelled_error&) {
        co_return "cancelled";
      }
    }(inner(started, got_cancel, gate)));
    if (outside_first) {
      co_await started;
      outer.cancel();
      co_await got_cancel;
      co_await sleep(5ms);  // the deadline passes meanwhile
    } else {
      co_await got_cancel;  // the deadline cancelled it
      outer.cancel();
    }
    if (!gate.done()) gate.set_result();
    std::string how = co_await outer;
    co_return how + " " + std::to_string(outer.cancelling());
  }
  ASYNC_UTILS_USER_TYPES_IN_FRAMES_END

  TEST_CASE("an outside cancel that meets the timeout leaves as cancelled_error, in either order") {
    testing::run_bounded([]() -> coroutine<void> {
      CHECK(co_await timeout_meets_cancel(false) == "cancelled 1");
      CHECK(co_await timeout_meets_cancel(true) == "cancelled 1");
      // A timeout of its own is handled: the count goes back to zero.
      auto slow = []() -> coroutine<void> { co_await sleep(1h); };
      CHECK_THROWS_AS(co_await wait_for(slow(), 1ms), timeout_error);
      CHECK(current_task()->cancelling() == 0);
      co_await sleep(0s);  // and no stray cancellation is left for the next await
    }());
  }

  TEST_CASE("timeouts of zero or less, and of duration::max()") {
    testing::run_bounded([]() -> coroutine<void> {
      bool ran = false;
      auto body = [](bool* r) -> coroutine<int> {
        *r = true;
        co_return 1;
      };
      // CPython 3.12: a coroutine with timeout 0 becomes a task, cancelled before it starts.
      CHECK_THROWS_AS(co_await wait_for(body(&ran), 0s), timeout_error);
      CHECK_FALSE(ran);
      CHECK_THROWS_AS(co_await wait_for(body(&ran), -5ms), timeout_error);
      auto done = create_task(body(&ran));
      co_await sleep(0s);
      CHECK(co_await wait_for(done, 0s) == 1);  // done already: its result
      auto pending = create_task([]() -> coroutine<int> {
        co_await sleep(1h);
        co_return 0;
      }());
      CHECK_THROWS_AS(co_await wait_for(pending, 0ms), timeout_error);
      CHECK(pending.cancelled());
      // duration::max() and friends wait for ever (the cast used to overflow into a timeout).
      auto later = [](int v) -> coroutine<int> {
        for (int i = 0; i < 3; ++i) co_await sleep(1ms);
        co_return v;
      };
      CHECK(co_await wait_for(later(2), std::chrono::hours::max()) == 2);
      CHECK(co_await wait_for(later(3), std::chrono::nanoseconds::max()) == 3);
      CHECK(co_await wait_for(later(4), std::chrono::duration<double>(std::numeric_limits<double>::infinity())) == 4);
      auto endless = create_task(wait_for(sleep(1h), std::chrono::hours::max()));
      co_await sleep(2ms);
      CHECK_FALSE(endless.done());  // no immediate timeout
      endless.cancel();
      CHECK_THROWS_AS(co_await endless, cancelled_error);
    }());
  }

  // A cancel() that comes after the inner coroutine finished, before the waiter resumed: the
  // value it produced (bytes a read consumed, say) is not lost; the caller's next await is
  // cancelled instead. A handle argument keeps its outcome in the handle.
  TEST_CASE("a cancellation after the inner coroutine finished keeps its value") {
    testing::run_bounded([]() -> coroutine<void> {
      auto gate = event_loop::current().create_future<void>();
      int got = 0;
      bool next_await_cancelled = false;
      auto producer = [](future<void> g) -> coroutine<int> {
        co_await g;
        co_return 42;
      };
      auto waiter = [&](coroutine<int> inner) -> coroutine<void> {
        got = co_await wait_for(std::move(inner), 1h);
        try {
          co_await sleep(0s);
        } catch (const cancelled_error&) {
          next_await_cancelled = true;
          throw;
        }
      };
      auto outer = create_task(waiter(producer(gate)));
      co_await sleep(0s);
      co_await sleep(0s);  // outer waits in wait_for, the producer on the gate
      gate.set_result();
      co_await sleep(0s);  // the producer finishes and wakes outer, which has not run yet
      outer.cancel();
      co_await wait_done(outer);
      CHECK(got == 42);
      CHECK(next_await_cancelled);
      CHECK(outer.cancelled());
      CHECK(outer.cancelling() == 1);

      auto gate2 = event_loop::current().create_future<void>();
      auto handle = create_task(producer(gate2));
      auto by_handle = create_task(wait_for(handle, 1h));
      co_await sleep(0s);
      co_await sleep(0s);
      gate2.set_result();
      co_await sleep(0s);
      by_handle.cancel();
      co_await wait_done(by_handle);
      CHECK(by_handle.cancelled());
      CHECK(handle.result() == 42);  // still there for the handle's owner
    }());
  }

  TEST_CASE("cancelling the waiter cancels the inner awaitable") {
    testing::run_bounded([]() -> coroutine<void> {
      auto inner = create_task([]() -> coroutine<void> { co_await sleep(1h); }());
      auto outer = create_task(wait_for(inner, 1h));
      co_await sleep(1ms);
      outer.cancel();
      co_await wait_done(outer);
      CHECK(outer.cancelled());
      CHECK(inner.cancelled());
    }());
  }
}
#endif
