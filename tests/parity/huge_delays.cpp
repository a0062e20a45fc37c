// Delays far beyond any real wait: timers that never fire, sleeps that last until cancelled,
// wait_for that never times out; negative delays count as zero. Other timers are undisturbed.
#include "parity.hpp"

int main() {
  run([]() -> coroutine<void> {
    event_loop& loop = event_loop::current();
    auto never = loop.call_later(event_loop::duration::max(), [] { say("never fires"); });
    loop.call_later(-5s, [] { say("negative delay fires first"); });
    loop.call_later(10ms, [] { say("10 ms timer fires"); });
    auto sleeper = create_task(sleep(std::chrono::hours::max()));
    co_await sleep(20ms);
    say("sleeper done after 20 ms: " + py(sleeper.done()));
    sleeper.cancel();
    co_await wait_done(sleeper);
    say("sleeper cancelled: " + py(sleeper.cancelled()));
    auto fut = loop.create_future<std::string>();
    loop.call_later(10ms, [fut]() mutable { fut.set_result("value"); });
    say("wait_for with a huge timeout: " + co_await wait_for(fut, std::chrono::hours::max()));
    co_await sleep(-1s);
    say("sleep(-1) returned");
    say("never-timer cancelled: " + py(never.cancelled()));
    never.cancel();
  }());
  return 0;
}
