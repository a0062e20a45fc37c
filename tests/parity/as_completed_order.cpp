// asyncio.as_completed: results in completion order (a failing child's element raises, the rest
// go on); with a timeout, the elements for children not done raise TimeoutError and the
// children are not cancelled.
#include "parity.hpp"

#include <vector>

coroutine<std::string> child(std::string name, int steps, bool fail = false) {
  for (int i = 0; i < steps; ++i) co_await sleep(0s);
  if (fail) {
    say(name + " raises");
    throw std::invalid_argument(name);
  }
  say(name + " finishes");
  co_return name;
}

int main() {
  run([]() -> coroutine<void> {
    std::vector<task<std::string>> tasks;
    tasks.push_back(create_task(child("a", 4)));
    tasks.push_back(create_task(child("b", 1)));
    tasks.push_back(create_task(child("c", 2, true)));
    tasks.push_back(create_task(child("d", 3)));
    for (auto next : as_completed(tasks)) {
      try {
        say("got " + co_await next);
      } catch (const std::invalid_argument& e) {
        say(std::string("got ValueError(") + e.what() + ")");
      }
    }
    auto slow = create_task(sleep(10s, std::string("slow")));
    auto quick = create_task(child("quick", 1));
    std::vector<task<std::string>> pair{slow, quick};
    for (auto next : as_completed(pair, 20ms)) {
      try {
        say("got " + co_await next);
      } catch (const timeout_error&) {
        say("got TimeoutError; slow cancelled: " + py(slow.cancelled()));
      }
    }
    say("slow done: " + py(slow.done()));
    for (auto next : as_completed(std::vector<task<std::string>>(1, slow), 0s)) {
      try {
        say("got " + co_await next);
      } catch (const timeout_error&) {
        say("timeout 0: TimeoutError");
      }
    }
    slow.cancel();
    int count = 0;
    for (auto next : as_completed(std::vector<task<std::string>>())) {
      (void)next;
      ++count;
    }
    say("empty: " + std::to_string(count) + " elements");
  }());
  return 0;
}
