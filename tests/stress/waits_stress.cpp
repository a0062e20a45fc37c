// 100,000 tasks waiting on a mix of descriptors, timers, futures, tasks and wait_for; some are
// woken normally, then all are cancelled in a random order (fixed seed). Every task must end
// (normally or cancelled, as its wait allows), nothing may be left: no task, no descriptor.
#include "stress_common.hpp"

#include <algorithm>
#include <random>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

using namespace codestare::async_utils;
using namespace std::chrono_literals;

namespace {

enum kind : int { fd_wait, timer, fut, fut_wait_for, task_wait, kinds };
const char* const kind_names[kinds] = {"fd", "timer", "future", "wait_for", "task"};

struct tally {
  long normal[kinds] = {};
  long cancelled[kinds] = {};
};

coroutine<int> waiter(kind k, int fd, future<int> f, task<int> other) {
  switch (k) {
    case fd_wait: co_await wait_readable(fd); co_return 1;
    case timer: co_await sleep(f ? 1ms : 1h); co_return 1;  // a future handle marks a short timer
    case fut: co_return co_await f;
    case fut_wait_for: co_return co_await wait_for(f, 1h);
    case task_wait: co_return co_await other;
    default: co_return 0;
  }
}

}  // namespace

int main(int argc, char** argv) {
  stress::fail_on_library_errors();
  const int n = stress::quick(argc, argv) ? 20000 : 100000;
  constexpr int pairs = 64;
  const int fds_before = stress::open_fds();
  stress::stopwatch watch;
  tally t;

  run([&]() -> coroutine<void> {
    event_loop& loop = event_loop::current();
    int sp[pairs][2];
    for (auto& p : sp) STRESS_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, p) == 0);
    std::mt19937 rng(20240601);
    std::vector<task<int>> tasks;
    std::vector<kind> kinds_of;
    std::vector<future<int>> futures;  // those of fut / fut_wait_for tasks
    std::vector<bool> may_finish;      // woken normally before its cancellation could land
    tasks.reserve(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      auto k = static_cast<kind>(rng() % kinds);
      if (k == task_wait && tasks.empty()) k = timer;
      future<int> f;
      task<int> other;
      int fd = sp[rng() % pairs][0];
      if (k == fut || k == fut_wait_for) {
        f = loop.create_future<int>();
        futures.push_back(f);
      }
      if (k == timer && rng() % 10 == 0) f = loop.create_future<int>();  // short timer
      if (k == task_wait) other = tasks[rng() % tasks.size()];
      tasks.push_back(create_task(waiter(k, fd, f, other)));
      kinds_of.push_back(k);
    }
    co_await sleep(0s);  // every task now waits
    STRESS_CHECK(static_cast<int>(all_tasks().size()) == n + 1);

    // Wake some normally: a quarter of the futures get a result, a few descriptors a byte.
    for (std::size_t i = 0; i < futures.size(); i += 4) futures[i].set_result(1);
    for (int p = 0; p < pairs; p += 8) STRESS_CHECK(::write(sp[p][1], "x", 1) == 1);
    co_await sleep(2ms);  // short timers may or may not have fired: both outcomes are checked

    // Cancel everything in a random order, letting the loop run now and then in between.
    std::vector<std::size_t> order(tasks.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    for (std::size_t j = 0; j < order.size(); ++j) {
      tasks[order[j]].cancel();
      if (j % 1000 == 999) co_await sleep(0s);
    }
    for (auto& task : tasks) co_await wait_done(task);

    for (std::size_t i = 0; i < tasks.size(); ++i) {
      auto& task = tasks[i];
      STRESS_CHECK(task.done());
      if (task.cancelled()) {
        ++t.cancelled[kinds_of[i]];
      } else {
        STRESS_CHECK(task.result() == 1);  // never an exception other than cancellation
        ++t.normal[kinds_of[i]];
      }
    }
    for (auto& p : sp) {
      ::close(p[0]);
      ::close(p[1]);
    }
    STRESS_CHECK(all_tasks().size() == 1);
  }());

  STRESS_CHECK(stress::open_fds() == fds_before);
  long total = 0, normal = 0;
  std::string counts;
  for (int k = 0; k < kinds; ++k) {
    total += t.normal[k] + t.cancelled[k];
    normal += t.normal[k];
    counts += std::string(k ? ", " : "") + kind_names[k] + " " + std::to_string(t.normal[k]) + "+" + std::to_string(t.cancelled[k]);
  }
  STRESS_CHECK(total == n);
  STRESS_CHECK(normal > 0 && normal < n);  // both outcomes were exercised
  stress::report("waits: mixed, cancelled", std::to_string(n) + " tasks (normal+cancelled: " + counts + ")", watch);
  return 0;
}
