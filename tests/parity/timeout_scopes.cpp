// asyncio.timeout: a zero timeout expires at the first await; expired() before and after;
// reschedule() to later, to never, and to the past; nested scopes (inner deadline first, outer
// deadline first); an outside cancellation inside a scope stays a CancelledError.
#include "parity.hpp"

int main() {
  run([]() -> coroutine<void> {
    event_loop& loop = event_loop::current();
    timeout_scope* cm = nullptr;  // the scope of the last block, as Python's `as cm` outlives it
    auto zero = [&](timeout_scope& t) -> coroutine<void> {
      cm = &t;
      say("zero: body runs, expired " + py(t.expired()));
      co_await sleep(0s);
      say("not reached");
    };
    auto zero_scope = timeout(0s);
    try {
      co_await async_with(zero_scope, zero);
    } catch (const timeout_error&) {
      say("zero: TimeoutError, expired " + py(cm->expired()));
    }
    auto no_await = [&](timeout_scope& t) { say("zero without an await: expired " + py(t.expired())); };
    auto zero_again = timeout(0s);
    co_await async_with(zero_again, no_await);
    say("zero without an await: no error, expired " + py(zero_again.expired()));

    auto never = [&](timeout_scope& t) -> coroutine<void> {
      say("none: when is None " + py(!t.when()));
      t.reschedule(loop.time() + 1ms);
      t.reschedule(std::nullopt);
      co_await sleep(10ms);
    };
    auto none_scope = timeout(std::nullopt);
    co_await async_with(none_scope, never);
    say("rescheduled to never: expired " + py(none_scope.expired()));
    auto past = [&](timeout_scope& t) -> coroutine<void> {
      t.reschedule(loop.time() - 1s);
      say("past: before the await");
      co_await sleep(0s);
      say("not reached");
    };
    auto past_scope = timeout(10s);
    try {
      co_await async_with(past_scope, past);
    } catch (const timeout_error&) {
      say("past: TimeoutError");
    }
    try {
      past_scope.reschedule(std::nullopt);
    } catch (const std::runtime_error&) {
      say("reschedule after exit: RuntimeError");
    }

    // Nested: the inner deadline first.
    auto outer1 = timeout(10s);
    auto inner1 = timeout(1ms);
    auto inner_body = [](timeout_scope&) -> coroutine<void> { co_await sleep(10s); };
    auto outer1_body = [&](timeout_scope&) -> coroutine<void> {
      try {
        co_await async_with(inner1, inner_body);
      } catch (const timeout_error&) {
        say("inner first: inner TimeoutError, inner expired " + py(inner1.expired()) + " outer expired " + py(outer1.expired()));
      }
      co_await sleep(0s);
    };
    try {
      co_await async_with(outer1, outer1_body);
      say("inner first: outer scope left normally");
    } catch (const timeout_error&) {
      say("not reached");
    }
    // Nested: the outer deadline first; the inner scope sees a CancelledError.
    auto outer2 = timeout(1ms);
    auto inner2 = timeout(10s);
    auto outer2_body = [&](timeout_scope&) -> coroutine<void> {
      try {
        co_await async_with(inner2, inner_body);
      } catch (const cancelled_error&) {
        say("outer first: inner sees CancelledError, inner expired " + py(inner2.expired()));
        throw;
      }
    };
    try {
      co_await async_with(outer2, outer2_body);
    } catch (const timeout_error&) {
      say("outer first: outer TimeoutError, outer expired " + py(outer2.expired()));
    }

    // An outside cancel() while in a scope that has not expired.
    auto guarded = []() -> coroutine<void> {
      auto body = [](timeout_scope&) -> coroutine<void> { co_await sleep(10s); };
      co_await async_with(timeout(10s), body);
    };
    auto t = create_task(guarded());
    co_await sleep(0s);
    t.cancel();
    try {
      co_await t;
    } catch (const cancelled_error&) {
      say("outside cancel: CancelledError");
    }
    say("cancelling: " + std::to_string(current_task()->cancelling()));
  }());
  return 0;
}
