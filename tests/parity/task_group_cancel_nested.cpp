// TaskGroup: an outside cancellation of the body cancels the children, waits for their cleanup,
// and leaves as CancelledError; a nested group's failure reaches the outer group as one more
// error (a group inside the group), and the outer group cancels its own children.
#include "parity.hpp"

coroutine<void> stubborn(std::string name, int cleanup_steps) {
  try {
    co_await sleep(10s);
    co_return;
  } catch (const cancelled_error&) {
    say(name + " cancelled, cleaning up");
  }
  // (C++ cannot co_await inside a catch block: the cleanup runs after it, then rethrows.)
  for (int i = 0; i < cleanup_steps; ++i) co_await sleep(0s);
  say(name + " cleanup done");
  throw cancelled_error();
}

coroutine<void> fail_after(std::string name, int steps) {
  for (int i = 0; i < steps; ++i) co_await sleep(0s);
  say(name + " raises");
  throw std::invalid_argument(name);
}

void describe(const exception_group& g, int depth) {
  const std::string indent(static_cast<std::size_t>(2 * depth), ' ');
  for (const auto& e : g.exceptions()) {
    try {
      std::rethrow_exception(e);
    } catch (const exception_group& inner) {
      say(indent + "group of " + std::to_string(inner.exceptions().size()));
      describe(inner, depth + 1);
    } catch (const std::invalid_argument& x) {
      say(indent + "ValueError(" + x.what() + ")");
    }
  }
}

coroutine<void> outside_body(task_group& tg) {
  tg.create_task(stubborn("x", 2));
  tg.create_task(stubborn("y", 0));
  try {
    co_await sleep(10s);
  } catch (const cancelled_error&) {
    say("body cancelled");
    throw;
  }
}

coroutine<void> outside() {
  co_await async_with(task_group{}, outside_body);
  say("not reached");
}

coroutine<void> inner_body(task_group& inner) {
  inner.create_task(stubborn("inner child", 1));
  inner.create_task(fail_after("inner failing", 2));
  co_await sleep(10s);
}

coroutine<void> outer_body(task_group& outer) {
  outer.create_task(stubborn("outer child", 1));
  co_await async_with(task_group{}, inner_body);
  say("not reached");
}

coroutine<void> nested() { co_await async_with(task_group{}, outer_body); }

int main() {
  run([]() -> coroutine<void> {
    auto t = create_task(outside());
    co_await sleep(0s);
    co_await sleep(0s);
    say("cancelling the task");
    t.cancel();
    try {
      co_await t;
    } catch (const cancelled_error&) {
      say("outside: CancelledError");
    }
    say("task cancelled: " + py(t.cancelled()));
    try {
      co_await nested();
    } catch (const exception_group& g) {
      say("nested: group of " + std::to_string(g.exceptions().size()));
      describe(g, 1);
    }
    say("cancelling: " + std::to_string(current_task()->cancelling()));
  }());
  return 0;
}
