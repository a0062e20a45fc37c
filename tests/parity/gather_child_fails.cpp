// gather without return_exceptions: the first failure propagates at once; the other children
// are not cancelled and run to their end.
#include "parity.hpp"

coroutine<std::string> child(std::string name, int steps, bool fail = false) {
  try {
    for (int i = 0; i < steps; ++i) co_await sleep(0s);
  } catch (const cancelled_error&) {
    say(name + " cancelled");
    throw;
  }
  if (fail) {
    say(name + " raises");
    throw std::invalid_argument(name);
  }
  say(name + " finishes");
  co_return name;
}

int main() {
  run([]() -> coroutine<void> {
    auto a = create_task(child("a", 3));
    auto b = create_task(child("b", 1, true));
    try {
      co_await gather(a, b, child("c", 4));
    } catch (const std::invalid_argument& e) {
      say(std::string("gather raised ValueError(") + e.what() + ")");
    }
    say("a done: " + py(a.done()) + " b done: " + py(b.done()));
    for (int i = 0; i < 6; ++i) co_await sleep(0s);
    say("a: " + a.result() + " cancelled: " + py(a.cancelled()));
  }());
  return 0;
}
