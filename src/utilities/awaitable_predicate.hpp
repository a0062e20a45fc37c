// awaitable_predicate: a predicate that is a bool now and an awaitable "until it holds".
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/wait_for.hpp"
#include "../runtime/run.hpp"
#include "../primitives/condition.hpp"

#include <chrono>
#include <functional>
#include <memory>
#include <optional>

namespace codestare::async_utils {

/// codestare's awaitable_predicate. `bool(p)` evaluates the predicate now; `co_await p` takes
/// the condition's lock and waits (condition.wait_for) until the predicate holds, or throws
/// timeout_error after the timeout. Writers change the state under the condition's lock and
/// notify it. Each await is independent: one timing out or being cancelled does not disturb
/// the others (the Python original shares one waiter task between them).
class awaitable_predicate {
 public:
  using predicate_type = std::function<bool()>;
  using duration = std::chrono::steady_clock::duration;

  explicit awaitable_predicate(predicate_type predicate, std::shared_ptr<async_utils::condition> cond = nullptr,
                               std::optional<duration> timeout = std::nullopt);

  /// The predicate's value now (no lock taken).
  explicit operator bool() const { return predicate_(); }
  /// The condition writers notify after changing what the predicate reads.
  async_utils::condition& condition() const noexcept { return *condition_; }
  const std::shared_ptr<async_utils::condition>& shared_condition() const noexcept { return condition_; }
  const std::optional<duration>& timeout() const noexcept { return timeout_; }

  /// Waits until the predicate holds (the awaitable behind `co_await p`).
  coroutine<void> wait() const { return wait_impl(predicate_, condition_, timeout_); }
  auto operator co_await() const { return wait().operator co_await(); }

 private:
  // Takes copies: the coroutine may outlive the object it was started from.
  static coroutine<void> wait_impl(predicate_type predicate, std::shared_ptr<async_utils::condition> cond,
                                   std::optional<duration> timeout);

  predicate_type predicate_;
  std::shared_ptr<async_utils::condition> condition_;
  std::optional<duration> timeout_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK awaitable_predicate::awaitable_predicate(predicate_type predicate, std::shared_ptr<async_utils::condition> cond,
                             std::optional<duration> timeout)
    : predicate_(std::move(predicate)),
      condition_(cond ? std::move(cond) : std::make_shared<async_utils::condition>()),
      timeout_(timeout) {
  if (!predicate_) throw std::invalid_argument("awaitable_predicate: empty predicate");
  if (timeout_ && *timeout_ < duration::zero()) throw std::invalid_argument("awaitable_predicate: negative timeout");
}
#endif  // ASYNC_UTILS_DEFINITIONS

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK coroutine<void> awaitable_predicate::wait_impl(predicate_type predicate, std::shared_ptr<async_utils::condition> cond,
                                                                std::optional<duration> timeout) {
  auto guard = co_await cond->scoped();
  if (timeout) co_await wait_for(cond->wait_for(predicate), *timeout);
  else co_await cond->wait_for(predicate);
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <sstream>
TEST_SUITE("awaitable_predicate") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("reference example: bool conversion, then awaiting until the value is zero") {
    std::ostringstream out;
    int value = 0;
    awaitable_predicate is_zero([&] { return value == 0; });
    out << std::boolalpha << static_cast<bool>(is_zero) << '\n';
    value = 1;
    out << static_cast<bool>(is_zero) << '\n';
    auto set_value = [&](int number) -> coroutine<void> {
      auto guard = co_await is_zero.condition().scoped();
      value = number;
      is_zero.condition().notify();
    };
    auto wait_for_zero = [&]() -> coroutine<void> {
      co_await is_zero;
      out << "Finally! value: " << value << '\n';
    };
    testing::run_bounded([&]() -> coroutine<void> {
      auto waiter = create_task(wait_for_zero());
      for (int n = 2; n >= 0; --n) co_await set_value(n);
      co_await waiter;
    }());
    CHECK(out.str() == "true\nfalse\nFinally! value: 0\n");
  }

  TEST_CASE("returns at once when the predicate already holds; times out otherwise") {
    bool flag = true;
    awaitable_predicate p([&] { return flag; }, nullptr, 20ms);
    testing::run_bounded([&]() -> coroutine<void> {
      co_await p;
      flag = false;
      CHECK_THROWS_AS(co_await p, timeout_error);
      CHECK_FALSE(p.condition().locked());  // the lock is released after a timeout
    }());
  }

  TEST_CASE("concurrent awaits are independent: a timeout or cancellation leaves the others waiting") {
    int value = 0;
    auto cond = std::make_shared<condition>();
    awaitable_predicate forever([&] { return value == 1; }, cond);
    awaitable_predicate impatient([&] { return value == 1; }, cond, 5ms);
    testing::run_bounded([&]() -> coroutine<void> {
      auto a = create_task(forever.wait());
      auto b = create_task(impatient.wait());
      auto c = create_task(forever.wait());
      co_await wait_done(b);
      CHECK_THROWS_AS(b.result(), timeout_error);
      c.cancel();
      co_await wait_done(c);
      CHECK(c.cancelled());
      CHECK_FALSE(a.done());
      {
        auto guard = co_await cond->scoped();
        value = 1;
        cond->notify_all();
      }
      co_await a;
    }());
  }

  TEST_CASE("bad arguments") {
    CHECK_THROWS_AS(awaitable_predicate(nullptr), std::invalid_argument);
    CHECK_THROWS_AS(awaitable_predicate([] { return true; }, nullptr, -1s), std::invalid_argument);
  }
}
#endif
