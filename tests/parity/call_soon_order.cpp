// call_soon callbacks run FIFO on a later iteration; one scheduled from a callback runs after
// the whole current batch; a cancelled handle never runs.
#include "parity.hpp"

int main() {
  event_loop loop;
  std::function<void(std::string)> cb = [&](std::string name) {
    say(name);
    if (name == "b") loop.call_soon([&] { cb("d (scheduled by b)"); });
    if (name == "d (scheduled by b)") loop.stop();
  };
  loop.call_soon([&] { cb("a"); });
  auto h = loop.call_soon([&] { cb("x"); });
  loop.call_soon([&] { cb("b"); });
  loop.call_soon([&] { cb("c"); });
  h.cancel();
  say("scheduled");
  loop.run_forever();
  say("cancelled handle: " + py(h.cancelled()));
  loop.close();
  return 0;
}
