// The composition matrix (issue 13 item 1): every awaitable a primitive returns, awaited
// directly and through create_task, task_nursery::create_task, gather, shield and wait_for.
// Nothing but tests lives here; the awaiters are movable until they park (waiter.hpp).
#pragma once

#include "../runtime/gather.hpp"
#include "../runtime/shield.hpp"
#include "../primitives/condition.hpp"
#include "../primitives/event.hpp"
#include "../primitives/lock.hpp"
#include "../primitives/queue.hpp"
#include "../primitives/semaphore.hpp"
#include "task_nursery.hpp"

#ifdef ASYNC_UTILS_TESTS
namespace codestare::async_utils::testing::composition {
using namespace std::chrono_literals;

// Each case: setup() makes blocked() wait; release() lets it finish; cleanup() checks and
// undoes what the finished wait did; after_timeout() checks the primitive is as if the
// cancelled wait had never been made.
struct event_case {
  static constexpr const char* name = "event.wait()";
  event ev;
  coroutine<void> setup() { co_return; }
  auto blocked() { return ev.wait(); }
  coroutine<void> release() {
    ev.set();
    co_return;
  }
  coroutine<void> cleanup() { co_return; }
  coroutine<void> after_timeout() {
    CHECK_FALSE(ev.is_set());
    co_return;
  }
};

template <bool Scoped>
struct lock_case {
  lock lk;
  coroutine<void> setup() { co_await lk.acquire(); }  // held by someone else
  auto blocked() {
    if constexpr (Scoped) return lk.scoped();
    else return lk.acquire();
  }
  coroutine<void> release() {
    lk.release();
    co_return;
  }
  coroutine<void> cleanup() {
    if constexpr (Scoped) {
      CHECK_FALSE(lk.locked());  // the guard, dropped with the result, released it
    } else {
      CHECK(lk.locked());
      lk.release();
    }
    co_return;
  }
  coroutine<void> after_timeout() {
    CHECK(lk.locked());  // still the holder's, not ours
    lk.release();
    co_await sleep(0s);
    CHECK_FALSE(lk.locked());  // nobody else was promised it
  }
};

template <bool Scoped>
struct semaphore_case {
  semaphore sem{1};
  coroutine<void> setup() { co_await sem.acquire(); }
  auto blocked() {
    if constexpr (Scoped) return sem.scoped();
    else return sem.acquire();
  }
  coroutine<void> release() {
    sem.release();
    co_return;
  }
  coroutine<void> cleanup() {
    if constexpr (Scoped) {
      CHECK_FALSE(sem.locked());
    } else {
      CHECK(sem.locked());
      sem.release();
    }
    co_return;
  }
  coroutine<void> after_timeout() {
    CHECK(sem.locked());
    sem.release();
    co_await sleep(0s);
    CHECK_FALSE(sem.locked());  // the unit is free: not consumed by the cancelled wait
    co_await sem.acquire();
    sem.release();
  }
};

struct queue_get_case {
  queue<int> q;
  coroutine<void> setup() { co_return; }
  auto blocked() { return q.get(); }
  coroutine<void> release() {
    q.put_nowait(1);
    co_return;
  }
  coroutine<void> cleanup() {
    CHECK(q.empty());
    co_return;
  }
  coroutine<void> after_timeout() {
    q.put_nowait(7);
    co_await sleep(0s);
    CHECK(q.qsize() == 1);  // no item lost to the cancelled getter
    CHECK(q.get_nowait() == 7);
  }
};

struct queue_put_case {
  queue<int> q{1};
  coroutine<void> setup() {
    q.put_nowait(1);
    co_return;
  }
  auto blocked() { return q.put(2); }
  coroutine<void> release() {
    CHECK(q.get_nowait() == 1);
    co_return;
  }
  coroutine<void> cleanup() {
    CHECK(q.get_nowait() == 2);
    co_return;
  }
  coroutine<void> after_timeout() {
    CHECK(q.get_nowait() == 1);
    co_await sleep(0s);
    CHECK(q.empty());  // the cancelled put put nothing
  }
};

struct queue_join_case {
  queue<int> q;
  coroutine<void> setup() {
    q.put_nowait(1);
    co_return;
  }
  auto blocked() { return q.join(); }
  coroutine<void> release() {
    q.get_nowait();
    q.task_done();
    co_return;
  }
  coroutine<void> cleanup() { co_return; }
  coroutine<void> after_timeout() {
    CHECK(q.qsize() == 1);
    co_return;
  }
};

template <bool Predicate>
struct condition_case {
  condition cond;
  bool flag = false;
  coroutine<void> setup() { co_await cond.acquire(); }  // the waiter runs with it held
  auto blocked() {
    if constexpr (Predicate) return cond.wait_for([this] { return flag; });
    else return cond.wait();
  }
  coroutine<void> release() {
    co_await cond.acquire();
    flag = true;
    cond.notify_all();
    cond.release();
  }
  coroutine<void> cleanup() {
    CHECK(cond.locked());  // the waiter got the lock back
    cond.release();
    co_return;
  }
  coroutine<void> after_timeout() {
    CHECK(cond.locked());  // cancelled, it still took the lock back (asyncio does the same)
    cond.release();
    co_return;
  }
};

enum class via { direct, create_task, nursery, gather, shield, wait_for_max };

/// Awaits `aw` and drops what it yields (a scoped() guard is [[nodiscard]]).
template <class A>
coroutine<void> discard(A aw) {
  if constexpr (std::is_void_v<await_result_t<A>>) {
    co_await std::move(aw);
  } else {
    auto result = co_await std::move(aw);
    (void)result;
  }
}

template <class C>
coroutine<void> await_directly(C& c) {
  co_await discard(c.blocked());
}

/// Starts c.blocked() through `how` as a task (so it can be watched), lets it park, releases.
template <class C>
coroutine<void> run_through(via how) {
  C c;
  co_await c.setup();
  {
    task_nursery n("composition");
    any_task t;
    switch (how) {
      case via::direct: t = create_task(await_directly(c)); break;
      case via::create_task: t = create_task(c.blocked()); break;
      case via::nursery: t = n.create_task(c.blocked()); break;
      case via::gather: t = gather(c.blocked()); break;
      case via::shield: t = create_task(shield(c.blocked())); break;
      case via::wait_for_max: t = create_task(wait_for(c.blocked(), std::chrono::steady_clock::duration::max())); break;
    }
    co_await sleep(0s);
    co_await sleep(0s);
    CHECK_FALSE(t.done());
    co_await c.release();
    co_await wait_done(t);
    CHECK_FALSE(t.cancelled());
    CHECK(t.exception() == nullptr);
    t = any_task();
    co_await sleep(0s);  // gather's children and shield's inner task let go of their results
    co_await stop_task(n.sentinel_task());
  }
  co_await c.cleanup();
}

/// wait_for(c.blocked(), timeout) times out; the primitive is as if never called.
template <class C, class D>
coroutine<void> time_out(D timeout) {
  C c;
  co_await c.setup();
  bool timed_out = false;
  try {
    co_await discard(wait_for(c.blocked(), timeout));
  } catch (const timeout_error&) {
    timed_out = true;
  }
  CHECK(timed_out);
  co_await c.after_timeout();
}

/// Destroys the case (and its primitive) while a task waits on it, parked or already woken
/// (issue 12 items 4-5): the wait ends with cancelled_error, or returns if it needed nothing
/// more of the primitive, and nothing touches the dead object (ASan).
template <class C>
coroutine<void> destroy_while_waiting(bool woken) {
  auto c = std::make_unique<C>();
  co_await c->setup();
  any_task t = create_task(c->blocked());
  co_await sleep(0s);
  co_await sleep(0s);
  if (woken) co_await c->release();
  c.reset();
  co_await wait_done(t);
  if (!woken) CHECK(t.cancelled());
  if (!t.cancelled()) CHECK(t.exception() == nullptr);
}

struct primitives {
  semaphore sem{0};
  queue<int> q;
  lock lk;
};

/// Owns the primitives in its frame; wakes one waiter of each, which never gets to run.
inline coroutine<void> own_primitives(future<primitives*> ready) {
  primitives p;
  co_await p.lk.acquire();
  ready.set_result(&p);
  co_await sleep(0s);
  co_await sleep(0s);
  p.sem.release();
  p.q.put_nowait(1);
  p.lk.release();
  co_await sleep(1h);
}

inline coroutine<void> wait_on_primitives(future<primitives*> ready, int which) {
  primitives* p = co_await ready;
  if (which == 0) co_await p->lk.acquire();
  if (which == 1) co_await p->sem.acquire();
  if (which == 2) co_await p->q.get();
}

}  // namespace codestare::async_utils::testing::composition

