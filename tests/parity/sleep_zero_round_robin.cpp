// Tasks start in creation order on the next iteration (never inline) and sleep(0) yields once:
// three tasks interleave round-robin.
#include "parity.hpp"

coroutine<void> worker(std::string name) {
  for (int i = 0; i < 3; ++i) {
    say(name + " step " + std::to_string(i));
    co_await sleep(0s);
  }
  say(name + " done");
}

int main() {
  run([]() -> coroutine<void> {
    std::vector<task<void>> tasks;
    for (std::string n : {"a", "b", "c"}) tasks.push_back(create_task(worker(n)));
    say("created");
    co_await sleep(0s);
    say("main after one yield");
    for (auto& t : tasks) co_await t;
    say("all done");
  }());
  return 0;
}
