// wait_for: the awaitable is cancelled on timeout, its cancellation lands (cleanup runs) before
// TimeoutError reaches the caller; a result in time is returned; a zero timeout on an unfinished
// task times out; an inner that swallows the cancellation has its value returned (3.12 rule).
#include "parity.hpp"

coroutine<std::string> slow(std::string name, int cleanup_steps = 1) {
  try {
    co_await sleep(10s);
  } catch (const cancelled_error&) {
    say(name + ": cancelled, cleaning up");
  }
  // (C++ cannot co_await inside a catch block: the cleanup runs after it, then rethrows.)
  for (int i = 0; i < cleanup_steps; ++i) co_await sleep(0s);
  say(name + ": cleanup done");
  throw cancelled_error("");
}

coroutine<std::string> quick() {
  co_await sleep(0s);
  co_return "quick result";
}

int main() {
  run([]() -> coroutine<void> {
    say(co_await wait_for(quick(), 1s));
    try {
      co_await wait_for(slow("inner", 2), 10ms);
    } catch (const timeout_error&) {
      say("caller: TimeoutError");
    }
    auto t = create_task(slow("task"));
    co_await sleep(0s);
    try {
      co_await wait_for(t, 0s);
    } catch (const timeout_error&) {
      say("caller: TimeoutError at zero timeout; task cancelled: " + py(t.cancelled()));
    }
  }());
  return 0;
}
