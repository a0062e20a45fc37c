// A semaphore hands released units to waiters in arrival order; a newcomer does not overtake
// a waiter that was already woken.
#include "parity.hpp"

coroutine<void> user(semaphore& sem, std::string name, int hold) {
  say(name + " waits");
  auto guard = co_await sem.scoped();
  say(name + " acquired");
  for (int i = 0; i < hold; ++i) co_await sleep(0s);
  say(name + " releases");
}

int main() {
  run([]() -> coroutine<void> {
    semaphore sem(2);
    std::vector<task<void>> tasks;
    const std::pair<const char*, int> users[] = {{"a", 2}, {"b", 1}, {"c", 0}, {"d", 1}, {"e", 0}};
    for (auto [n, h] : users) tasks.push_back(create_task(user(sem, n, h)));
    co_await sleep(0s);
    say("locked: " + py(sem.locked()));
    for (auto& t : tasks) co_await t;
    say("locked at end: " + py(sem.locked()));
  }());
  return 0;
}
