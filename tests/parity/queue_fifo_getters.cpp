// Getters waiting on an empty queue receive items in arrival order; a cancelled getter takes
// nothing, its item goes to the next getter.
#include "parity.hpp"

coroutine<void> getter(queue<int>& q, std::string name) {
  say(name + " waits");
  try {
    int item = co_await q.get();
    say(name + " got " + std::to_string(item));
  } catch (const cancelled_error&) {
    say(name + " cancelled");
  }
}

int main() {
  run([]() -> coroutine<void> {
    queue<int> q;
    std::vector<task<void>> tasks;
    for (std::string n : {"a", "b", "c", "d"}) tasks.push_back(create_task(getter(q, n)));
    co_await sleep(0s);
    tasks[2].cancel();
    for (int i = 0; i < 3; ++i) {
      q.put_nowait(i);
      say("put " + std::to_string(i));
    }
    for (auto& t : tasks) co_await t;
    say("left: " + std::to_string(q.qsize()));
  }());
  return 0;
}
