// W2 for async_utils: two tasks alternate through one condition, N round trips.
// Needs `condition` (src/sync); until that lands this file does not compile and the driver
// prints "n/a (pending)". Usage: au_bench_condition W2 N
#include "async_utils.hpp"
#include "bench_common.hpp"

namespace au = codestare::async_utils;
using au::coroutine;

namespace {

// Each side waits for its turn, hands the turn over and notifies: one round trip is A -> B -> A.
coroutine<void> side(au::condition& c, int& turn, int me, long rounds) {
  for (long i = 0; i < rounds; ++i) {
    auto guard = co_await c.scoped();
    co_await c.wait_for([&] { return turn == me; });
    turn = 1 - me;
    c.notify();
  }
}

coroutine<void> w2(long n) {
  au::condition c;
  int turn = 0;
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  auto a = au::create_task(side(c, turn, 0, n));
  auto b = au::create_task(side(c, turn, 1, n));
  co_await a;
  co_await b;
  auto t1 = bench::clock::now();
  bench::report("W2", "async_utils", n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || std::string(argv[1]) != "W2") {
    std::fprintf(stderr, "usage: %s W2 N\n", argv[0]);
    return 2;
  }
  au::run(w2(std::atol(argv[2])));
}
