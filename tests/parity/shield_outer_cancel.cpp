// shield(): cancelling the task that awaits a shielded task cancels only the awaiting task; the
// inner task runs on and keeps its result.
#include "parity.hpp"

coroutine<int> inner() {
  say("inner starts");
  for (int i = 0; i < 3; ++i) co_await sleep(0s);
  say("inner finishes");
  co_return 5;
}

template <class A>
coroutine<int> outer(A aw) {
  try {
    co_return co_await shield(std::move(aw));
  } catch (const cancelled_error&) {
    say("outer: CancelledError");
    throw;
  }
}

int main() {
  run([]() -> coroutine<void> {
    auto t = create_task(inner());
    auto o = create_task(outer(t));
    co_await sleep(0s);
    say("cancel outer: " + py(o.cancel()));
    try {
      co_await o;
    } catch (const cancelled_error&) {
      say("main: outer task cancelled");
    }
    say("inner cancelled: " + py(t.cancelled()) + " done: " + py(t.done()));
    say("inner result: " + std::to_string(co_await t));
    // A shielded coroutine becomes a task of its own and also survives.
    auto o2 = create_task(outer(inner()));
    co_await sleep(0s);
    o2.cancel();
    try {
      co_await o2;
    } catch (const cancelled_error&) {
      say("main: second outer task cancelled");
    }
    for (int i = 0; i < 5; ++i) co_await sleep(0s);
  }());
  return 0;
}
