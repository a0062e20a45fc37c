// The synchronisation primitives under load (built by `make stress` once
// src/primitives/condition.hpp exists): 100,000 tasks waiting on conditions, events, queues and
// locks, some woken normally, all cancelled in a random order (fixed seed); then producers and
// consumers through a bounded queue. Every task ends, every lock ends released, nothing is left.
#include "stress_common.hpp"

#include <algorithm>
#include <memory>
#include <random>
#include <vector>

using namespace codestare::async_utils;
using namespace std::chrono_literals;

namespace {

enum kind : int { cond_wait, event_wait, queue_get, queue_put, lock_wait, kinds };
const char* const kind_names[kinds] = {"condition", "event", "queue.get", "queue.put", "lock"};

struct shared {
  static constexpr int groups = 64;
  condition conds[groups];
  int cond_flags[groups] = {};
  event events[groups];
  queue<int> empty_queue;     // getters wait
  queue<int> full_queue{1};   // putters wait
  lock held;                  // acquirers wait
};

coroutine<int> waiter(kind k, int g, shared& s) {
  switch (k) {
    case cond_wait: {
      auto guard = co_await s.conds[g].scoped();
      co_await s.conds[g].wait_for([&s, g] { return s.cond_flags[g] != 0; });
      co_return 1;
    }
    case event_wait: co_await s.events[g].wait(); co_return 1;
    case queue_get: co_return co_await s.empty_queue.get();
    case queue_put: co_await s.full_queue.put(1); co_return 1;
    case lock_wait: {
      auto guard = co_await s.held.scoped();
      co_return 1;
    }
    default: co_return 0;
  }
}

coroutine<void> notify(condition& c, int& flag) {
  auto guard = co_await c.scoped();
  flag = 1;
  c.notify_all();
}

coroutine<void> producer(queue<long>& q, long first, long count) {
  for (long i = first; i < first + count; ++i) co_await q.put(i);
}

coroutine<void> consumer(queue<long>& q, long& sum) {
  for (;;) {
    sum += co_await q.get();
    q.task_done();
  }
}

}  // namespace

int main(int argc, char** argv) {
  stress::fail_on_library_errors();
  const int n = stress::quick(argc, argv) ? 20000 : 100000;
  const int fds_before = stress::open_fds();

  {
    stress::stopwatch watch;
    long normal[kinds] = {}, cancelled[kinds] = {};
    run([&]() -> coroutine<void> {
      auto s = std::make_unique<shared>();
      s->full_queue.put_nowait(0);
      co_await s->held.acquire();
      std::mt19937 rng(20240602);
      std::vector<task<int>> tasks;
      std::vector<kind> kinds_of;
      for (int i = 0; i < n; ++i) {
        auto k = static_cast<kind>(rng() % kinds);
        tasks.push_back(create_task(waiter(k, static_cast<int>(rng() % shared::groups), *s)));
        kinds_of.push_back(k);
      }
      co_await sleep(0s);
      // Wake some normally: an eighth of the conditions and events, a few queue items and slots.
      for (int g = 0; g < shared::groups; g += 8) {
        co_await notify(s->conds[g], s->cond_flags[g]);
        s->events[g].set();
      }
      for (int i = 0; i < 100; ++i) s->empty_queue.put_nowait(1);
      for (int i = 0; i < 10; ++i) {
        (void)s->full_queue.get_nowait();
        co_await sleep(0s);  // a waiting putter fills the slot again
      }
      std::vector<std::size_t> order(tasks.size());
      for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
      std::shuffle(order.begin(), order.end(), rng);
      for (std::size_t j = 0; j < order.size(); ++j) {
        tasks[order[j]].cancel();
        if (j % 1000 == 999) co_await sleep(0s);
      }
      for (auto& t : tasks) co_await wait_done(t);
      for (std::size_t i = 0; i < tasks.size(); ++i) {
        if (tasks[i].cancelled()) {
          ++cancelled[kinds_of[i]];
        } else {
          STRESS_CHECK(tasks[i].result() == 1);
          ++normal[kinds_of[i]];
        }
      }
      s->held.release();
      for (auto& c : s->conds) STRESS_CHECK(!c.locked());  // cancelled waiters gave the lock back
      STRESS_CHECK(!s->held.locked());
      STRESS_CHECK(all_tasks().size() == 1);
    }());
    std::string counts;
    long total = 0;
    for (int k = 0; k < kinds; ++k) {
      total += normal[k] + cancelled[k];
      counts += std::string(k ? ", " : "") + kind_names[k] + " " + std::to_string(normal[k]) + "+" + std::to_string(cancelled[k]);
    }
    STRESS_CHECK(total == n);
    stress::report("primitives: waits, cancelled", std::to_string(n) + " tasks (normal+cancelled: " + counts + ")", watch);
  }

  {
    stress::stopwatch watch;
    const long producers = 100, per_producer = n / 10;
    long sum = 0;
    run([&]() -> coroutine<void> {
      queue<long> q(16);
      std::vector<task<void>> consumers, prods;
      for (int c = 0; c < 100; ++c) consumers.push_back(create_task(consumer(q, sum)));
      for (long p = 0; p < producers; ++p) prods.push_back(create_task(producer(q, p * per_producer, per_producer)));
      for (auto& p : prods) co_await p;
      co_await q.join();
      for (auto& c : consumers) c.cancel();
      for (auto& c : consumers) co_await wait_done(c);
      STRESS_CHECK(q.empty());
    }());
    const long items = producers * per_producer;
    STRESS_CHECK(sum == items * (items - 1) / 2);
    stress::report("primitives: queue(16)", std::to_string(items) + " items, 100 producers, 100 consumers", watch);
  }

  STRESS_CHECK(stress::open_fds() == fds_before);
  return 0;
}
