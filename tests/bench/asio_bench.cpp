// Boost.Asio peer (C++20 awaitables: co_spawn, use_awaitable), written the way Asio's own
// coroutine examples are. One io_context, one thread (concurrency hint 1).
// Usage: asio_bench W1|W2|W3|W4|W5|W6|M1 N
#include "bench_common.hpp"

#include <utility>  // Boost 1.74 awaitable.hpp uses std::exchange without including it

#include <boost/asio.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <cstring>
#include <optional>

namespace asio = boost::asio;
using asio::awaitable;
using asio::use_awaitable;
using asio::ip::tcp;

namespace {

const char* const impl = "asio";

/// Asio has no event: a steady_timer that never expires, cancelled to wake every waiter (the
/// documented idiom). wait() returns when the timer is cancelled.
awaitable<void> wait_cancelled(asio::steady_timer& t) {
  boost::system::error_code ec;
  co_await t.async_wait(asio::redirect_error(use_awaitable, ec));
}

// ---- W1 ---------------------------------------------------------------------------------------
awaitable<long> index_of(long i) { co_return i; }

awaitable<void> w1(long n) {
  auto ex = co_await asio::this_coro::executor;
  std::vector<long> results(static_cast<std::size_t>(n));
  long finished = 0;
  asio::steady_timer all_done(ex, asio::steady_timer::time_point::max());
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  // co_spawn has no task handle to await later: each completion handler stores its result.
  for (long i = 0; i < n; ++i)
    asio::co_spawn(ex, index_of(i), [&, i](std::exception_ptr e, long v) {
      if (e) std::rethrow_exception(e);
      results[static_cast<std::size_t>(i)] = v;
      if (++finished == n) all_done.cancel();
    });
  if (finished < n) co_await wait_cancelled(all_done);
  long sum = 0;
  for (long v : results) sum += v;
  auto t1 = bench::clock::now();
  if (sum != n * (n - 1) / 2) throw std::runtime_error("W1: wrong sum");
  bench::report("W1", impl, n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n), "{}",
                "co_spawn + completion handler per task; join via a cancelled steady_timer");
}

// ---- W1': create N lazy awaitable<long> and await each (no co_spawn) -----------------------
awaitable<void> w1_lazy(long n) {
  std::vector<awaitable<long>> coros;
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

// ---- M1': resident bytes per suspended (created, not started) awaitable ----------------------
awaitable<void> m1_lazy(long n) {
  std::vector<awaitable<long>> coros;
  coros.reserve(static_cast<std::size_t>(n));
  bench::alloc_scope allocs;
  const long before = bench::resident_bytes();
  for (long i = 0; i < n; ++i) coros.push_back(index_of(i));
  const long after = bench::resident_bytes();
  const double heap = double(allocs.bytes()) / double(n);
  bench::report("M1L", impl, n, double(after - before) / double(n), double(allocs.allocs()) / double(n),
                "{\"heap_bytes_per_coroutine\":" + std::to_string(heap) + "}", "awaitable<long> created, never started");
  co_return;
}

// ---- W2: no condition in Asio; one steady_timer per side, cancelled as the notification -------
awaitable<void> side(asio::steady_timer& mine, asio::steady_timer& other, int& turn, int me, long rounds) {
  for (long i = 0; i < rounds; ++i) {
    while (turn != me) co_await wait_cancelled(mine);
    turn = 1 - me;
    other.cancel();
  }
}

awaitable<void> w2(long n) {
  auto ex = co_await asio::this_coro::executor;
  asio::steady_timer ta(ex, asio::steady_timer::time_point::max()), tb(ex, asio::steady_timer::time_point::max());
  int turn = 0;
  int remaining = 2;
  asio::steady_timer done(ex, asio::steady_timer::time_point::max());
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  auto finish = [&](std::exception_ptr e) {
    if (e) std::rethrow_exception(e);
    if (--remaining == 0) done.cancel();
  };
  asio::co_spawn(ex, side(ta, tb, turn, 0, n), finish);
  asio::co_spawn(ex, side(tb, ta, turn, 1, n), finish);
  co_await wait_cancelled(done);
  auto t1 = bench::clock::now();
  bench::report("W2", impl, n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n), "{}",
                "no condition: one steady_timer per side, cancel() as notify");
}

