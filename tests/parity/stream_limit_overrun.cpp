// A reader with limit 8: readuntil past the limit throws limit_overrun_error (consumed) and keeps
// the data; readline drops the long line (asyncio: ValueError) and the next line reads; without
// any separator the overrun leaves everything buffered for read().
#include "parity.hpp"

#include <sys/socket.h>

int main() {
  run([]() -> coroutine<void> {
    int fds[2];
    ::socketpair(AF_UNIX, SOCK_STREAM, 0, fds);
    auto [r, w] = open_stream(fds[0], 8);
    auto [pr, pw] = open_stream(fds[1]);
    pw.write("0123456789AB\nshort\n");
    co_await pw.drain();
    co_await sleep(10ms);
    try {
      co_await r.readuntil("\n");
    } catch (const limit_overrun_error& e) {
      say(std::string("readuntil: LimitOverrunError(") + e.what() + ") consumed=" + std::to_string(e.consumed()));
    }
    try {
      co_await r.readexactly(3);
      say("the data stayed: readexactly(3) works");
    } catch (const std::exception& e) {
      say(std::string("lost ") + e.what());
    }
    try {
      co_await r.readline();
    } catch (const limit_overrun_error& e) {
      say(std::string("readline: ValueError(") + e.what() + ")");
    }
    std::string line = co_await r.readline();
    say("next line: " + line.substr(0, line.size() - 1));
    pw.write("xxxxxxxxxxxx");
    co_await pw.drain();
    co_await sleep(10ms);
    try {
      co_await r.readuntil("\n");
    } catch (const limit_overrun_error& e) {
      say(std::string("readuntil: LimitOverrunError(") + e.what() + ") consumed=" + std::to_string(e.consumed()));
    }
    say("what remains: " + co_await r.read(100));
    pw.write("yyyyyyyyyyyy");
    co_await pw.drain();
    co_await sleep(10ms);
    try {
      co_await r.readline();
    } catch (const limit_overrun_error& e) {
      say(std::string("readline without a separator: ValueError(") + e.what() + ")");
    }
    pw.write("z\n");
    co_await pw.drain();
    line = co_await r.readline();
    say("after the dropped chunk: " + line.substr(0, line.size() - 1));
    w.close();
    pw.close();
    co_await w.wait_closed();
    co_await pw.wait_closed();
    say("done");
  }());
  return 0;
}
