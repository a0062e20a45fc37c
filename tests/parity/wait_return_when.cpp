// asyncio.wait: FIRST_COMPLETED, FIRST_EXCEPTION and ALL_COMPLETED; a timeout (0, and one that
// passes) returns what is pending without cancelling it; the children's exceptions stay in them;
// an empty set is a ValueError; a cancelled caller leaves the children running.
#include "parity.hpp"

#include <algorithm>
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

// Python prints sorted lists of task names: ['a', 'b'].
std::string names(const std::vector<any_task>& tasks) {
  std::vector<std::string> n;
  for (const auto& t : tasks) n.push_back(t.name());
  std::sort(n.begin(), n.end());
  std::string out = "[";
  for (std::size_t i = 0; i < n.size(); ++i) out += (i ? ", '" : "'") + n[i] + "'";
  return out + "]";
}

int main() {
  run([]() -> coroutine<void> {
    auto a = create_task(child("a", 1), "a");
    auto b = create_task(child("b", 3, true), "b");
    auto c = create_task(child("c", 5), "c");
    auto d = create_task(sleep(10s), "d");
    std::vector<any_task> all{a, b, c, d};
    auto r = co_await wait(all, {.return_when = first_completed});
    say("first_completed: " + names(r.done) + " " + names(r.pending));
    r = co_await wait(all, {.return_when = first_exception});
    say("first_exception: " + names(r.done) + " " + names(r.pending));
    r = co_await wait(all, {.timeout = 0s});
    say("timeout 0: " + names(r.done) + " " + names(r.pending));
    std::vector<any_task> cd{c, d};
    r = co_await wait(cd, {.timeout = 20ms});
    say("all_completed with a timeout: " + names(r.done) + " " + names(r.pending) + " d cancelled: " + py(d.cancelled()));
    try {
      std::rethrow_exception(b.exception());
    } catch (const std::invalid_argument& e) {
      say(std::string("b's exception: ValueError('") + e.what() + "')");
    }
    std::vector<any_task> none;
    try {
      co_await wait(none);
    } catch (const std::invalid_argument&) {
      say("empty: ValueError");
    }

    std::vector<any_task> just_d{d};
    auto waiter = create_task(wait(just_d));
    co_await sleep(0s);
    waiter.cancel();
    try {
      co_await waiter;
    } catch (const cancelled_error&) {
      say("cancelled caller: CancelledError; d done: " + py(d.done()));
    }
    d.cancel();
    r = co_await wait(just_d);
    say("all_completed: " + names(r.done) + " " + names(r.pending) + " d cancelled: " + py(d.cancelled()));
  }());
  return 0;
}