// ---- W3 ---------------------------------------------------------------------------------------
awaitable<void> w3(long n) {
  auto ex = co_await asio::this_coro::executor;
  co_await asio::post(ex, use_awaitable);
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  for (long i = 0; i < n; ++i) co_await asio::post(ex, use_awaitable);
  auto t1 = bench::clock::now();
  bench::report("W3", impl, n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n), "{}",
                "co_await post(executor, use_awaitable)");
}

// ---- W4 ---------------------------------------------------------------------------------------
constexpr int clients = 32;
constexpr std::size_t message = 64;

awaitable<void> echo(tcp::socket s) {
  char buf[4096];
  for (;;) {
    boost::system::error_code ec;
    std::size_t n = co_await s.async_read_some(asio::buffer(buf), asio::redirect_error(use_awaitable, ec));
    if (ec) break;  // eof
    co_await asio::async_write(s, asio::buffer(buf, n), use_awaitable);
  }
}

awaitable<void> serve(tcp::acceptor& acceptor) {
  for (int i = 0; i < clients; ++i) {
    tcp::socket s = co_await acceptor.async_accept(use_awaitable);
    s.set_option(tcp::no_delay(true));
    asio::co_spawn(acceptor.get_executor(), echo(std::move(s)), asio::detached);
  }
}

awaitable<void> client(tcp::endpoint ep, long rounds) {
  tcp::socket s(co_await asio::this_coro::executor);
  co_await s.async_connect(ep, use_awaitable);
  s.set_option(tcp::no_delay(true));
  char out[message], in[message];
  std::memset(out, 'x', sizeof out);
  for (long r = 0; r < rounds; ++r) {
    co_await asio::async_write(s, asio::buffer(out), use_awaitable);
    co_await asio::async_read(s, asio::buffer(in), use_awaitable);
  }
}

awaitable<void> w4(long rounds) {
  auto ex = co_await asio::this_coro::executor;
  tcp::acceptor acceptor(ex, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
  const tcp::endpoint ep = acceptor.local_endpoint();
  int remaining = clients;
  asio::steady_timer done(ex, asio::steady_timer::time_point::max());
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  asio::co_spawn(ex, serve(acceptor), asio::detached);
  for (int i = 0; i < clients; ++i)
    asio::co_spawn(ex, client(ep, rounds), [&](std::exception_ptr e) {
      if (e) std::rethrow_exception(e);
      if (--remaining == 0) done.cancel();
    });
  co_await wait_cancelled(done);
  auto t1 = bench::clock::now();
  const double msgs = double(clients) * double(rounds);
  const double ns = bench::ns_between(t0, t1);
  bench::report("W4", impl, rounds, ns / msgs, double(allocs.allocs()) / msgs,
                "{\"msgs_per_s\":" + std::to_string(msgs / ns * 1e9) + "}");
}

// ---- W4S: the same echo reading whole messages (async_read / async_write) -------------------
awaitable<void> exact_echo(tcp::socket s) {
  char buf[message];
  for (;;) {
    boost::system::error_code ec;
    co_await asio::async_read(s, asio::buffer(buf), asio::redirect_error(use_awaitable, ec));
    if (ec) break;  // eof
    co_await asio::async_write(s, asio::buffer(buf), use_awaitable);
  }
}

awaitable<void> exact_serve(tcp::acceptor& acceptor) {
  for (int i = 0; i < clients; ++i) {
    tcp::socket s = co_await acceptor.async_accept(use_awaitable);
    s.set_option(tcp::no_delay(true));
    asio::co_spawn(acceptor.get_executor(), exact_echo(std::move(s)), asio::detached);
  }
}

awaitable<void> w4s(long rounds) {
  auto ex = co_await asio::this_coro::executor;
  tcp::acceptor acceptor(ex, tcp::endpoint(asio::ip::address_v4::loopback(), 0));
  const tcp::endpoint ep = acceptor.local_endpoint();
  int remaining = clients;
  asio::steady_timer done(ex, asio::steady_timer::time_point::max());
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  asio::co_spawn(ex, exact_serve(acceptor), asio::detached);
  for (int i = 0; i < clients; ++i)
    asio::co_spawn(ex, client(ep, rounds), [&](std::exception_ptr e) {
      if (e) std::rethrow_exception(e);
      if (--remaining == 0) done.cancel();
    });
  co_await wait_cancelled(done);
  auto t1 = bench::clock::now();
  const double msgs = double(clients) * double(rounds);
  const double ns = bench::ns_between(t0, t1);
  bench::report("W4S", impl, rounds, ns / msgs, double(allocs.allocs()) / msgs,
                "{\"msgs_per_s\":" + std::to_string(msgs / ns * 1e9) + "}", "async_read / async_write of whole messages");
}

// ---- W5: co_spawn the function onto a thread_pool, awaited from the io_context --------------
int trivial(int x) { return x + 1; }

awaitable<void> w5(long n, asio::thread_pool& pool) {
  co_await asio::co_spawn(pool, []() -> awaitable<int> { co_return trivial(0); }, use_awaitable);
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  long sum = 0;
  for (long i = 0; i < n; ++i)
    sum += co_await asio::co_spawn(pool, [i]() -> awaitable<int> { co_return trivial(static_cast<int>(i & 1)); }, use_awaitable);
  auto t1 = bench::clock::now();
  if (sum != n + n / 2) throw std::runtime_error("W5: wrong sum");
  bench::report("W5", impl, n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n), "{}",
                "co_spawn(thread_pool, fn, use_awaitable)");
}

