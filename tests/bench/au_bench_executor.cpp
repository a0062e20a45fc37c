// W5 for async_utils: N sequential run_in_executor round trips of a trivial function.
// Needs event_loop::run_in_executor (the executor part); until that lands this file does not
// compile and the driver prints "n/a (pending)". Usage: au_bench_executor W5 N
#include "async_utils.hpp"
#include "bench_common.hpp"

namespace au = codestare::async_utils;
using au::coroutine;

namespace {

int trivial(int x) { return x + 1; }

coroutine<void> w5(long n) {
  auto& loop = au::event_loop::current();
  co_await loop.run_in_executor([] { return trivial(0); });  // start the pool outside the timing
  bench::alloc_scope allocs;
  auto t0 = bench::clock::now();
  long sum = 0;
  for (long i = 0; i < n; ++i) sum += co_await loop.run_in_executor([i] { return trivial(static_cast<int>(i & 1)); });
  auto t1 = bench::clock::now();
  if (sum != n + n / 2) throw std::runtime_error("W5: wrong sum");
  bench::report("W5", "async_utils", n, bench::ns_between(t0, t1) / double(n), double(allocs.allocs()) / double(n));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || std::string(argv[1]) != "W5") {
    std::fprintf(stderr, "usage: %s W5 N\n", argv[0]);
    return 2;
  }
  au::run(w5(std::atol(argv[2])));
}
