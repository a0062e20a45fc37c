// Our side of the benchmark suite: W1 spawn, W3 yield, W4 TCP echo (W4S: with streams), W6 timers,
// W7 task_group, W8 async generator, M1 idle-task memory. W2 (condition) and W5 (executor) live in their own files so that this one builds
// before those primitives land. Usage: au_bench WORKLOAD N
#include "async_utils.hpp"
#include "bench_common.hpp"

#include <arpa/inet.h>
#include <cstring>
#include <netinet/tcp.h>
#include <string_view>

namespace au = codestare::async_utils;
using au::coroutine;
using namespace std::chrono_literals;

namespace {

// The io_uring build (-DASYNC_UTILS_BACKEND_IO_URING) reports as its own implementation.
#ifdef ASYNC_UTILS_BACKEND_IO_URING
const char* const impl = "async_utils-uring";
#else
const char* const impl = "async_utils";
#endif

// ---- W1: spawn N tasks returning their index, await all in order ------------------------------
coroutine<long> index_of(long i) { co_return i; }

coroutine<void> w1(long n) {
  std::vector<au::task<long>> tasks;
  tasks.reserve(static_cast<std::size_t>(n));
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  for (long i = 0; i < n; ++i) tasks.push_back(au::create_task(index_of(i)));
  long sum = 0;
  for (auto& t : tasks) sum += co_await t;
  auto t1 = bench::clock::now();
  if (sum != n * (n - 1) / 2) throw std::runtime_error("W1: wrong sum");
  bench::report("W1", impl, n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n));
}

// ---- W1': create N lazy coroutine<long> and await each (no tasks) ------------------------------
coroutine<void> w1_lazy(long n) {
  std::vector<coroutine<long>> coros;
  coros.reserve(static_cast<std::size_t>(n));
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  for (long i = 0; i < n; ++i) coros.push_back(index_of(i));
  long sum = 0;
  for (auto& c : coros) sum += co_await std::move(c);
  auto t1 = bench::clock::now();
  if (sum != n * (n - 1) / 2) throw std::runtime_error("W1': wrong sum");
  bench::report("W1L", impl, n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n));
}

// ---- M1': resident bytes per suspended (created, not started) lazy coroutine ----------------
coroutine<void> m1_lazy(long n) {
  std::vector<coroutine<long>> coros;
  coros.reserve(static_cast<std::size_t>(n));
  bench::alloc_scope allocs;
  const long before = bench::resident_bytes();
  for (long i = 0; i < n; ++i) coros.push_back(index_of(i));
  const long after = bench::resident_bytes();
  const double heap = double(allocs.bytes()) / double(n);
  bench::report("M1L", impl, n, double(after - before) / double(n), double(allocs.allocs()) / double(n),
                "{\"heap_bytes_per_coroutine\":" + std::to_string(heap) + "}", "coroutine<long> created, never started");
  co_return;
}

// ---- W3: one task yields N times ------------------------------------------------------------
coroutine<void> w3(long n) {
  co_await au::sleep(0s);  // warm the ready queue
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  for (long i = 0; i < n; ++i) co_await au::sleep(0s);
  auto t1 = bench::clock::now();
  bench::report("W3", impl, n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n));
}

// ---- W8: an async generator of N values, consumed with next() ---------------------------------
au::async_generator<long> count_up(long n) {
  for (long i = 0; i < n; ++i) co_yield i;
}

coroutine<void> w8(long n) {
  bench::alloc_scope allocs;  // the generator's frame is the one allocation of the run
  auto t0 = bench::clock::now();
  auto gen = count_up(n);
  long sum = 0;
  while (auto v = co_await gen.next()) sum += *v;
  auto t1 = bench::clock::now();
  if (sum != n * (n - 1) / 2) throw std::runtime_error("W8: wrong sum");
  bench::report("W8", impl, n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n), "{}",
                "co_await gen.next() until std::nullopt");
}

// ---- W4: TCP echo, 32 clients x N sequential 64-byte round trips, one loop ------------------
// W4idle: the same with 1,000 more connections open, each with a server task waiting in
// sock_recv_into and a client that never writes (set up before, torn down after the timing).
constexpr int clients = 32;
constexpr std::size_t message = 64;

