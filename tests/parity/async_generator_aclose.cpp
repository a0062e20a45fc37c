// aclose(): a generator suspended at a yield gets GeneratorExit there and runs its finally block,
// awaits included (C++: catch generator_exit, await after the handler, rethrow); an unstarted
// one is closed without running; a finished one is left alone; one that yields again makes
// aclose() raise RuntimeError and stays suspended.
#include "parity.hpp"

async_generator<int> gen(std::string name) {
  std::exception_ptr ended;  // try/finally: the awaits of the cleanup come after the handler
  try {
    for (int i = 0; i < 10; ++i) co_yield i;
  } catch (...) {
    ended = std::current_exception();
  }
  say(name + " finally: cleanup starts");
  co_await sleep(0s);
  say(name + " finally: cleanup done");
  if (ended) std::rethrow_exception(ended);
}

coroutine<void> other() {
  for (int i = 0; i < 3; ++i) {
    say("other " + std::to_string(i));
    co_await sleep(0s);
  }
}

async_generator<int> stubborn() {
  try {
    co_yield 1;
  } catch (const generator_exit&) {
    say("stubborn: ignores GeneratorExit");
  }
  co_yield 2;
  say("stubborn: end");
}

coroutine<void> next_or_stop(async_generator<int>& g, std::string label) {
  if (auto v = co_await g.next()) say(label + " " + std::to_string(*v));
  else say(label + " StopAsyncIteration");
}

int main() {
  run([]() -> coroutine<void> {
    auto t = create_task(other());
    auto g1 = gen("g1");
    co_await next_or_stop(g1, "g1 next:");
    co_await next_or_stop(g1, "g1 next:");
    say("g1 aclose");
    co_await g1.aclose();
    say("g1 closed");
    co_await next_or_stop(g1, "g1 next:");
    co_await g1.aclose();
    say("g1 closed again");

    auto g2 = gen("g2");
    co_await g2.aclose();
    say("g2 (unstarted) closed");
    co_await next_or_stop(g2, "g2 next:");

    auto g3 = gen("g3");
    while (auto v = co_await g3.next()) {
      if (*v == 1) break;
    }
    say("g3 left the loop at 1");
    co_await g3.aclose();
    say("g3 closed");

    auto s = stubborn();
    co_await next_or_stop(s, "stubborn next:");
    try {
      co_await s.aclose();
    } catch (const std::runtime_error&) {
      say("stubborn aclose: RuntimeError");
    }
    co_await next_or_stop(s, "stubborn next:");
    co_await t;
  }());
  return 0;
}