TEST_SUITE("composition") {
  using namespace codestare::async_utils;
  using namespace codestare::async_utils::testing::composition;
  using namespace std::chrono_literals;

  TEST_CASE_TEMPLATE("every primitive awaitable composes with every combinator", C, event_case, lock_case<false>, lock_case<true>,
                     semaphore_case<false>, semaphore_case<true>, queue_get_case, queue_put_case, queue_join_case,
                     condition_case<false>, condition_case<true>) {
    for (via how : {via::direct, via::create_task, via::nursery, via::gather, via::shield, via::wait_for_max}) {
      CAPTURE(static_cast<int>(how));
      testing::run_bounded(run_through<C>(how));
    }
    testing::run_bounded(time_out<C>(0s));
    testing::run_bounded(time_out<C>(1ms));
  }

  TEST_CASE_TEMPLATE("destroying a primitive ends the waits on it with cancelled_error", C, event_case, lock_case<false>,
                     semaphore_case<false>, queue_get_case, queue_put_case, queue_join_case, condition_case<false>,
                     condition_case<true>) {
    testing::run_bounded(destroy_while_waiting<C>(false));
    testing::run_bounded(destroy_while_waiting<C>(true));
  }

  // The primitives live in one pending task's frame, their waiters in others: loop.close()
  // destroys the frames in its own order (creation order); both orders are tried (issue 12 item 4).
  TEST_CASE("loop.close() with pending tasks never lets a waiter reach a destroyed primitive") {
    for (bool owner_first : {true, false}) {
      CAPTURE(owner_first);
      testing::log_capture quiet;
      event_loop loop;
      auto ready = loop.create_future<primitives*>();
      std::vector<any_task> tasks;
      if (owner_first) tasks.push_back(loop.create_task(own_primitives(ready)));
      for (int i = 0; i < 6; ++i) tasks.push_back(loop.create_task(wait_on_primitives(ready, i % 3)));
      if (!owner_first) tasks.push_back(loop.create_task(own_primitives(ready)));
      for (int i = 0; i < 4; ++i) loop.run_until_complete(sleep(0s));
      loop.close();
      for (auto& t : tasks) CHECK(t.done());
    }
  }

  TEST_CASE("task_nursery::sentinel_task() is a handle that can be cancelled (issue 13 item 5)") {
    testing::run_bounded([]() -> coroutine<void> {
      task_nursery n("sentinel-handle");
      auto child = n.create_task(sleep(1h));
      co_await sleep(0s);
      CHECK(n.sentinel_task().cancel());  // a temporary handle: cancel() shuts the nursery down
      co_await wait_done(child);
      CHECK(child.cancelled());
      for (int i = 0; i < 10 && !n.closed(); ++i) co_await sleep(0s);
      CHECK(n.closed());
      CHECK_FALSE(n.sentinel_task());
    }());
  }
}
#endif
