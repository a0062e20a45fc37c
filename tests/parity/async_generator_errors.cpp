// Exceptions and cancellation travel through anext(): a generator that raises hands the exception
// to the consumer and is finished afterwards (StopAsyncIteration); cancelling the consumer while
// the generator sleeps raises CancelledError inside the generator (its finally block runs) and
// in the consumer; anext() while another anext() of the same generator is running is refused
// (Python: RuntimeError, C++: invalid_state_error; the trace prints "already running").
#include "parity.hpp"

async_generator<int> fails_after(int n) {
  for (int i = 0; i < n; ++i) co_yield i;
  throw std::invalid_argument("generator failed");
}

struct finally_say {  // the finally block: a destructor
  ~finally_say() { say("sleeper: finally"); }
};

async_generator<int> sleeper() {
  finally_say f;
  try {
    say("sleeper: sleeps");
    co_await sleep(3600s);
    co_yield 1;
  } catch (const cancelled_error&) {
    say("sleeper: CancelledError");
    throw;
  }
}

coroutine<void> pull(async_generator<int>& g, std::string label) {
  try {
    if (auto v = co_await g.next()) say(label + " " + std::to_string(*v));
    else say(label + " StopAsyncIteration");
  } catch (const std::invalid_argument& e) {
    say(label + " ValueError: " + e.what());
  } catch (const invalid_state_error& e) {
    say(label + (std::string(e.what()).find("already running") != std::string::npos ? " already running" : " RuntimeError"));
  } catch (const cancelled_error&) {
    say(label + " CancelledError");
    throw;
  }
}

int main() {
  run([]() -> coroutine<void> {
    auto g = fails_after(2);
    for (int i = 0; i < 4; ++i) co_await pull(g, "fails_after:");

    auto s = sleeper();
    auto consumer = create_task(pull(s, "consumer:"));
    co_await sleep(0s);
    co_await pull(s, "second anext:");
    say("cancel consumer: " + py(consumer.cancel()));
    try {
      co_await consumer;
    } catch (const cancelled_error&) {
      say("main: consumer cancelled");
    }
    co_await pull(s, "after cancel:");
  }());
  return 0;
}
