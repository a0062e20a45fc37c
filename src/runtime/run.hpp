// run(aw): asyncio.run. A fresh loop runs aw, then cancels and awaits what is left, shuts the
// executor down and closes, so nothing outlives the call.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../platform/log.hpp"
#include "test_support.hpp"
#include "future_core.hpp"
#include "any_task.hpp"
#include "event_loop.hpp"
#include "awaitable.hpp"
#include "future.hpp"
#include "coroutine.hpp"
#include "sleep.hpp"
#include "completion.hpp"
#include "task.hpp"
#include "wait_for.hpp"
#include "io.hpp"
#include "executor.hpp"

namespace codestare::async_utils {
namespace detail {

/// Cancels every pending task and runs the loop until all are done (rounds repeat for tasks
/// started by cleanup code); failures other than cancellation go to the exception handler.
ASYNC_UTILS_LINK void cancel_all_tasks(event_loop& loop);
/// Everything run() does after the main coroutine, in asyncio's order.
ASYNC_UTILS_LINK void finish_run(event_loop& loop) noexcept;

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void cancel_all_tasks(event_loop& loop) {
  for (;;) {
    std::vector<any_task> pending;
    loop.for_each_task([&](future_core& core) { pending.emplace_back(&core); });
    if (pending.empty()) return;
    for (auto& t : pending) t.cancel();
    loop.run_until_complete([](std::vector<any_task> tasks) -> coroutine<void> {
      for (auto& t : tasks) co_await wait_done(t);
    }(pending));
    for (auto& t : pending) {
      if (t.cancelled()) continue;
      if (auto error = t.exception())
        loop.call_exception_handler({"unhandled exception during run() shutdown", error, t, std::nullopt});
    }
  }
}

ASYNC_UTILS_LINK void finish_run(event_loop& loop) noexcept {
  try {
    cancel_all_tasks(loop);
    loop.shutdown_default_executor_now();
  } catch (...) {
    log(log_level::error, "run(): error while shutting down: " + describe(std::current_exception()));
  }
  try {
    loop.close();
  } catch (...) {
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace detail

/// asyncio.run: runs `aw` on a new loop and returns its result (or rethrows). Throws
/// std::runtime_error when a loop is already running on this thread.
template <class A>
auto run(A&& aw) {
  if (detail::running_loop) throw std::runtime_error("run() cannot be called when an event loop is running on this thread");
  event_loop loop;
  using R = await_result_t<A>;
  try {
    if constexpr (std::is_void_v<R>) {
      loop.run_until_complete(std::forward<A>(aw));
      detail::finish_run(loop);
    } else {
      R result = loop.run_until_complete(std::forward<A>(aw));
      detail::finish_run(loop);
      return result;
    }
  } catch (...) {
    detail::finish_run(loop);
    throw;
  }
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <thread>
namespace codestare::async_utils::testing {
inline void run_bounded(coroutine<void> body, std::chrono::milliseconds limit, bool check_leaks) {
  // Every bounded run of the suite also checks that run() leaves nothing behind.
  const int fds_before = open_fds();
  const int threads_before = threads();
  run(wait_for(std::move(body), limit));
  if (!check_leaks) return;
  // (Fewer is fine: a body may close a descriptor its test opened before.)
  CHECK_MESSAGE(open_fds() <= fds_before, "run() left a descriptor open");
  CHECK_MESSAGE(threads_after_join(threads_before) <= threads_before, "run() left a thread running");
}
inline coroutine<int> after(std::chrono::milliseconds d, int v) {
  co_await sleep(d);
  co_return v;
}
inline coroutine<int> fail_after(std::chrono::milliseconds d, std::string what) {
  co_await sleep(d);
  throw std::runtime_error(what);
}
}  // namespace codestare::async_utils::testing

TEST_SUITE("run") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("run returns the result, cancels leftovers, closes, leaks no descriptor") {
    const int fds_before = testing::open_fds();
    static bool leftover_cancelled = false;
    auto leftover = []() -> coroutine<void> {
      try {
        co_await sleep(1h);
      } catch (const cancelled_error&) {
        leftover_cancelled = true;
        throw;
      }
    };
    auto main = [&]() -> coroutine<int> {
      create_task(leftover());
      co_await sleep(0s);
      co_return 42;
    };
    CHECK(run(main()) == 42);
    CHECK(leftover_cancelled);
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("after run(): no extra descriptor, no extra thread, no live task") {
    const int fds_before = testing::open_fds();
    const int threads_before = testing::threads();
    std::vector<any_task> started;
    auto main = [&]() -> coroutine<int> {
      event_loop& loop = event_loop::current();
      // A representative run: a descriptor wait, timers, futures, a task awaiting a task, a
      // thread posting to the loop, a leftover timer, and a task that has to be cancelled.
      int sp[2];
      REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp) == 0);
      auto reader = create_task(sock_recv(sp[0], 16));
      auto fut = loop.create_future<int>();
      auto waiter = create_task([](future<int> f) -> coroutine<int> { co_return co_await f; }(fut));
      auto chained = create_task([](task<int> t) -> coroutine<int> { co_return co_await t + 1; }(waiter));
      auto sleeper = create_task(sleep(1h));
      loop.call_later(1h, [] {});  // still in the timer heap when run() ends
      // (The future is captured by reference: its handles are counted on the loop thread only.)
      std::thread poster([&loop, &fut] { loop.call_soon_threadsafe([&fut] { fut.set_result(41); }); });
      CHECK(co_await chained == 42);
      poster.join();
      CHECK(::write(sp[1], "x", 1) == 1);
      CHECK(co_await reader == "x");
      sleeper.cancel();
      co_await wait_done(sleeper);
      ::close(sp[0]);
      ::close(sp[1]);
      started = {reader, waiter, chained, sleeper};
      // Only the main task itself is left.
      auto tasks = all_tasks();
      REQUIRE(tasks.size() == 1);
      CHECK(tasks[0] == *current_task());
      co_return 7;
    };
    CHECK(run(main()) == 7);
    REQUIRE(started.size() == 4);
    for (auto& t : started) CHECK(t.done());
    CHECK(testing::open_fds() == fds_before);
    CHECK(testing::threads() == threads_before);
  }

  TEST_CASE("run rethrows, and refuses to nest inside a running loop") {
    auto fails = []() -> coroutine<void> {
      co_await sleep(0s);
      throw std::domain_error("failed");
    };
    CHECK_THROWS_AS(run(fails()), std::domain_error);
    auto nested = []() -> coroutine<void> {
      auto inner = []() -> coroutine<void> { co_return; };
      CHECK_THROWS_AS(run(inner()), std::runtime_error);
      co_return;
    };
    run(nested());
  }

  TEST_CASE("a leftover task may await cleanup after being cancelled at shutdown") {
    static int cleanups = 0;
    auto careful = []() -> coroutine<void> {
      try {
        co_await sleep(1h);
      } catch (const cancelled_error&) {
        ++cleanups;
      }
      co_await sleep(1ms);  // cleanup that itself awaits, then a normal return
    };
    auto main = [&]() -> coroutine<void> {
      create_task(careful());
      co_await sleep(0s);
    };
    run(main());
    CHECK(cleanups == 1);
  }
}
#endif
