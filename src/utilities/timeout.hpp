// timeout(delay) / timeout_at(when): asyncio.timeout, an async context manager whose body runs
// in the current task. At the deadline the task is cancelled; at exit that cancellation (and
// only one the scope accounts for, by uncancel()) becomes timeout_error.
#pragma once

#include "../platform/config.hpp"

#include <chrono>
#include <exception>
#include <optional>
#include <stdexcept>

#include "async_exit_stack.hpp"

namespace codestare::async_utils {
namespace detail {

/// An awaitable with a value ready at once.
struct ready_bool {
  bool value;
  bool await_ready() const noexcept { return true; }
  void await_suspend(std::coroutine_handle<>) const noexcept {}
  bool await_resume() const noexcept { return value; }
};

ASYNC_UTILS_LINK bool is_cancellation(const std::exception_ptr& error);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK bool is_cancellation(const std::exception_ptr& error) {
  if (!error) return false;
  try {
    std::rethrow_exception(error);
  } catch (const cancelled_error&) {
    return true;
  } catch (...) {
    return false;
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace detail

/// asyncio.Timeout: what timeout() and timeout_at() return; enter it with async_with (or an
/// async_exit_stack). Movable until it is entered; moving an entered scope throws
/// std::logic_error (the deadline's callback points at it).
class timeout_scope {
 public:
  using time_point = detail::clock::time_point;

  /// std::nullopt: no deadline (reschedule() may set one later).
  explicit timeout_scope(std::optional<time_point> when) noexcept : when_(when) {}
  timeout_scope(timeout_scope&& other);
  timeout_scope& operator=(timeout_scope&&) = delete;
  ~timeout_scope() { timer_.cancel(); }

  /// The deadline (loop time), std::nullopt for none.
  std::optional<time_point> when() const noexcept { return when_; }
  /// True once the deadline has cancelled the task.
  bool expired() const noexcept { return state_ == state::expiring || state_ == state::expired; }

  /// Moves the deadline (std::nullopt: never; a past time: at the next loop iteration). Only
  /// inside the scope: std::runtime_error before it is entered or after it is left.
  void reschedule(std::optional<time_point> when);

  /// Enters the scope in the running task (std::runtime_error outside a task, or when entered
  /// twice); yields the scope.
  detail::ready_ref<timeout_scope> aenter();

  /// Leaves the scope: a cancellation the deadline caused, with no other cancel() pending,
  /// leaves as timeout_error (the cancelled_error nested); anything else passes through.
  detail::ready_bool aexit(std::exception_ptr error);

 private:
  enum class state { created, entered, expiring, expired, exited };

  void on_timeout();

  std::optional<time_point> when_;
  state state_ = state::created;
  detail::future_core* task_ = nullptr;
  unsigned cancelling_ = 0;
  handle timer_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK timeout_scope::timeout_scope(timeout_scope&& other) : when_(other.when_) {
  if (other.state_ != state::created) throw std::logic_error("timeout: cannot be moved once entered");
}

ASYNC_UTILS_LINK void timeout_scope::reschedule(std::optional<time_point> when) {
  if (state_ == state::created) throw std::runtime_error("timeout: has not been entered");
  if (state_ != state::entered) throw std::runtime_error("timeout: cannot reschedule an expired or finished timeout");
  when_ = when;
  timer_.cancel();
  timer_ = {};
  if (!when) return;
  event_loop& loop = *task_->loop();
  if (*when <= loop.time()) timer_ = loop.call_soon([this] { on_timeout(); });
  else timer_ = loop.call_at(*when, [this] { on_timeout(); });
}

ASYNC_UTILS_LINK detail::ready_ref<timeout_scope> timeout_scope::aenter() {
  if (state_ != state::created) throw std::runtime_error("timeout: has already been entered");
  task_ = &detail::current_task_core("timeout");
  state_ = state::entered;
  cancelling_ = task_->cancel_requests();
  reschedule(when_);
  return {*this};
}

ASYNC_UTILS_LINK detail::ready_bool timeout_scope::aexit(std::exception_ptr error) {
  timer_.cancel();
  timer_ = {};
  if (state_ == state::expiring) {
    state_ = state::expired;
    if (task_->uncancel() <= cancelling_ && detail::is_cancellation(error)) throw timeout_error("timeout: the deadline passed");
  } else if (state_ == state::entered) {
    state_ = state::exited;
  }
  return {false};
}

ASYNC_UTILS_LINK void timeout_scope::on_timeout() {
  task_->cancel({});
  state_ = state::expiring;
  timer_ = {};
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// asyncio.timeout(delay): a scope whose deadline is `delay` from now. Any unit; zero or less
/// expires at the first await; duration::max() (or more than the clock holds) never expires.
template <class Rep, class Period>
timeout_scope timeout(std::chrono::duration<Rep, Period> delay) {
  return timeout_scope(detail::saturating_deadline(delay));
}

/// asyncio.timeout(None): a scope without a deadline until reschedule() gives it one.
inline timeout_scope timeout(std::nullopt_t) { return timeout_scope(std::nullopt); }

/// asyncio.timeout_at(when): a scope whose deadline is the loop time `when` (nullopt: none).
inline timeout_scope timeout_at(std::optional<detail::clock::time_point> when) { return timeout_scope(when); }

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("timeout") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  // What a timed body ends as, and whether the scope says it expired.
  ASYNC_UTILS_USER_TYPES_IN_FRAMES_BEGIN
  coroutine<std::string> outcome(timeout_scope scope, coroutine<void> body) {
    bool expired = false;
    std::string how = "done";
    // Named before the co_await: g++ 12 mis-copies capturing lambdas and temporaries written
    // inside a co_await expression (README, Compilers).
    auto timed = [&](timeout_scope& t) -> coroutine<void> {
      try {
        co_await std::move(body);
      } catch (...) {
        expired = t.expired();
        throw;
      }
      expired = t.expired();
    };
    try {
      co_await async_with(std::move(scope), timed);
    } catch (const timeout_error&) {
      how = "timeout";
    } catch (const cancelled_error&) {
      how = "cancelled";
    }
    co_return how + (expired ? " expired" : "") + " " + std::to_string(current_task()->cancelling());
  }
  ASYNC_UTILS_USER_TYPES_IN_FRAMES_END

  coroutine<void> nap(std::chrono::milliseconds d) { co_await sleep(d); }
  coroutine<void> no_await() { co_return; }

  TEST_CASE("the body runs in the current task; the deadline becomes timeout_error") {
    testing::run_bounded([]() -> coroutine<void> {
      CHECK(co_await outcome(timeout(1h), nap(1ms)) == "done 0");
      CHECK(co_await outcome(timeout(1ms), nap(std::chrono::milliseconds(3600000))) == "timeout expired 0");
      auto me = *current_task();
      auto same_task = [me]() -> coroutine<void> {  // named: see outcome()
        CHECK(*current_task() == me);  // no extra task
        co_return;
      };
      auto scope = timeout(1h);
      co_await async_with(std::move(scope), same_task);
      co_await sleep(0s);  // no stray cancellation left behind
    }());
  }

  TEST_CASE("timeouts of zero or less, of duration::max(), and none") {
    testing::run_bounded([]() -> coroutine<void> {
      CHECK(co_await outcome(timeout(0s), nap(1ms)) == "timeout expired 0");
      CHECK(co_await outcome(timeout(-5s), nap(1ms)) == "timeout expired 0");
      CHECK(co_await outcome(timeout(0s), no_await()) == "done 0");  // never suspended: in time
      CHECK(co_await outcome(timeout(std::chrono::hours::max()), nap(2ms)) == "done 0");
      CHECK(co_await outcome(timeout(std::chrono::nanoseconds::max()), nap(2ms)) == "done 0");
      CHECK(co_await outcome(timeout(std::nullopt), nap(2ms)) == "done 0");
      CHECK(co_await outcome(timeout_at(event_loop::current().time() - 1s), nap(1ms)) == "timeout expired 0");
    }());
  }

  TEST_CASE("when(), reschedule() and misuse") {
    testing::run_bounded([]() -> coroutine<void> {
      auto scope = timeout(1h);
      CHECK(scope.when());
      CHECK_THROWS_AS(scope.reschedule(std::nullopt), std::runtime_error);  // not entered
      bool timed_out = false;
      try {
        co_await async_with(timeout(std::nullopt), [](timeout_scope& t) -> coroutine<void> {
          CHECK_FALSE(t.when());
          co_await sleep(1ms);
          t.reschedule(event_loop::current().time() + 1ms);  // now it has a deadline
          co_await sleep(1h);
        });
      } catch (const timeout_error&) {
        timed_out = true;
      }
      CHECK(timed_out);
      co_await async_with(timeout(1ms), [](timeout_scope& t) -> coroutine<void> {
        t.reschedule(std::nullopt);  // no deadline after all
        co_await sleep(3ms);
        CHECK_FALSE(t.expired());
      });
      timeout_scope* kept = nullptr;
      auto left = timeout(1h);
      co_await async_with(left, [&](timeout_scope& t) { kept = &t; });
      CHECK_THROWS_AS(kept->reschedule(std::nullopt), std::runtime_error);  // left already
      CHECK_THROWS_AS(co_await async_with(left, [] {}), std::runtime_error);  // entered twice
    }());
    CHECK_THROWS_AS(timeout(1s).aenter(), std::runtime_error);  // outside a task
  }

  TEST_CASE("moving an entered scope throws std::logic_error; before entering it is fine") {
    testing::run_bounded([]() -> coroutine<void> {
      auto made = timeout(1h);
      timeout_scope moved(std::move(made));  // not entered yet: allowed
      std::string message;
      auto body = [&](timeout_scope& t) -> coroutine<void> {
        try {
          timeout_scope stolen(std::move(t));
        } catch (const std::logic_error& e) {
          message = e.what();
        }
        co_await sleep(1ms);
        CHECK_FALSE(t.expired());  // the scope still works
      };
      co_await async_with(moved, body);
      CHECK(message == "timeout: cannot be moved once entered");
    }());
  }

  TEST_CASE("nested scopes: the one whose deadline passed reports it") {
    testing::run_bounded([]() -> coroutine<void> {
      // Outer deadline first: the inner scope lets the cancellation through, the outer converts it.
      std::string inner_saw;
      auto inner_body = [&]() -> coroutine<void> {
        try {
          co_await async_with(timeout(1h), [] { return sleep(1h); });
        } catch (const cancelled_error&) {
          inner_saw = "cancelled";
          throw;
        }
      };
      CHECK(co_await outcome(timeout(1ms), inner_body()) == "timeout expired 0");
      CHECK(inner_saw == "cancelled");
      // Inner deadline first: its timeout_error passes the outer scope unchanged.
      auto inner_first = []() -> coroutine<void> { co_await async_with(timeout(1ms), [] { return sleep(1h); }); };
      CHECK(co_await outcome(timeout(1h), inner_first()) == "timeout 0");
    }());
  }

  TEST_CASE("an outside cancellation passes through as cancelled_error, even past the deadline") {
    testing::run_bounded([]() -> coroutine<void> {
      auto t = create_task(outcome(timeout(1h), nap(std::chrono::milliseconds(3600000))));
      co_await sleep(1ms);
      t.cancel();
      CHECK(co_await t == "cancelled 1");
      // The outside cancel() and the deadline both land before the body sees either.
      auto both = create_task([]() -> coroutine<std::string> {
        co_return co_await outcome(timeout(0s), nap(1ms));
      }());
      both.cancel();  // before it starts: the first await in the scope takes both
      CHECK_THROWS_AS(co_await both, cancelled_error);
      // A cancelled parent: the scope inside it sees cancelled_error, not a timeout.
      auto parent = create_task([]() -> coroutine<std::string> {
        co_await sleep(1ms);
        co_return co_await outcome(timeout(1ms), nap(std::chrono::milliseconds(3600000)));
      }());
      co_await sleep(0s);
      parent.cancel();
      CHECK_THROWS_AS(co_await parent, cancelled_error);
    }());
  }
}
#endif
