// event: asyncio.Event, a flag that tasks can wait to see set.
#pragma once

#include "../platform/config.hpp"
#include "../platform/log.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/intrusive_list.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/run.hpp"
#include "waiter.hpp"

#include <coroutine>

namespace codestare::async_utils {

class event;

namespace detail {

/// co_await event.wait(): returns at once when set, else parks until set() wakes everyone.
struct event_wait : parked_task {
  event* ev;

  explicit event_wait(event& e) noexcept : ev(&e) {}
  bool await_ready() const noexcept;
  void await_suspend(std::coroutine_handle<> h);
  bool await_resume() {
    if (task) {
      unlink();
      check_cancelled();
    }
    return true;
  }
};

}  // namespace detail

/// asyncio.Event: set() wakes every waiter; clear() resets the flag. A waiter woken by set()
/// returns even if clear() follows before it runs. Loop thread only.
class event {
 public:
  event() noexcept = default;
  event(const event&) = delete;
  event& operator=(const event&) = delete;
  /// Waits still parked end with cancelled_error.
  ~event() { detail::abandon_all(waiters_); }

  /// Event.set(): sets the flag and wakes all waiters (they run on later iterations).
  void set();
  /// Event.clear().
  void clear() noexcept { flag_ = false; }
  /// Event.is_set().
  bool is_set() const noexcept { return flag_; }
  /// Event.wait(): `co_await ev.wait()` yields true once the flag is (or was) set.
  [[nodiscard]] detail::event_wait wait() noexcept { return detail::event_wait(*this); }

 private:
  friend struct detail::event_wait;
  bool flag_ = false;
  detail::intrusive_list<detail::parked_task> waiters_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void event::set() {
  if (flag_) return;
  flag_ = true;
  while (detail::parked_task* w = waiters_.pop_front()) w->wake_up();
}
#endif  // ASYNC_UTILS_DEFINITIONS

namespace detail {

inline bool event_wait::await_ready() const noexcept { return ev->flag_; }

inline void event_wait::await_suspend(std::coroutine_handle<> h) {
  bind("event.wait()");
  cancel = &withdraw_hook;
  park(ev->waiters_, h);
}

}  // namespace detail
}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("event") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("set, clear, is_set, and wait returning at once when set") {
    event ev;
    CHECK_FALSE(ev.is_set());
    ev.set();
    CHECK(ev.is_set());
    ev.set();  // idempotent
    testing::run_bounded([&]() -> coroutine<void> { CHECK(co_await ev.wait()); }());
    ev.clear();
    CHECK_FALSE(ev.is_set());
  }

  TEST_CASE("set wakes every waiter, in FIFO order, even if cleared before they run") {
    event ev;
    std::vector<int> order;
    auto waiter = [](event& e, std::vector<int>& log, int id) -> coroutine<void> {
      CHECK(co_await e.wait());
      log.push_back(id);
    };
    testing::run_bounded([&]() -> coroutine<void> {
      std::vector<task<void>> tasks;
      for (int i = 1; i <= 3; ++i) tasks.push_back(create_task(waiter(ev, order, i)));
      co_await sleep(0s);
      co_await sleep(0s);
      CHECK(order.empty());
      ev.set();
      ev.clear();
      for (auto& t : tasks) co_await t;
      CHECK(order == std::vector<int>{1, 2, 3});
      CHECK_FALSE(ev.is_set());
      auto late = create_task(waiter(ev, order, 4));  // cleared: waits again
      co_await sleep(0s);
      CHECK_FALSE(late.done());
      ev.set();
      co_await late;
      CHECK(order.back() == 4);
    }());
  }

  TEST_CASE("a cancelled waiter leaves; one cancelled after set() still throws cancelled_error") {
    event ev;
    std::vector<int> order;
    auto waiter = [](event& e, std::vector<int>& log, int id) -> coroutine<void> {
      co_await e.wait();
      log.push_back(id);
    };
    testing::run_bounded([&]() -> coroutine<void> {
      auto t1 = create_task(waiter(ev, order, 1));
      auto t2 = create_task(waiter(ev, order, 2));
      auto t3 = create_task(waiter(ev, order, 3));
      co_await sleep(0s);
      t1.cancel();
      co_await wait_done(t1);
      CHECK(t1.cancelled());
      ev.set();
      t2.cancel();  // woken, not yet resumed
      co_await wait_done(t2);
      CHECK(t2.cancelled());
      co_await t3;
      CHECK(order == std::vector<int>{3});
    }());
  }
}
#endif
