// Waiters get a held lock in arrival order; a waiter cancelled in the queue is skipped and the
// lock goes to the next one.
#include "parity.hpp"

coroutine<void> user(lock& lk, std::string name) {
  say(name + " waits");
  try {
    auto guard = co_await lk.scoped();
    say(name + " holds the lock");
    co_await sleep(0s);
    say(name + " releases");
  } catch (const cancelled_error&) {
    say(name + " cancelled while waiting; locked=" + py(lk.locked()));
  }
}

int main() {
  run([]() -> coroutine<void> {
    lock lk;
    co_await lk.acquire();
    std::vector<task<void>> tasks;
    for (std::string n : {"a", "b", "c", "d"}) tasks.push_back(create_task(user(lk, n)));
    co_await sleep(0s);
    tasks[1].cancel();
    co_await sleep(0s);
    say("main releases");
    lk.release();
    for (auto& t : tasks) co_await wait_done(t);
    say("locked at end: " + py(lk.locked()));
  }());
  return 0;
}
