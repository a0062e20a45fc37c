// Timers fire in deadline order, ties in scheduling order; call_at and call_later share one
// clock; a cancelled timer never fires; a negative delay counts as zero.
#include "parity.hpp"

int main() {
  event_loop loop;
  const auto now = loop.time();
  loop.call_at(now + 30ms, [] { say("call_at +30ms"); });
  loop.call_later(10ms, [] { say("later 10ms"); });
  auto h = loop.call_later(20ms, [] { say("cancelled"); });
  loop.call_later(20ms, [] { say("later 20ms (first)"); });
  loop.call_later(20ms, [] { say("later 20ms (second)"); });
  loop.call_later(-1s, [] { say("negative delay"); });
  loop.call_soon([] { say("soon"); });
  loop.call_later(40ms, [&] { loop.stop(); });
  h.cancel();
  loop.run_forever();
  say("cancelled: " + py(h.cancelled()));
  loop.close();
  return 0;
}
