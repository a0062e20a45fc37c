// Cancelling what gather() returned cancels every child that is still running; awaiting it
// raises CancelledError; finished children keep their results.
// For now gather is wrapped in create_task (gather returns a lazy coroutine until the core
// change that makes it start its children at once and return a task).
#include "parity.hpp"

coroutine<std::string> child(std::string name, int steps) {
  say(name + " starts");
  try {
    for (int i = 0; i < steps; ++i) co_await sleep(0s);
  } catch (const cancelled_error&) {
    say(name + " cancelled");
    throw;
  }
  say(name + " finishes");
  co_return name;
}

int main() {
  run([]() -> coroutine<void> {
    auto quick = create_task(child("quick", 0));
    auto slow = create_task(child("slow", 100));
    auto g = create_task(gather(quick, slow, child("coro", 100)));
    co_await sleep(0s);
    co_await sleep(0s);
    say("cancel gather: " + py(g.cancel()));
    try {
      co_await g;
    } catch (const cancelled_error&) {
      say("gather: CancelledError");
    }
    say("quick: " + quick.result() + " slow cancelled: " + py(slow.cancelled()));
  }());
  return 0;
}
