// One loop iteration runs the jobs that were ready before it, then the callbacks of the timers
// that came due: a deadline that passed while a task was blocking does not overtake jobs already
// queued. A task woken by a timer resumes after them; a call_later callback runs in the same
// iteration as the timer, after the ready jobs; wait_for's inner task takes its first step
// before a deadline that is already due cancels it.
#include "parity.hpp"

#include <thread>

namespace {

coroutine<void> sleeper() {
  co_await sleep(1ms);
  say("sleeper woke");
}

coroutine<void> step_a() {
  say("task a step");
  co_return;
}

coroutine<void> inner() {
  say("inner started");
  co_await sleep(10s);
  say("not reached");
}

}  // namespace

int main() {
  run([]() -> coroutine<void> {
    event_loop& loop = event_loop::current();
    auto s = create_task(sleeper());
    co_await sleep(0s);  // the sleeper's timer is armed
    loop.call_later(1ms, [] { say("call_later"); });
    std::this_thread::sleep_for(20ms);  // both deadlines pass while this step blocks
    loop.call_soon([] { say("soon 1"); });
    auto a = create_task(step_a());
    loop.call_soon([] { say("soon 2"); });
    co_await sleep(0s);
    say("main after its yield");
    co_await s;
    co_await a;

    auto t = create_task(wait_for(inner(), 1ms));
    co_await sleep(0s);  // wait_for creates the inner task and arms its deadline
    std::this_thread::sleep_for(20ms);  // the deadline passes before the inner task's first step
    try {
      co_await t;
    } catch (const timeout_error&) {
      say("wait_for: TimeoutError");
    }
  }());
  return 0;
}
