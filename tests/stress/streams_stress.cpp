// Streams under churn: connections to a start_server echo opened and dropped at random points
// (right after connecting, mid-message, with echoes unread, with megabytes the server can not
// send back so that its drain blocks, half-closed, or with the client's read cancelled), some servers hanging up first. At
// the end every handler has ended, the server closes cleanly, and no descriptor is left.
#include "stress_common.hpp"

#include <random>
#include <vector>

using namespace codestare::async_utils;
using namespace std::chrono_literals;

namespace {

constexpr std::size_t message = 16;

struct counts {
  long started = 0, ended = 0, clean = 0, reset = 0, server_hangups = 0;
  long clients_done = 0, client_errors = 0, cancelled = 0, echoed = 0;
};

/// Counts a handler's end however it ends (also when its frame is destroyed).
struct ended_guard {
  counts& c;
  ~ended_guard() { ++c.ended; }
};

coroutine<void> echo(counts& c, stream_reader r, stream_writer w) {
  ++c.started;
  ended_guard guard{c};
  std::minstd_rand rng(static_cast<unsigned>(c.started));
  const long hang_up_after = rng() % 8 == 0 ? static_cast<long>(rng() % 3) : -1;
  try {
    if ((co_await r.readexactly(1)) == "b") {  // bulk: echo chunks as they come
      for (;;) {
        std::string chunk = co_await r.read(64 * 1024);
        if (chunk.empty()) break;
        w.write(chunk);
        co_await w.drain();  // blocks once the client stops reading
      }
      ++c.clean;
      w.close();
      co_await w.wait_closed();
      co_return;
    }
    for (long n = 0;; ++n) {
      if (n == hang_up_after) {
        ++c.server_hangups;
        co_return;  // the streams go with the frame: the descriptor closes
      }
      std::string msg = co_await r.readexactly(message);
      w.write(msg);
      co_await w.drain();
    }
    ++c.clean;
  } catch (const incomplete_read_error&) {
    ++c.clean;  // the client left (between or mid-message)
  } catch (const std::system_error&) {
    ++c.reset;  // the client left with our data unread (ECONNRESET, EPIPE)
  }
  w.close();
  co_await w.wait_closed();
}

coroutine<void> client(int port, unsigned seed, counts& c) {
  std::minstd_rand rng(seed);
  try {
    auto [r, w] = co_await open_connection("127.0.0.1", port);
    const unsigned mode = rng() % 7;
    w.write(mode == 4 ? "b" : "e");
    const std::string msg(message, static_cast<char>('a' + seed % 26));
    switch (mode) {
      case 0:  // drop at once
        break;
      case 1:  // drop mid-message
        w.write(msg.substr(0, 1 + rng() % (message - 1)));
        co_await w.drain();
        break;
      case 2: {  // a few round trips
        const long rounds = 1 + static_cast<long>(rng() % 5);
        for (long i = 0; i < rounds; ++i) {
          w.write(msg);
          co_await w.drain();
          std::string back = co_await r.readexactly(message);
          STRESS_CHECK(back == msg);
          ++c.echoed;
        }
        break;
      }
      case 3:  // echoes left unread
        for (int i = 0; i < 4; ++i) w.write(msg);
        co_await w.drain();
        co_await sleep(std::chrono::microseconds(rng() % 500));
        break;
      case 4: {  // more than the sockets hold, never read: the server's drain blocks
        int small = 4096;  // a small receive window: the server's echo backs up sooner
        ::setsockopt(w.fileno(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
        std::string big(512 << 10, 'z');
        w.write(big);
        co_await sleep(std::chrono::microseconds(rng() % 2000));
        ++c.clients_done;
        co_return;  // dropped, not closed: closing would wait for the unsent megabytes
      }
      case 5: {  // half-close, then read every echo
        w.write(msg);
        w.write(msg);
        w.write_eof();
        std::string back = co_await r.read();
        STRESS_CHECK(back.size() <= 2 * message);
        break;
      }
      default: {  // our read cancelled mid-way
        w.write(msg.substr(0, 3));
        auto reading = create_task(r.readexactly(message));
        co_await sleep(std::chrono::microseconds(rng() % 300));
        reading.cancel();
        co_await wait_done(reading);
        if (reading.cancelled()) {
          ++c.cancelled;
        } else {
          try {
            co_await reading;  // the echo came first, or the server hung up
          } catch (const std::exception&) {
          }
        }
        break;
      }
    }
    w.close();
    co_await w.wait_closed();
  } catch (const std::system_error&) {
    ++c.client_errors;  // the server hung up first
  } catch (const incomplete_read_error&) {
    ++c.client_errors;
  }
  ++c.clients_done;
}

}  // namespace

int main(int argc, char** argv) {
  stress::fail_on_library_errors();
  const long connections = stress::quick(argc, argv) ? 1000 : 10000;
  constexpr long concurrent = 64;
  const int fds_before = stress::open_fds();
  stress::stopwatch watch;
  counts c;

  run([&]() -> coroutine<void> {
    auto handler = [&c](stream_reader r, stream_writer w) { return echo(c, std::move(r), std::move(w)); };
    server srv = co_await start_server(handler, "127.0.0.1", 0);
    const int port = srv.sockets()[0].port();
    std::vector<task<void>> wave;
    for (long i = 0; i < connections; ++i) {
      wave.push_back(create_task(client(port, static_cast<unsigned>(i) * 2654435761u + 1, c)));
      if (static_cast<long>(wave.size()) == concurrent) {
        for (auto& t : wave) co_await t;
        wave.clear();
      }
    }
    for (auto& t : wave) co_await t;
    srv.close();
    co_await srv.wait_closed();
  }());

  STRESS_CHECK(c.clients_done == connections);
  STRESS_CHECK(c.started == connections);
  STRESS_CHECK(c.ended == c.started);
  STRESS_CHECK(c.clean + c.reset + c.server_hangups == c.started);
  STRESS_CHECK(stress::open_fds() == fds_before);
  stress::report("streams churn", std::to_string(connections) + " connections, " + std::to_string(c.echoed) + " echoes, " +
                                       std::to_string(c.reset) + " resets, " + std::to_string(c.server_hangups) +
                                       " server hang-ups, " + std::to_string(c.cancelled) + " cancelled reads",
                 watch);
}
