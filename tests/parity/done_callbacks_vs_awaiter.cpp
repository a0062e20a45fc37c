// A coroutine awaiting a future or task is woken by a done callback registered when it began to
// wait: callbacks added before the await run before it resumes, callbacks added later after it.
#include "parity.hpp"

template <class F>
coroutine<void> awaiter(F aw, std::string name) {
  say(name + " waits");
  int v = co_await aw;
  say(name + " resumed with " + std::to_string(v));
}

coroutine<int> work() {
  co_await sleep(0s);
  say("work returns");
  co_return 8;
}

int main() {
  run([]() -> coroutine<void> {
    event_loop& loop = event_loop::current();
    auto fut = loop.create_future<int>();
    fut.add_done_callback([](future<int>) { say("future callback 1 (added before the await)"); });
    auto t = create_task(awaiter(fut, "future awaiter"));
    co_await sleep(0s);
    fut.add_done_callback([](future<int>) { say("future callback 2 (added after the await began)"); });
    fut.set_result(7);
    say("set_result returned");
    co_await t;

    auto w = create_task(work());
    w.add_done_callback([](future<int>) { say("task callback 1 (added before the await)"); });
    t = create_task(awaiter(w, "task awaiter"));
    co_await sleep(0s);
    w.add_done_callback([](future<int>) { say("task callback 2 (added after the await began)"); });
    co_await t;
    say("done");
  }());
  return 0;
}
