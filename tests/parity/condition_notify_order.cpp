// notify(n) wakes the n longest-waiting tasks; each re-acquires the lock in turn; notify_all
// wakes the rest in order.
#include "parity.hpp"

coroutine<void> waiter(condition& cond, std::string name) {
  auto guard = co_await cond.scoped();
  say(name + " waits");
  co_await cond.wait();
  say(name + " woken, holds the lock: " + py(cond.locked()));
}

int main() {
  run([]() -> coroutine<void> {
    condition cond;
    std::vector<task<void>> tasks;
    for (std::string n : {"a", "b", "c", "d", "e"}) tasks.push_back(create_task(waiter(cond, n)));
    co_await sleep(0s);
    {
      auto guard = co_await cond.scoped();
      say("notify(1)");
      cond.notify(1);
    }
    co_await sleep(0s);
    co_await sleep(0s);
    {
      auto guard = co_await cond.scoped();
      say("notify(2)");
      cond.notify(2);
    }
    co_await sleep(0s);
    co_await sleep(0s);
    {
      auto guard = co_await cond.scoped();
      say("notify_all");
      cond.notify_all();
    }
    for (auto& t : tasks) co_await t;
    say("done; locked: " + py(cond.locked()));
  }());
  return 0;
}