int tcp_socket() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "socket");
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

coroutine<void> echo(int fd) {
  char buf[4096];
  for (;;) {
    std::size_t n = co_await au::sock_recv_into(fd, std::span<char>(buf));
    if (n == 0) break;
    co_await au::sock_sendall(fd, std::string_view(buf, n));
  }
  ::close(fd);
}

coroutine<void> serve(int listener) {
  std::vector<au::task<void>> sessions;
  for (int i = 0; i < clients; ++i) {
    au::accepted_socket conn = co_await au::sock_accept(listener);
    int one = 1;
    ::setsockopt(conn.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    sessions.push_back(au::create_task(echo(conn.fd)));
  }
  for (auto& s : sessions) co_await s;
}

coroutine<void> client(const sockaddr_in& addr, long rounds) {
  int fd = tcp_socket();
  co_await au::sock_connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  char out[message], in[message];
  std::memset(out, 'x', sizeof out);
  for (long r = 0; r < rounds; ++r) {
    co_await au::sock_sendall(fd, std::string_view(out, message));
    std::size_t got = 0;
    while (got < message) {
      std::size_t n = co_await au::sock_recv_into(fd, std::span<char>(in + got, message - got));
      if (n == 0) throw std::runtime_error("W4: server closed early");
      got += n;
    }
  }
  ::close(fd);
}

coroutine<void> w4(long rounds, int idle = 0) {
  int listener = tcp_socket();
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listener, 128) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    throw std::system_error(errno, std::generic_category(), "listen");
  std::vector<au::task<void>> idlers;
  std::vector<int> idle_clients;
  for (int i = 0; i < idle; ++i) {
    int c = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);  // blocking connect: loopback
    if (c < 0 || ::connect(c, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
      throw std::system_error(errno, std::generic_category(), "idle connect");
    int s = -1;
    while ((s = ::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC)) < 0)
      if (errno != EAGAIN && errno != EINTR) throw std::system_error(errno, std::generic_category(), "idle accept");
    idle_clients.push_back(c);
    idlers.push_back(au::create_task(echo(s)));
  }
  co_await au::sleep(0s);  // the idle reads are waiting now
  std::vector<au::task<void>> tasks;
  tasks.reserve(clients + 1);
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  tasks.push_back(au::create_task(serve(listener)));
  for (int i = 0; i < clients; ++i) tasks.push_back(au::create_task(client(addr, rounds)));
  for (auto& t : tasks) co_await t;
  auto t1 = bench::clock::now();
  for (int c : idle_clients) ::close(c);  // EOF: the idle echo tasks end
  for (auto& t : idlers) co_await t;
  ::close(listener);
  const double msgs = double(clients) * double(rounds);
  const double ns = bench::ns_between(t0, t1);
  bench::report(idle ? "W4idle" : "W4", impl, rounds, ns / msgs, double(allocs.allocs()) / msgs,
                "{\"msgs_per_s\":" + std::to_string(msgs / ns * 1e9) + "}");
}

// ---- W4S: W4 written with streams: start_server, open_connection, readexactly, write, drain ---
coroutine<void> stream_echo(au::stream_reader r, au::stream_writer w) {
  for (;;) {
    std::string msg;
    try {
      msg = co_await r.readexactly(message);
    } catch (const au::incomplete_read_error&) {
      break;  // the client is done
    }
    w.write(msg);
    co_await w.drain();
  }
  w.close();
}

coroutine<void> stream_client(int port, long rounds) {
  auto [r, w] = co_await au::open_connection("127.0.0.1", port);
  const std::string out(message, 'x');
  for (long i = 0; i < rounds; ++i) {
    w.write(out);
    co_await w.drain();
    std::string in = co_await r.readexactly(message);
  }
  w.close();
  co_await w.wait_closed();
}

