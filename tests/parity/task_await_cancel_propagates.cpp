// Cancelling a task that awaits another task (or a future) cancels the awaited one too; the
// message travels along.
#include "parity.hpp"

coroutine<void> leaf() {
  try {
    co_await sleep(10s);
  } catch (const cancelled_error& e) {
    say("leaf cancelled: '" + std::string(e.message()) + "'");
    throw;
  }
}

template <class A>
coroutine<void> middle(A aw) {
  try {
    co_await aw;
  } catch (const cancelled_error&) {
    say("middle cancelled");
    throw;
  }
}

int main() {
  run([]() -> coroutine<void> {
    event_loop& loop = event_loop::current();
    auto lt = create_task(leaf());
    auto mt = create_task(middle(lt));
    co_await sleep(0s);
    mt.cancel("from main");
    co_await wait_done(mt);
    say("middle cancelled: " + py(mt.cancelled()) + " leaf cancelled: " + py(lt.cancelled()));
    auto fut = loop.create_future<void>();
    auto ft = create_task(middle(fut));
    co_await sleep(0s);
    ft.cancel();
    co_await wait_done(ft);
    say("future cancelled: " + py(fut.cancelled()));
  }());
  return 0;
}
