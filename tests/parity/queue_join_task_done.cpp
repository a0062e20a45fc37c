// join() waits until task_done() was called once per item put; every joiner wakes, in the
// order they began to wait; task_done() once too often raises ValueError.
#include "parity.hpp"

coroutine<void> worker(queue<int>& q, std::string name) {
  for (;;) {
    int item = co_await q.get();
    say(name + " got " + std::to_string(item));
    co_await sleep(0s);
    say(name + " done with " + std::to_string(item));
    q.task_done();
  }
}

coroutine<void> joiner(queue<int>& q, std::string name) {
  co_await q.join();
  say(name + ": join returned");
}

int main() {
  run([]() -> coroutine<void> {
    queue<int> q;
    for (int i = 0; i < 5; ++i) q.put_nowait(i);
    std::vector<task<void>> workers, joiners;
    for (std::string n : {"w1", "w2"}) workers.push_back(create_task(worker(q, n)));
    for (std::string n : {"j1", "j2"}) joiners.push_back(create_task(joiner(q, n)));
    co_await q.join();
    say("main: join returned");
    for (auto& j : joiners) co_await j;
    try {
      q.task_done();
    } catch (const std::invalid_argument&) {
      say("task_done once too often: ValueError");
    }
    for (auto& w : workers) w.cancel();
    for (auto& w : workers) co_await wait_done(w);
    // join() under wait_for: wrapped in a coroutine until the primitives' awaitables compose.
    co_await wait_for([](queue<int>& q) -> coroutine<void> { co_await q.join(); }(q), 1s);
    say("join on an idle queue: None");
  }());
  return 0;
}
