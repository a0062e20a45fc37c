// async_exit_on_exc(cm, task): exits an async context manager with the exception a task ended
// with (codestare's async_exit_on_exc), directly or as a done callback.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/any_task.hpp"
#include "../runtime/event_loop.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/run.hpp"
#include "async_exit_stack.hpp"

#include <exception>
#include <optional>

namespace codestare::async_utils {
namespace detail {

/// The exception `t` ended with, null when it returned or was cancelled; throws
/// invalid_state_error while it is pending. Marks the outcome as retrieved.
template <class Task>
std::exception_ptr failure_of(const Task& t) {
  if (!t.done()) throw invalid_state_error("async_exit_on_exc: the task is not done yet");
  if (t.cancelled()) return nullptr;
  std::exception_ptr error = t.exception();
  if (!error) return nullptr;
  try {
    std::rethrow_exception(error);
  } catch (const cancelled_error&) {
    return nullptr;  // a task that raised cancelled_error itself ended cancelled
  } catch (...) {
  }
  return error;
}

/// What async_exit_on_exc(cm) returns: a done callback for any kind of task or future.
template <class CM>
struct exit_on_exc_callback {
  CM* cm;
  event_loop* loop;
  template <class Task>
  void operator()(const Task& t) const;
};

}  // namespace detail

/// If `t` (a task or future, done) ended with an exception other than cancelled_error,
/// schedules `cm.aexit(that exception)` as a task on `loop` (the running loop by default) and
/// returns that task; else returns nothing. `cm` must outlive the scheduled exit. A task still
/// pending is refused with invalid_state_error (Python would exit `cm` with that error).
template <class CM, class Task>
auto async_exit_on_exc(CM& cm, const Task& t, event_loop* loop = nullptr) {
  static_assert(async_context_manager<CM>, "async_exit_on_exc needs an async context manager: aenter() and aexit(std::exception_ptr)");
  using exit_task = decltype(std::declval<event_loop&>().create_task(cm.aexit(std::exception_ptr())));
  std::optional<exit_task> scheduled;
  if (std::exception_ptr error = detail::failure_of(t)) {
    event_loop& target = loop ? *loop : event_loop::current();
    scheduled.emplace(target.create_task(cm.aexit(error), "async_exit_on_exc"));
  }
  return scheduled;
}

/// The done-callback form: `t.add_done_callback(async_exit_on_exc(cm))` (for any_task, task<T>
/// and future<T> alike). Holds `cm` by reference; the loop defaults to the task's running loop.
template <class CM>
auto async_exit_on_exc(CM& cm, event_loop* loop = nullptr) {
  static_assert(async_context_manager<CM>, "async_exit_on_exc needs an async context manager: aenter() and aexit(std::exception_ptr)");
  return detail::exit_on_exc_callback<CM>{&cm, loop};
}

template <class CM>
template <class Task>
void detail::exit_on_exc_callback<CM>::operator()(const Task& t) const {
  static_cast<void>(async_exit_on_exc(*cm, t, loop));
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <algorithm>

namespace async_exit_on_exc_tests {
using namespace codestare::async_utils;
/// Remembers what aexit received.
struct exit_probe {
  std::vector<std::string> exits;
  coroutine<int> aenter() { co_return 0; }
  coroutine<bool> aexit(std::exception_ptr error) {
    exits.push_back(describe(error));
    co_return false;
  }
};
}  // namespace async_exit_on_exc_tests

TEST_SUITE("async_exit_on_exc") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;
  using async_exit_on_exc_tests::exit_probe;

  TEST_CASE("a failed task exits the context manager with its exception, on the loop") {
    testing::run_bounded([]() -> coroutine<void> {
      exit_probe cm;
      auto fails = create_task([]() -> coroutine<int> {
        co_await sleep(0s);
        throw std::runtime_error("task failed");
      }());
      co_await wait_done(fails);
      auto exit = async_exit_on_exc(cm, fails);
      REQUIRE(exit.has_value());
      CHECK(cm.exits.empty());  // scheduled, not run inline
      CHECK_FALSE(co_await *exit);
      CHECK(cm.exits == std::vector<std::string>{"task failed"});
    }());
  }

  TEST_CASE("success, cancellation and a pending task") {
    testing::run_bounded([]() -> coroutine<void> {
      exit_probe cm;
      auto ok = create_task([]() -> coroutine<int> { co_return 1; }());
      co_await wait_done(ok);
      CHECK_FALSE(async_exit_on_exc(cm, ok).has_value());
      auto sleeper = create_task([]() -> coroutine<void> { co_await sleep(1h); }());
      CHECK_THROWS_AS(async_exit_on_exc(cm, sleeper), invalid_state_error);
      sleeper.cancel();
      co_await wait_done(sleeper);
      CHECK_FALSE(async_exit_on_exc(cm, sleeper).has_value());
      // A task that throws cancelled_error itself is cancelled too.
      auto self_cancel = create_task([]() -> coroutine<void> {
        co_await sleep(0s);
        throw cancelled_error("by hand");
      }());
      co_await wait_done(self_cancel);
      CHECK_FALSE(async_exit_on_exc(cm, self_cancel).has_value());
      co_await sleep(0s);
      CHECK(cm.exits.empty());
    }());
  }

  TEST_CASE("as a done callback of task<T>, any_task and future<T>") {
    testing::run_bounded([]() -> coroutine<void> {
      exit_probe cm;
      auto fails = create_task([]() -> coroutine<int> {
        co_await sleep(0s);
        throw std::invalid_argument("typed");
      }());
      fails.add_done_callback(async_exit_on_exc(cm));
      any_task untyped = create_task([]() -> coroutine<void> {
        co_await sleep(0s);
        throw std::domain_error("untyped");
      }());
      untyped.add_done_callback(async_exit_on_exc(cm, &event_loop::current()));
      auto fut = event_loop::current().create_future<int>();
      fut.add_done_callback(async_exit_on_exc(cm));
      fut.set_exception(std::make_exception_ptr(std::out_of_range("future")));
      auto ok = create_task([]() -> coroutine<void> { co_return; }());
      ok.add_done_callback(async_exit_on_exc(cm));
      co_await wait_done(fails);
      co_await wait_done(untyped);
      for (int i = 0; i < 5; ++i) co_await sleep(0s);  // callbacks, then the exit tasks
      std::sort(cm.exits.begin(), cm.exits.end());
      CHECK(cm.exits == std::vector<std::string>{"future", "typed", "untyped"});
    }());
  }
}
#endif
