// cancelling() counts requests; two cancels before the task runs deliver one CancelledError;
// a task that catches it and uncancel()s can go on and await again; a later cancel is delivered.
#include "parity.hpp"

coroutine<std::string> stubborn() {
  auto me = *current_task();
  for (int round = 0; round < 2; ++round) {
    try {
      co_await sleep(10s);
    } catch (const cancelled_error&) {
      say("round " + std::to_string(round) + ": caught, cancelling=" + std::to_string(me.cancelling()));
      while (me.uncancel() > 0) {
      }
      say("round " + std::to_string(round) + ": after uncancel, cancelling=" + std::to_string(me.cancelling()));
    }
  }
  co_return "finished";
}

int main() {
  run([]() -> coroutine<void> {
    auto t = create_task(stubborn());
    co_await sleep(0s);
    t.cancel();
    t.cancel();
    say("after two cancels: " + std::to_string(t.cancelling()));
    co_await sleep(0s);
    co_await sleep(0s);
    t.cancel();
    say("third cancel: " + std::to_string(t.cancelling()));
    say("result: " + co_await t);
    say("cancelled: " + py(t.cancelled()));
  }());
  return 0;
}