// ---- W6 ---------------------------------------------------------------------------------------
awaitable<void> sleeper(long us) {
  asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::microseconds(us));
  co_await t.async_wait(use_awaitable);
}

awaitable<void> w6(long n) {
  auto ex = co_await asio::this_coro::executor;
  const auto delays = bench::timer_delays_us(n);
  long last = 0;
  for (long d : delays) last = std::max(last, d);
  long remaining = n;
  asio::steady_timer done(ex, asio::steady_timer::time_point::max());
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  for (long d : delays)
    asio::co_spawn(ex, sleeper(d), [&](std::exception_ptr e) {
      if (e) std::rethrow_exception(e);
      if (--remaining == 0) done.cancel();
    });
  co_await wait_cancelled(done);
  auto t1 = bench::clock::now();
  const double overshoot_ms = (bench::ns_between(t0, t1) - double(last) * 1e3) / 1e6;
  bench::report("W6", impl, n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n),
                "{\"overshoot_ms\":" + std::to_string(overshoot_ms) + "}", "one steady_timer per coroutine");
}

// ---- M1: idle coroutines blocked on one never-expiring steady_timer (Asio's event) -----------
awaitable<void> idle(asio::steady_timer& gate) { co_await wait_cancelled(gate); }

awaitable<void> m1(long n) {
  auto ex = co_await asio::this_coro::executor;
  asio::steady_timer gate(ex, asio::steady_timer::time_point::max());
  long remaining = n;
  asio::steady_timer done(ex, asio::steady_timer::time_point::max());
  co_await asio::post(ex, use_awaitable);
  bench::alloc_scope allocs;
  const long before = bench::resident_bytes();
  for (long i = 0; i < n; ++i)
    asio::co_spawn(ex, idle(gate), [&](std::exception_ptr) {
      if (--remaining == 0) done.cancel();
    });
  co_await asio::post(ex, use_awaitable);  // every coroutine has started and waits on the gate
  co_await asio::post(ex, use_awaitable);
  const long after = bench::resident_bytes();
  const double heap = double(allocs.bytes()) / double(n);
  const double per_op_allocs = double(allocs.allocs()) / double(n);
  gate.cancel();
  co_await wait_cancelled(done);
  bench::report("M1", impl, n, double(after - before) / double(n), per_op_allocs,
                "{\"heap_bytes_per_task\":" + std::to_string(heap) + "}", "idle coroutines wait on one steady_timer");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s W1..W6|M1 N\n", argv[0]);
    return 2;
  }
  const std::string w = argv[1];
  const long n = std::atol(argv[2]);
  asio::io_context ctx(1);
  asio::thread_pool pool;  // default size, as asyncio and our default executor pick theirs
  std::optional<awaitable<void>> body;
  if (w == "W1") body.emplace(w1(n));
  else if (w == "W2") body.emplace(w2(n));
  else if (w == "W3") body.emplace(w3(n));
  else if (w == "W4") body.emplace(w4(n));
  else if (w == "W4S") body.emplace(w4s(n));
  else if (w == "W5") body.emplace(w5(n, pool));
  else if (w == "W6") body.emplace(w6(n));
  else if (w == "M1") body.emplace(m1(n));
  else if (w == "W1L") body.emplace(w1_lazy(n));
  else if (w == "M1L") body.emplace(m1_lazy(n));
  else {
    std::fprintf(stderr, "unknown workload %s\n", w.c_str());
    return 2;
  }
  asio::co_spawn(ctx, std::move(*body), [](std::exception_ptr e) {
    if (e) std::rethrow_exception(e);
  });
  ctx.run();
  pool.join();
}
