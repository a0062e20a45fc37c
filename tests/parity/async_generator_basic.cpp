// Async generators: yields interleaved with awaits (here sleep(0), which lets another task run),
// `async for` to the end, then anext() at the end: StopAsyncIteration (C++: std::nullopt).
#include "parity.hpp"

async_generator<int> numbers(int n) {
  for (int i = 0; i < n; ++i) {
    say("gen: before sleep " + std::to_string(i));
    co_await sleep(0s);
    say("gen: yield " + std::to_string(i));
    co_yield i;
  }
  say("gen: end");
}

coroutine<void> other() {
  for (int i = 0; i < 4; ++i) {
    say("other " + std::to_string(i));
    co_await sleep(0s);
  }
}

int main() {
  run([]() -> coroutine<void> {
    auto t = create_task(other());
    auto g = numbers(3);
    while (auto v = co_await g.next()) say("main got " + std::to_string(*v));
    for (int i = 0; i < 2; ++i) {
      if (!co_await g.next()) say("main: StopAsyncIteration");
    }
    // A generator that ends before its first yield.
    auto empty = numbers(0);
    while (auto v = co_await empty.next()) say("never " + std::to_string(*v));
    say("empty generator done");
    co_await t;
  }());
  return 0;
}
