// TaskGroup: the first failing child cancels its siblings and the body; the children that fail
// in the same step are all collected, in the order they failed; a child done before stays done.
#include "parity.hpp"

#include <vector>

coroutine<std::string> child(std::string name, int steps, bool fail = false) {
  try {
    for (int i = 0; i < steps; ++i) co_await sleep(0s);
  } catch (const cancelled_error&) {
    say(name + " cancelled");
    throw;
  }
  if (fail) {
    say(name + " raises");
    throw std::invalid_argument(name);
  }
  say(name + " finishes");
  co_return name;
}

// The group's members as the Python side prints them: ['b', 'c'].
std::string members(const exception_group& g) {
  std::string out = "group of " + std::to_string(g.exceptions().size()) + " [";
  const char* sep = "";
  for (const auto& e : g.exceptions()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      out += sep + std::string("'") + x.what() + "'";
    }
    sep = ", ";
  }
  return out + "]";
}

int main() {
  run([]() -> coroutine<void> {
    task<std::string> a, d, e;
    auto first = [&](task_group& tg) -> coroutine<void> {
      a = tg.create_task(child("a", 5));
      tg.create_task(child("b", 2, true));
      tg.create_task(child("c", 2, true));
      d = tg.create_task(child("d", 0));
      try {
        for (int i = 0; i < 10; ++i) {
          co_await sleep(0s);
          say("body step " + std::to_string(i));
        }
      } catch (const cancelled_error&) {
        say("body cancelled");
        throw;
      }
    };
    try {
      co_await async_with(task_group{}, first);
    } catch (const exception_group& g) {
      say(members(g));
    }
    say("a cancelled: " + py(a.cancelled()) + " d: " + d.result());
    say("cancelling: " + std::to_string(current_task()->cancelling()));
    // The body fails: the children are cancelled, the body's error joins the group.
    auto body_fails = [&](task_group& tg) -> coroutine<void> {
      e = tg.create_task(child("e", 5));
      co_await sleep(0s);
      say("body raises");
      throw std::invalid_argument("body");
    };
    try {
      co_await async_with(task_group{}, body_fails);
    } catch (const exception_group& g) {
      say(members(g));
    }
    say("e cancelled: " + py(e.cancelled()));
    // create_task once the group is shutting down, and after it is done.
    task_group tg;
    auto shutting_down = [&](task_group& g) -> coroutine<void> {
      g.create_task(child("f", 0, true));
      try {
        co_await sleep(0s);
        co_await sleep(0s);
      } catch (const cancelled_error&) {
        try {
          g.create_task(child("g", 0));
        } catch (const std::runtime_error&) {
          say("create_task while shutting down: RuntimeError");
        }
        throw;
      }
    };
    try {
      co_await async_with(tg, shutting_down);
    } catch (const exception_group& g) {
      say(members(g));
    }
    try {
      tg.create_task(child("h", 0));
    } catch (const std::runtime_error&) {
      say("create_task after exit: RuntimeError");
    }
  }());
  return 0;
}
