// Peers that reset TCP connections mid-message (SO_LINGER 0 + close sends RST) on an echo
// server: the server must see a clear std::system_error (ECONNRESET), never hang or crash, and
// keep serving the others.
#include "stress_common.hpp"

#include <arpa/inet.h>
#include <atomic>
#include <cerrno>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>
#include <vector>

using namespace codestare::async_utils;
using namespace std::chrono_literals;

namespace {

struct outcomes {
  long connections = 0;
  long reset = 0;     // std::system_error with ECONNRESET
  long pipe = 0;      // std::system_error with EPIPE (a send after the reset was already seen)
  long eof = 0;       // a clean end of stream: not expected after an RST
  long other = 0;     // any other exception
  long timed_out = 0;
  long bytes = 0;
};

coroutine<void> echo(int fd, outcomes& out) {
  char buf[16384];
  try {
    for (;;) {
      std::size_t n = co_await sock_recv_into(fd, std::span<char>(buf));
      if (n == 0) {
        ++out.eof;
        break;
      }
      out.bytes += static_cast<long>(n);
      co_await sock_sendall(fd, std::string_view(buf, n));
    }
  } catch (const std::system_error& e) {
    if (e.code().value() == ECONNRESET) ++out.reset;
    else if (e.code().value() == EPIPE) ++out.pipe;
    else ++out.other;
  }
  ::close(fd);
}

coroutine<void> serve(int listener, outcomes& out, long expected) {
  std::vector<task<void>> conns;
  while (out.connections < expected) {
    accepted_socket conn = co_await sock_accept(listener);
    ++out.connections;
    // Bounded: a connection that never ends fails the check instead of hanging the program.
    conns.push_back(create_task([](int fd, outcomes& o) -> coroutine<void> {
      try {
        co_await wait_for(echo(fd, o), 20s);
      } catch (const timeout_error&) {
        ++o.timed_out;
      }
    }(conn.fd, out)));
  }
  for (auto& c : conns) co_await c;
}

// A blocking client: sends part of a message (sometimes a lot, so that the server blocks in
// sendall), sometimes reads some echo first, then resets the connection.
void client(const sockaddr_in& addr, long count, unsigned seed, std::atomic<long>& failures) {
  std::string message(256 * 1024, 'm');
  for (long i = 0; i < count; ++i) {
    seed = seed * 1103515245u + 12345u;
    int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || ::connect(s, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
      ++failures;
      if (s >= 0) ::close(s);
      continue;
    }
    const std::size_t part = (seed >> 8) % 4 == 0 ? message.size() : 1 + (seed >> 12) % 4000;
    std::size_t sent = 0;
    while (sent < part) {
      ssize_t n = ::send(s, message.data() + sent, part - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n <= 0) break;  // the buffers are full: reset with the server blocked mid-send
      sent += static_cast<std::size_t>(n);
    }
    if ((seed >> 16) % 2) {
      char buf[64];
      (void)::recv(s, buf, sizeof buf, 0);  // some of the echo came back: mid-message for sure
    }
    linger hard{1, 0};
    ::setsockopt(s, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
    ::close(s);  // RST, not FIN
  }
}

}  // namespace

int main(int argc, char** argv) {
  stress::fail_on_library_errors();
  constexpr int clients = 4;
  const long per_client = stress::quick(argc, argv) ? 250 : 2500;
  const long total = clients * per_client;
  const int fds_before = stress::open_fds();
  stress::stopwatch watch;
  outcomes out;
  std::atomic<long> connect_failures{0};

  int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  STRESS_CHECK(listener >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  STRESS_CHECK(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  STRESS_CHECK(::listen(listener, 512) == 0);
  socklen_t len = sizeof addr;
  STRESS_CHECK(::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) == 0);

  std::vector<std::thread> peers;
  for (int c = 0; c < clients; ++c) peers.emplace_back(client, std::cref(addr), per_client, 7919u * static_cast<unsigned>(c + 1), std::ref(connect_failures));
  run([&]() -> coroutine<void> {
    co_await wait_for(serve(listener, out, total), 300s);
    STRESS_CHECK(all_tasks().size() == 1);
  }());
  for (auto& p : peers) p.join();
  ::close(listener);

  std::fprintf(stderr, "connections %ld: ECONNRESET %ld, EPIPE %ld, EOF %ld, other %ld, timed out %ld\n", out.connections, out.reset,
               out.pipe, out.eof, out.other, out.timed_out);
  STRESS_CHECK(connect_failures == 0);
  STRESS_CHECK(out.connections == total);
  STRESS_CHECK(out.reset == total);  // every one: a clear ECONNRESET
  STRESS_CHECK(stress::open_fds() == fds_before);
  stress::report("echo: peers reset mid-message",
                 std::to_string(total) + " connections reset, " + std::to_string(out.reset) + " ECONNRESET seen, " +
                     std::to_string(out.bytes / 1024) + " KiB echoed",
                 watch);
  return 0;
}
