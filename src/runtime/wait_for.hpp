// wait_for(aw, timeout): asyncio.wait_for. On timeout the inner task is cancelled, awaited, and
// timeout_error is thrown.
#pragma once

#include <chrono>

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
template <class R, class H>
coroutine<R> wait_for_impl(H aw, clock::duration timeout) {
  auto fut = ensure_future(std::move(aw), "wait_for");
  auto* state = fut.state_ptr();
  if (!state->done()) {
    completion_awaiter waiting(state, true);
    waiting.has_deadline = true;
    waiting.timeout = timeout;
    co_await waiting;
    if (waiting.expired && state->cancelled()) throw timeout_error("wait_for: timed out");
  }
  co_return take_result(*state);
}
ASYNC_UTILS_USER_TYPES_IN_FRAMES_END

}  // namespace detail

/// Waits for `aw` at most `timeout` (asyncio.wait_for). On timeout, cancels it, waits for the
/// cancellation to land, and throws timeout_error; if it ignored the cancellation and returned,
/// its value is returned (as asyncio 3.12 does). Cancelling the caller cancels `aw` too.
template <awaitable_argument A, class Rep, class Period>
auto wait_for(A&& aw, std::chrono::duration<Rep, Period> timeout) {
  using H = detail::held_t<A>;
  if constexpr (!detail::check_by_value<A>()) return coroutine<argument_result_t<A>>();
  else return detail::wait_for_impl<argument_result_t<A>, H>(H(std::forward<A>(aw)), std::chrono::duration_cast<detail::clock::duration>(timeout));
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
