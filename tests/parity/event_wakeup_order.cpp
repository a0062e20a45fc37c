// event.set() wakes every waiter in the order they began to wait; waiters arriving after set()
// pass at once; clear() makes new waiters wait again.
#include "parity.hpp"

coroutine<void> waiter(event& ev, std::string name) {
  say(name + " waits");
  co_await ev.wait();
  say(name + " woken");
}

int main() {
  run([]() -> coroutine<void> {
    event ev;
    std::vector<task<void>> tasks;
    for (std::string n : {"a", "b", "c"}) tasks.push_back(create_task(waiter(ev, n)));
    co_await sleep(0s);
    say("set");
    ev.set();
    tasks.push_back(create_task(waiter(ev, "late")));
    for (auto& t : tasks) co_await t;
    ev.clear();
    auto again = create_task(waiter(ev, "after clear"));
    co_await sleep(0s);
    say("is_set: " + py(ev.is_set()) + " waiting: " + py(!again.done()));
    ev.set();
    co_await again;
  }());
  return 0;
}
