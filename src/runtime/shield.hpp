// shield(aw): asyncio.shield. Cancelling the awaiting task does not cancel what it awaits.
#pragma once

#include "../platform/config.hpp"
#include "test_support.hpp"
#include "event_loop.hpp"
#include "awaitable.hpp"
#include "future.hpp"
#include "sleep.hpp"
#include "completion.hpp"
#include "task.hpp"
#include "wait_for.hpp"
#include "gather.hpp"

namespace codestare::async_utils {
namespace detail {
template <class T>
struct shielded {
  future<T> inner;
  auto operator co_await() const& { return future_awaiter<T, false, true>(inner.state_ptr()); }
  auto operator co_await() && { return future_awaiter<T, true, true>(inner.release_state()); }
};
}  // namespace detail

/// Runs `aw` in a task (if it is not one) and returns an awaitable of its result that does
/// not propagate cancellation: the awaiting task gets cancelled_error, the inner one runs on.
template <awaitable_argument A>
auto shield(A&& aw) {
  if constexpr (!detail::check_by_value<A>()) {
    return detail::shielded<argument_result_t<A>>{};
  } else {
    auto fut = detail::ensure_future(std::forward<A>(aw), "shield");
    return detail::shielded<typename decltype(fut)::value_type>{std::move(fut)};
  }
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("shield") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("wait_for, gather and shield refuse a future or task of another loop") {
    event_loop other;
    auto pending = other.create_future<int>();
    auto foreign_task = other.create_task([]() -> coroutine<int> { co_return 2; }());
    testing::run_bounded([&]() -> coroutine<void> {
      auto mine = create_task([]() -> coroutine<int> { co_return 1; }());
      CHECK_THROWS_WITH_AS(co_await wait_for(foreign_task, 1s), "wait_for: the future or task is attached to a different loop",
                           std::runtime_error);
      CHECK_THROWS_WITH_AS(shield(pending), "shield: the future or task is attached to a different loop", std::runtime_error);
      CHECK_THROWS_WITH_AS(co_await gather(mine, pending), "gather: the future or task is attached to a different loop",
                           std::runtime_error);
      std::vector<future<int>> mixed{mine, pending};
      CHECK_THROWS_AS(co_await gather(return_exceptions, mixed), std::runtime_error);
      CHECK(co_await mine == 1);
    }());
    CHECK_FALSE(pending.done());
  }

  TEST_CASE("cancellation stops at the shield; the inner task finishes") {
    testing::run_bounded([]() -> coroutine<void> {
      // The inner task waits on a gate, not on a timer: under Valgrind a 5 ms sleep could end
      // before the cancellation is even checked (that made this test flaky).
      auto gate = event_loop::current().create_future<int>();
      auto inner = create_task([](future<int> g) -> coroutine<int> { co_return co_await g; }(gate));
      auto outer = create_task([](task<int> i) -> coroutine<int> { co_return co_await shield(i); }(inner));
      co_await sleep(1ms);
      outer.cancel();
      co_await wait_done(outer);
      CHECK(outer.cancelled());
      CHECK_FALSE(inner.done());
      CHECK_FALSE(gate.cancelled());
      gate.set_result(6);
      CHECK(co_await inner == 6);
      CHECK(co_await shield([]() -> coroutine<int> { co_return 1; }()) == 1);
    }());
  }
}
#endif
