// The message given to cancel() reaches the CancelledError inside the task and the awaiter.
#include "parity.hpp"

coroutine<void> sleeper() {
  try {
    co_await sleep(10s);
  } catch (const cancelled_error& e) {
    say("inside: '" + std::string(e.message()) + "'");
    throw;
  }
}

int main() {
  run([]() -> coroutine<void> {
    auto t = create_task(sleeper());
    co_await sleep(0s);
    t.cancel("stop now");
    try {
      co_await t;
    } catch (const cancelled_error& e) {
      say("awaiter: '" + std::string(e.message()) + "'");
    }
    say("cancelled: " + py(t.cancelled()));
  }());
  return 0;
}
