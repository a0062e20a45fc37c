// First user TU of the split build (compiled with -DASYNC_UTILS_SPLIT): main(), run(), a
// nursery, streams over a socketpair, and a coroutine of the other user TU.
#include "async_utils.hpp"

#include <sys/socket.h>

#include <cstdio>
#include <string>

namespace au = codestare::async_utils;

au::coroutine<int> other_tu_total(int n);  // other.cpp

namespace {

au::coroutine<std::string> echo_line() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) throw std::runtime_error("socketpair");
  auto [r1, w1] = au::open_stream(fds[0]);
  auto [r2, w2] = au::open_stream(fds[1]);
  w1.write("ping\n");
  co_await w1.drain();
  std::string line = co_await r2.readline();
  w1.close();
  w2.close();
  co_await w1.wait_closed();
  co_await w2.wait_closed();
  co_return line;
}

au::coroutine<int> body() {
  int total = co_await other_tu_total(4);
  std::string line = co_await echo_line();
  int from_nursery = 0;
  {
    au::task_nursery n;
    auto child = [&]() -> au::coroutine<void> {
      co_await au::sleep(std::chrono::milliseconds(1));
      from_nursery = 7;
    };
    auto t = n.create_task(child());
    co_await t;
    co_await n.aclose();
  }
  std::printf("total=%d line=%s nursery=%d\n", total, line.substr(0, line.size() - 1).c_str(), from_nursery);
  co_return total + from_nursery;
}

}  // namespace

int main() { return au::run(body()) == 10 + 7 ? 0 : 1; }
