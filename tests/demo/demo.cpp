// The demo behind `make demo`: a TCP echo service on 127.0.0.1 (start_server, streams) in one
// task_nursery, a few dozen clients (open_connection) driving it from a second one, live
// statistics in an accessor read by a reporter task, a checksum offloaded with make_async, and a
// graceful shutdown after --seconds or on Ctrl+C.
//
//   demo [--seconds S] [--clients N] [--fault]
//
// --fault makes one client throw: its nursery reports the error with the task's name, and every
// nursery shuts down gracefully, as the shutdown handling of task_nursery promises.
#include "async_utils.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace au = codestare::async_utils;
using namespace std::chrono_literals;

namespace {

struct options {
  double seconds = 3.0;
  int clients = 32;
  bool fault = false;
};

struct statistics {
  std::uint64_t messages = 0;
  std::uint64_t bytes = 0;
  std::uint32_t checksum = 0;  // sum of the batch checksums the executor computed
  int connections = 0;
  int clients_running = 0;
};

// The blocking step the clients hand to the executor: a CRC-32 of a batch of payloads.
std::uint32_t crc32(std::string data) {
  std::uint32_t crc = 0xffffffffu;
  for (unsigned char c : data) {
    crc ^= c;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

// Shared by every task of the demo; the accessor publishes snapshots of it.
struct demo_state {
  statistics totals;
  au::accessor<statistics> stats{{.condition = nullptr, .name = "stats"}};
  int port = 0;
};

au::coroutine<void> publish(demo_state& s) { co_await s.stats.set(s.totals); }

// One connection of the echo service (start_server runs it in a task of its own).
au::coroutine<void> serve_connection(au::stream_reader reader, au::stream_writer writer, demo_state& s) {
  ++s.totals.connections;
  try {
    for (;;) {
      std::string data = co_await reader.read(4096);
      if (data.empty()) break;  // the client is done
      writer.write(data);
      co_await writer.drain();
    }
  } catch (const std::system_error& e) {
    // A client that goes away mid-exchange resets its connection: the end of it, not a failure.
    if (e.code().value() != ECONNRESET && e.code().value() != EPIPE) throw;
  }
  writer.close();
}

au::coroutine<void> client(int id, demo_state& s, bool faulty) {
  ++s.totals.clients_running;
  auto checksum = au::make_async(&crc32);
  try {
    auto [reader, writer] = co_await au::open_connection("127.0.0.1", s.port);
    std::string batch;
    for (std::uint64_t round = 1;; ++round) {
      std::string message = "client " + std::to_string(id) + " message " + std::to_string(round);
      message.resize(64, '.');
      writer.write(message);
      co_await writer.drain();
      std::string echo = co_await reader.readexactly(static_cast<std::ptrdiff_t>(message.size()));
      if (echo != message) throw std::runtime_error("echo mismatch");
      ++s.totals.messages;
      s.totals.bytes += echo.size();
      batch += echo;
      if (round % 100 == 0) {
        s.totals.checksum += co_await checksum(std::move(batch));  // off the loop thread
        batch.clear();
        co_await publish(s);
      }
      if (faulty && round == 300) throw std::runtime_error("injected fault in client " + std::to_string(id));
    }
  } catch (const au::incomplete_read_error&) {
    --s.totals.clients_running;
    throw std::runtime_error("server closed the connection");
  } catch (...) {
    --s.totals.clients_running;  // the streams close with the frame
    throw;
  }
}

au::coroutine<void> reporter(demo_state& s, std::chrono::steady_clock::time_point start) {
  for (;;) {
    co_await au::sleep(500ms);
    statistics now = co_await s.stats.get({.predicate = {}, .wait_for_write = false});
    double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("  %5.1f s  %8llu messages  %7.0f msg/s  %2d clients  %2d connections  checksum %08x\n", elapsed,
                static_cast<unsigned long long>(now.messages), now.messages / elapsed, now.clients_running, now.connections,
                now.checksum);
    std::fflush(stdout);
  }
}

au::coroutine<int> demo(options opt) {
  demo_state s;
  const auto start = std::chrono::steady_clock::now();
  auto handler = [&s](au::stream_reader reader, au::stream_writer writer) {
    return serve_connection(std::move(reader), std::move(writer), s);
  };
  au::server service = co_await au::start_server(handler, "127.0.0.1", 0);
  s.port = service.sockets()[0].port();
  std::printf("echo service on 127.0.0.1:%d, %d clients, %.1f s%s (Ctrl+C stops it early)\n", s.port, opt.clients,
              opt.seconds, opt.fault ? ", one faulty client" : "");

  au::task_nursery server("server");
  au::task_nursery clients("clients");
  // Contexts entered in the nurseries are exited exactly once, whatever ends the run.
  co_await server.enter_async_context(au::async_context([] { return 0; },
                                                        [&service](std::exception_ptr) {
                                                          service.close();
                                                          std::printf("closed: the listening socket\n");
                                                          std::fflush(stdout);
                                                          return false;
                                                        }));
  co_await clients.enter_async_context(au::async_context([] { return 0; },
                                                         [&s](std::exception_ptr) {
                                                           std::printf("closed: the clients' nursery (%llu messages echoed)\n",
                                                                       static_cast<unsigned long long>(s.totals.messages));
                                                           return false;
                                                         }));
  // Accepts until the nursery shuts down; then closes and waits for the connections' handlers.
  server.create_task(service.serve_forever(), "acceptor");
  server.create_task(reporter(s, start), "reporter");
  for (int i = 0; i < opt.clients; ++i) clients.create_task(client(i, s, opt.fault && i == 3), "client-" + std::to_string(i));

  bool interrupted = false;
  try {
    co_await au::sleep(std::chrono::duration<double>(opt.seconds));
  } catch (const au::cancelled_error&) {
    interrupted = true;  // Ctrl+C or a failing task: the nurseries are shutting down already
  }
  const auto client_tasks = clients.tasks().size();
  const auto server_tasks = server.tasks().size();
  co_await clients.aclose();
  co_await server.aclose();
  std::fflush(stdout);
  if (interrupted) {
    std::printf("interrupted: every nursery shut down gracefully; %llu messages, %llu bytes, checksum %08x\n",
                static_cast<unsigned long long>(s.totals.messages), static_cast<unsigned long long>(s.totals.bytes),
                s.totals.checksum);
  } else {
    std::printf("done: stopped %zu client tasks and %zu server tasks; %llu messages, %llu bytes, checksum %08x\n",
                client_tasks, server_tasks, static_cast<unsigned long long>(s.totals.messages),
                static_cast<unsigned long long>(s.totals.bytes), s.totals.checksum);
  }
  std::fflush(stdout);
  co_return interrupted ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  options opt;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--seconds" && i + 1 < argc) opt.seconds = std::atof(argv[++i]);
    else if (arg == "--clients" && i + 1 < argc) opt.clients = std::atoi(argv[++i]);
    else if (arg == "--fault") opt.fault = true;
    else {
      std::fprintf(stderr, "usage: %s [--seconds S] [--clients N] [--fault]\n", argv[0]);
      return 2;
    }
  }
  if (opt.seconds <= 0 || opt.clients <= 0) {
    std::fprintf(stderr, "--seconds and --clients must be positive\n");
    return 2;
  }
  try {
    return au::run(demo(opt));
  } catch (const au::cancelled_error&) {
    std::printf("shut down gracefully\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "demo failed: %s\n", e.what());
    return 1;
  }
}
