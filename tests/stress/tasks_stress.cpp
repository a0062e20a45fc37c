// A million tasks alive at once, then a million gathered: every one ends, nothing is left.
#include "stress_common.hpp"

#include <vector>

using namespace codestare::async_utils;
using namespace std::chrono_literals;

namespace {

coroutine<void> yielder(long& finished, long total, future<void>& all_done) {
  co_await sleep(0s);
  co_await sleep(0s);
  if (++finished == total) all_done.set_result();
}

coroutine<long> value(long i) {
  if (i % 2) co_await sleep(0s);
  co_return i;
}

}  // namespace

int main(int argc, char** argv) {
  stress::fail_on_library_errors();
  const long n = stress::quick(argc, argv) ? 100000 : 1000000;
  const int fds_before = stress::open_fds();

  {
    stress::stopwatch watch;
    long finished = 0;
    run([&]() -> coroutine<void> {
      auto all_done = event_loop::current().create_future<void>();
      for (long i = 0; i < n; ++i) create_task(yielder(finished, n, all_done));  // no handle kept
      STRESS_CHECK(static_cast<long>(all_tasks().size()) == n + 1);
      co_await all_done;
      co_await sleep(0s);  // the last task returns after setting the future
      STRESS_CHECK(all_tasks().size() == 1);
    }());
    STRESS_CHECK(finished == n);
    stress::report("tasks: alive at once", std::to_string(n) + " tasks, each yielding twice", watch);
  }

  {
    stress::stopwatch watch;
    long sum = 0;
    run([&]() -> coroutine<void> {
      std::vector<coroutine<long>> coros;
      coros.reserve(static_cast<std::size_t>(n));
      for (long i = 0; i < n; ++i) coros.push_back(value(i));
      auto results = co_await gather(std::move(coros));
      STRESS_CHECK(static_cast<long>(results.size()) == n);
      for (long i = 0; i < n; ++i) {
        STRESS_CHECK(results[static_cast<std::size_t>(i)] == i);
        sum += results[static_cast<std::size_t>(i)];
      }
      STRESS_CHECK(all_tasks().size() == 1);
    }());
    STRESS_CHECK(sum == n * (n - 1) / 2);
    stress::report("tasks: gather", std::to_string(n) + " tasks gathered", watch);
  }

  STRESS_CHECK(stress::open_fds() == fds_before);
  return 0;
}
