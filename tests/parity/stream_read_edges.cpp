// stream reader edge cases over a socket pair: a separator split across two sends, partial data
// then EOF under readexactly (incomplete_read_error partial() and expected()) and readuntil,
// at_eof, and reads after EOF.
#include "parity.hpp"

#include <sys/socket.h>

std::string crlf(std::string s) {
  auto at = s.find("\r\n");
  return at == std::string::npos ? s : s.replace(at, 2, "<CRLF>");
}
std::string quoted(const std::string& s) { return "'" + s + "'"; }
std::string expected_of(const incomplete_read_error& e) { return e.expected() ? std::to_string(*e.expected()) : "None"; }

int main() {
  run([]() -> coroutine<void> {
    int fds[2];
    ::socketpair(AF_UNIX, SOCK_STREAM, 0, fds);
    auto [r, w] = open_stream(fds[0]);
    auto [pr, pw] = open_stream(fds[1]);
    pw.write("ab\r");
    co_await pw.drain();
    auto reading = create_task(r.readuntil("\r\n"));
    co_await sleep(10ms);
    say("readuntil waits for the rest of the separator: " + py(!reading.done()));
    pw.write("\nrest");
    co_await pw.drain();
    say("readuntil: " + crlf(co_await reading));
    say("read(2): " + co_await r.read(2));
    pw.write("abc");
    co_await pw.drain();
    pw.write_eof();
    try {
      co_await r.readexactly(10);
    } catch (const incomplete_read_error& e) {
      say("readexactly(10): IncompleteReadError partial=" + e.partial() + " expected=" + expected_of(e));
    }
    say("at_eof: " + py(r.at_eof()));
    say("read(): " + quoted(co_await r.read()));
    say("readline(): " + quoted(co_await r.readline()));
    say("readexactly(0): " + quoted(co_await r.readexactly(0)));
    try {
      co_await r.readexactly(1);
    } catch (const incomplete_read_error& e) {
      say("readexactly(1): IncompleteReadError partial=" + quoted(e.partial()) + " expected=" + expected_of(e));
    }
    w.write("no separator");
    co_await w.drain();
    w.write_eof();
    try {
      co_await pr.readuntil("!");
    } catch (const incomplete_read_error& e) {
      say("readuntil at EOF: IncompleteReadError partial=" + e.partial() + " expected=" + expected_of(e));
    }
    say("peer at_eof: " + py(pr.at_eof()));
    w.close();
    pw.close();
    co_await w.wait_closed();
    co_await pw.wait_closed();
    say("done");
  }());
  return 0;
}
