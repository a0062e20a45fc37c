// A task cancelled before it starts never runs its body; it ends cancelled; cancelling() counts.
#include "parity.hpp"

coroutine<void> body() {
  say("body runs (must not happen)");
  co_return;
}

int main() {
  run([]() -> coroutine<void> {
    auto t = create_task(body());
    say("cancel: " + py(t.cancel()));
    say("cancelling: " + std::to_string(t.cancelling()));
    try {
      co_await t;
    } catch (const cancelled_error&) {
      say("awaiting it: CancelledError");
    }
    say("cancelled: " + py(t.cancelled()) + " done: " + py(t.done()));
    say("cancel again: " + py(t.cancel()));
  }());
  return 0;
}