coroutine<void> w4s(long rounds) {
  au::server srv = co_await au::start_server(stream_echo, "127.0.0.1", 0);
  const int port = srv.sockets()[0].port();
  (void)co_await au::getaddrinfo("127.0.0.1", port);  // warm the executor's thread (both sides resolve)
  std::vector<au::task<void>> tasks;
  tasks.reserve(clients);
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  for (int i = 0; i < clients; ++i) tasks.push_back(au::create_task(stream_client(port, rounds)));
  for (auto& t : tasks) co_await t;
  srv.close();
  co_await srv.wait_closed();
  auto t1 = bench::clock::now();
  const double msgs = double(clients) * double(rounds);
  const double ns = bench::ns_between(t0, t1);
  bench::report("W4S", impl, rounds, ns / msgs, double(allocs.allocs()) / msgs,
                "{\"msgs_per_s\":" + std::to_string(msgs / ns * 1e9) + "}", "stream_reader / stream_writer");
}

// ---- W6: N tasks sleep pseudo-random 0..50 ms -----------------------------------------------
coroutine<void> sleeper(long us) { co_await au::sleep(std::chrono::microseconds(us)); }

coroutine<void> w6(long n) {
  const auto delays = bench::timer_delays_us(n);
  long last = 0;
  for (long d : delays) last = std::max(last, d);
  std::vector<au::task<void>> tasks;
  tasks.reserve(static_cast<std::size_t>(n));
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  for (long d : delays) tasks.push_back(au::create_task(sleeper(d)));
  for (auto& t : tasks) co_await t;
  auto t1 = bench::clock::now();
  const double overshoot_ms = (bench::ns_between(t0, t1) - double(last) * 1e3) / 1e6;
  bench::report("W6", impl, n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n),
                "{\"overshoot_ms\":" + std::to_string(overshoot_ms) + "}");
}

// ---- M1: resident bytes per idle task --------------------------------------------------------
coroutine<void> idle(au::future<void> gate) { co_await gate; }

coroutine<void> m1(long n) {
  auto gate = au::event_loop::current().create_future<void>();
  std::size_t frame = 0;
  {
    bench::alloc_scope probe;
    auto c = idle(gate);  // the coroutine function allocates its frame here
    frame = probe.bytes();
  }
  std::vector<au::task<void>> tasks;
  tasks.reserve(static_cast<std::size_t>(n));
  co_await au::sleep(0s);
  bench::alloc_scope allocs;
  const long before = bench::resident_bytes();
  for (long i = 0; i < n; ++i) tasks.push_back(au::create_task(idle(gate)));
  co_await au::sleep(0s);  // every task has started and is blocked on the gate
  co_await au::sleep(0s);
  const long after = bench::resident_bytes();
  const double per_task = double(after - before) / double(n);
  const double heap = double(allocs.bytes()) / double(n);
  gate.set_result();
  for (auto& t : tasks) co_await t;
  bench::report("M1", impl, n, per_task, double(allocs.allocs()) / double(n),
                "{\"frame_bytes\":" + std::to_string(frame) + ",\"heap_bytes_per_task\":" + std::to_string(heap) + "}",
                "idle tasks block on a future<void> (no event yet)");
}

// ---- W7: a task_group with N children, each yielding once ----------------------------------
coroutine<void> yield_once() { co_await au::sleep(0s); }

coroutine<void> w7(long n) {
  co_await au::sleep(0s);
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  auto body = [n](au::task_group& tg) {
    for (long i = 0; i < n; ++i) tg.create_task(yield_once());
  };
  co_await au::async_with(au::task_group{}, body);
  auto t1 = bench::clock::now();
  bench::report("W7", impl, n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s W1|W1L|W3|W4|W4S|W4idle|W6|W7|W8|M1|M1L N\n", argv[0]);
    return 2;
  }
  const std::string w = argv[1];
  const long n = std::atol(argv[2]);
  if (w == "W1") au::run(w1(n));
  else if (w == "W3") au::run(w3(n));
  else if (w == "W4") au::run(w4(n));
  else if (w == "W4S") au::run(w4s(n));
  else if (w == "W4idle") au::run(w4(n, 1000));
  else if (w == "W6") au::run(w6(n));
  else if (w == "W7") au::run(w7(n));
  else if (w == "W8") au::run(w8(n));
  else if (w == "M1") au::run(m1(n));
  else if (w == "W1L") au::run(w1_lazy(n));
  else if (w == "M1L") au::run(m1_lazy(n));
  else {
    std::fprintf(stderr, "unknown workload %s\n", w.c_str());
    return 2;
  }
}
