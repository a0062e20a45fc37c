// A producer and two consumers on a bounded queue: the exact interleaving of puts, gets and
// waits, step by step.
#include "parity.hpp"

#include <optional>

coroutine<void> producer(queue<std::optional<int>>& q, int n) {
  for (int i = 0; i < n; ++i) {
    say("put " + std::to_string(i) + " (qsize " + std::to_string(q.qsize()) + ", full " + py(q.full()) + ")");
    co_await q.put(i);
    say("put " + std::to_string(i) + " done");
  }
  for (int i = 0; i < 2; ++i) co_await q.put(std::nullopt);
  say("producer done");
}

coroutine<void> consumer(queue<std::optional<int>>& q, std::string name) {
  for (;;) {
    std::optional<int> item = co_await q.get();
    if (!item) {
      say(name + " stops");
      co_return;
    }
    say(name + " got " + std::to_string(*item));
    co_await sleep(0s);
  }
}

int main() {
  run([]() -> coroutine<void> {
    queue<std::optional<int>> q(2);
    co_await gather(producer(q, 7), consumer(q, "c1"), consumer(q, "c2"));
    say("empty: " + py(q.empty()));
  }());
  return 0;
}
