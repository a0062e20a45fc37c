// wait_for, cancelled from outside first; its deadline passes while the inner task is still
// handling that cancellation: the caller ends with CancelledError, never TimeoutError.
// The outcome is printed once both tasks are done (see the .py for why).
#include "parity.hpp"

coroutine<void> slow(event& started) {
  try {
    co_await sleep(10s);
    co_return;
  } catch (const cancelled_error&) {
    say("inner: cancelled");
    started.set();
  }
  event_loop& loop = event_loop::current();
  const auto end = loop.time() + 150ms;
  while (loop.time() < end) {  // a cleanup that ignores more cancels
    try {
      co_await sleep(end - loop.time());
    } catch (const cancelled_error&) {
    }
  }
  say("inner: cleanup done");
  throw cancelled_error("");
}

coroutine<std::string> outer(task<void> inner, std::chrono::milliseconds timeout) {
  try {
    co_await wait_for(inner, timeout);
    co_return "returned";
  } catch (const timeout_error&) {
    co_return "TimeoutError";
  } catch (const cancelled_error&) {
    co_return "CancelledError";
  }
}

int main() {
  run([]() -> coroutine<void> {
    event started;
    auto inner = create_task(slow(started));
    auto t = create_task(outer(inner, 50ms));
    co_await sleep(0s);
    co_await sleep(0s);
    say("outside cancel");
    t.cancel();
    std::string result = co_await t;
    co_await wait_done(inner);
    say("caller: " + result);
    say("inner cancelled: " + py(inner.cancelled()));
  }());
  return 0;
}
