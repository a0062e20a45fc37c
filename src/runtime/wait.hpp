// wait(handles, {.timeout, .return_when}): asyncio.wait. Waits until the condition holds or the
// timeout passes and returns the handles split into done and pending; it cancels nothing and
// raises nothing of the children's.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "test_support.hpp"
#include "timer_heap.hpp"
#include "future_core.hpp"
#include "any_task.hpp"
#include "handle.hpp"
#include "event_loop.hpp"
#include "awaitable.hpp"
#include "future.hpp"
#include "coroutine.hpp"
#include "sleep.hpp"
#include "completion.hpp"
#include "task.hpp"

#if ASYNC_UTILS_DEFINITIONS
#include <algorithm>
#endif
#include <chrono>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

namespace codestare::async_utils {

/// asyncio's FIRST_COMPLETED, FIRST_EXCEPTION and ALL_COMPLETED: when wait() returns.
enum class return_when_t { first_completed, first_exception, all_completed };
/// Return as soon as one is done (or cancelled).
inline constexpr return_when_t first_completed = return_when_t::first_completed;
/// Return when one ends with an exception (a cancellation does not count), else when all are done.
inline constexpr return_when_t first_exception = return_when_t::first_exception;
/// Return when all are done (the default).
inline constexpr return_when_t all_completed = return_when_t::all_completed;

/// A timeout in any std::chrono unit, or none (std::nullopt, the default): the `timeout=None`
/// of asyncio's wait and as_completed. Saturates: a negative one counts as zero, and
/// duration::max() (or anything the clock cannot hold) as none.
class optional_timeout {
 public:
  constexpr optional_timeout() noexcept = default;
  constexpr optional_timeout(std::nullopt_t) noexcept {}
  template <class Rep, class Period>
  constexpr optional_timeout(std::chrono::duration<Rep, Period> d) noexcept {
    const auto c = detail::to_clock_duration(d);
    if (c != detail::clock::duration::max()) value_ = std::max(c, detail::clock::duration::zero());
  }
  /// The timeout, std::nullopt for none.
  constexpr const std::optional<detail::clock::duration>& value() const noexcept { return value_; }

 private:
  std::optional<detail::clock::duration> value_;
};

/// wait()'s keyword arguments.
struct wait_options {
  optional_timeout timeout{};
  return_when_t return_when = all_completed;
};

/// What wait() yields: the handles that are done and those still pending, each in the order
/// they were given (asyncio returns two sets).
template <class H>
struct wait_result {
  std::vector<H> done;
  std::vector<H> pending;
};

namespace detail {

template <class H>
inline constexpr bool is_wait_handle = is_future_handle<H>::value || std::is_same_v<H, any_task>;

template <class H>
future_core* core_of(const H& h) {
  if constexpr (std::is_same_v<H, any_task>) return h.core_ptr();
  else return h ? h.state_ptr() : nullptr;
}

/// The handles of `range`, copied from an lvalue range, moved from an rvalue one; duplicates
/// (asyncio takes a set) keep their first place.
template <class H, class R>
std::vector<H> unique_handles(R&& range, const char* what) {
  std::vector<H> out;
  std::unordered_set<future_core*> seen;
  for (auto&& h : range) {
    future_core* core = core_of(h);
    if (!core) throw std::invalid_argument(std::string(what) + ": empty task handle");
    if (!seen.insert(core).second) continue;
    if constexpr (std::is_lvalue_reference_v<R>) out.push_back(h);
    else out.push_back(std::move(h));
  }
  return out;
}

/// What the completion callbacks of one wait share with it.
struct wait_shared {
  future<void> waiter;
  std::size_t counter = 0;
  return_when_t when = all_completed;
};

ASYNC_UTILS_USER_TYPES_IN_FRAMES_BEGIN
// asyncio's _wait: a done callback on each child counts completions and releases the waiter,
// which the timeout releases too; afterwards the callbacks go and the children are sorted.
template <class H>
coroutine<wait_result<H>> wait_impl(std::vector<H> fs, optional_timeout timeout, return_when_t when) {
  event_loop& loop = event_loop::current();
  for (const H& h : fs) check_same_loop(*core_of(h), &loop, "wait");
  auto shared = std::make_shared<wait_shared>();
  shared->waiter = loop.create_future<void>();
  shared->counter = fs.size();
  shared->when = when;
  // Removes the callbacks and the timer however the wait ends: returned, cancelled, or its
  // frame destroyed while the children run on.
  struct cleanup {
    std::vector<std::pair<future_core*, callback_id>> callbacks;
    handle timer;
    ~cleanup() {
      timer.cancel();
      for (auto [core, id] : callbacks) core->remove_done_callback(id);
    }
  } guard;
  guard.callbacks.reserve(fs.size());
  if (timeout.value()) {
    if (auto deadline = deadline_after(*timeout.value())) {
      guard.timer = loop.call_at(*deadline, [w = shared->waiter]() mutable {
        if (!w.done()) w.set_result();
      });
    }
  }
  for (const H& h : fs) {
    future_core* core = core_of(h);
    auto id = core->add_done_callback([shared](future_core& f) {
      --shared->counter;
      bool release = shared->counter == 0 || shared->when == first_completed;
      if (!release && shared->when == first_exception && f.has_error()) {
        f.mark_retrieved();  // asyncio looked at it with exception()
        release = true;
      }
      if (release && !shared->waiter.done()) shared->waiter.set_result();
    });
    guard.callbacks.emplace_back(core, id);
  }
  co_await shared->waiter;
  wait_result<H> result;
  for (H& h : fs) (core_of(h)->done() ? result.done : result.pending).push_back(std::move(h));
  co_return result;
}
ASYNC_UTILS_USER_TYPES_IN_FRAMES_END

template <class R>
using wait_element_t = std::remove_cvref_t<decltype(*std::ranges::begin(std::declval<R&>()))>;

}  // namespace detail

/// asyncio.wait(fs, timeout=, return_when=): waits for the tasks or futures of `handles` (a
/// range of task<T>, future<T> or any_task) until `return_when` holds or the timeout passes,
/// and yields {done, pending}. Cancels nothing, neither at the timeout nor when the caller is
/// cancelled; the children's exceptions stay in them. The handles are copied from an lvalue
/// range (moved from an rvalue one), so temporaries may be passed. Empty `handles`:
/// std::invalid_argument (asyncio's ValueError); coroutines do not compile (asyncio 3.11 forbids
/// them: create_task() first, and keep the handle to read its result).
template <class R>
  requires requires(R& r) {
    std::ranges::begin(r);
    std::ranges::end(r);
  }
auto wait(R&& handles, wait_options options = {}) {
  using H = detail::wait_element_t<R>;
  static_assert(detail::is_wait_handle<H>,
                "wait() takes task<T>, future<T> or any_task handles (asyncio 3.11 forbids coroutines): create_task() first");
  if (options.return_when != first_completed && options.return_when != first_exception && options.return_when != all_completed)
    throw std::invalid_argument("wait: invalid return_when value");
  auto fs = detail::unique_handles<H>(std::forward<R>(handles), "wait");
  if (fs.empty()) throw std::invalid_argument("wait: the set of tasks/futures is empty");
  return detail::wait_impl<H>(std::move(fs), options.timeout, options.return_when);
}

/// wait({a, b}, options): the same for a braced list of handles of one type.
template <class H>
auto wait(std::initializer_list<H> handles, wait_options options = {}) {
  return wait(std::vector<H>(handles), options);
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("wait") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  using testing::after;
  using testing::fail_after;
  // Finishes 1 ms after `first` does: never in the same round, however late the loop runs.
  coroutine<int> after_task(task<int> first, int v) {
    co_await first;
    co_await sleep(1ms);
    co_return v;
  }
  std::vector<task<int>> three_tasks() {  // a helper returning handles, as users write it
    std::vector<task<int>> v;
    v.push_back(create_task(after(1ms, 1)));
    v.push_back(create_task(after_task(v[0], 2)));
    v.push_back(create_task(after(1h, 3)));
    return v;
  }
  std::vector<int> values(const std::vector<task<int>>& v) {
    std::vector<int> out;
    for (const auto& t : v) out.push_back(t.done() && !t.cancelled() && !t.exception() ? t.result() : -1);
    return out;
  }

  TEST_CASE("each return_when: done and pending in the given order, nothing cancelled") {
    testing::run_bounded([]() -> coroutine<void> {
      auto tasks = three_tasks();
      auto [done, pending] = co_await wait(tasks, {.return_when = first_completed});
      CHECK(values(done) == std::vector<int>{1});
      REQUIRE(pending.size() == 2);
      CHECK(any_task(pending[0]) == any_task(tasks[1]));
      CHECK(any_task(pending[1]) == any_task(tasks[2]));
      auto timed = co_await wait(tasks, {.timeout = 200ms});  // all_completed, cut by the timeout
      CHECK(values(timed.done) == std::vector<int>{1, 2});
      REQUIRE(timed.pending.size() == 1);
      CHECK_FALSE(tasks[2].cancelled());  // the timeout cancels nothing
      tasks[2].cancel();
      auto all = co_await wait(tasks);
      CHECK(all.done.size() == 3);
      CHECK(all.pending.empty());
      CHECK(tasks[2].cancelled());
      CHECK(tasks.size() == 3);  // an lvalue range is copied, never moved from
      CHECK(tasks[0].result() == 1);
    }());
  }

  TEST_CASE("first_exception: a failure ends the wait, a cancellation does not; the exception stays in the task") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<task<int>> v;
      v.push_back(create_task(after(1h, 0)));  // cancelled: not an exception
      v.push_back(create_task(fail_after(5ms, "boom")));
      v.push_back(create_task(after(1h, 2)));
      v[0].cancel();
      auto [done, pending] = co_await wait(v, {.return_when = first_exception});
      REQUIRE(done.size() == 2);
      CHECK(done[0].cancelled());
      CHECK_THROWS_WITH_AS(done[1].result(), "boom", std::runtime_error);
      REQUIRE(pending.size() == 1);
      pending[0].cancel();
      // No failure at all: first_exception waits for every task.
      std::vector<task<int>> fine;
      fine.push_back(create_task(after(1ms, 1)));
      fine.push_back(create_task(after(3ms, 2)));
      auto r = co_await wait(fine, {.return_when = first_exception});
      CHECK(r.done.size() == 2);
      CHECK(r.pending.empty());
      // A child that throws with all_completed: wait itself does not throw.
      std::vector<task<int>> failing;
      failing.push_back(create_task(fail_after(1ms, "x")));
      auto r2 = co_await wait(std::move(failing));
      CHECK(r2.done[0].exception() != nullptr);
    }());
  }

  TEST_CASE("timeouts of zero and duration::max(); done already; futures, any_task and braced lists") {
    testing::run_bounded([]() -> coroutine<void> {
      auto slow = create_task(after(1h, 0));
      std::vector<task<int>> one(1, slow);
      auto zero = co_await wait(one, {.timeout = 0s});
      CHECK(zero.done.empty());
      CHECK(zero.pending.size() == 1);
      auto negative = co_await wait(one, {.timeout = -5s});
      CHECK(negative.pending.size() == 1);
      auto quick = create_task(after(2ms, 1));
      auto forever = co_await wait(std::vector<task<int>>(1, quick), {.timeout = std::chrono::hours::max()});
      CHECK(forever.done.size() == 1);
      auto at_once = co_await wait(std::vector<task<int>>(1, quick), {.timeout = 0s});  // done already
      CHECK(at_once.done.size() == 1);
      // Futures, any_task for mixed result types, a braced list, duplicates counted once.
      auto fut = event_loop::current().create_future<std::string>();
      event_loop::current().call_later(1ms, [fut]() mutable { fut.set_result("f"); });
      auto fr = co_await wait(std::vector<future<std::string>>(1, fut));
      CHECK(fr.done[0].result() == "f");
      auto v = create_task([]() -> coroutine<void> { co_return; }());
      std::vector<any_task> mixed{any_task(quick), any_task(v), any_task(v)};
      auto mr = co_await wait(mixed);
      CHECK(mr.done.size() == 2);
      auto braced = wait({quick, slow}, {.timeout = 1ms});  // named first: see README, Compilers
      auto br = co_await std::move(braced);
      CHECK(br.done.size() == 1);
      CHECK(br.pending.size() == 1);
      slow.cancel();
    }());
  }

  TEST_CASE("bad input: empty, empty handle, bad return_when, another loop, no loop") {
    std::vector<task<int>> none;
    CHECK_THROWS_AS((void)wait(none), std::invalid_argument);  // asyncio: ValueError
    CHECK_THROWS_AS((void)wait(std::vector<task<int>>(1)), std::invalid_argument);
    std::vector<any_task> empty_any(1);
    CHECK_THROWS_AS((void)wait(empty_any), std::invalid_argument);
    event_loop other;
    auto foreign = other.create_future<int>();
    { auto lazy = wait(std::vector<future<int>>(1, foreign)); }  // no loop needed until awaited, as asyncio.wait
    testing::run_bounded([&]() -> coroutine<void> {
      CHECK_THROWS_WITH_AS(co_await wait(std::vector<future<int>>(1, foreign)), "wait: the future or task is attached to a different loop",
                           std::runtime_error);
      auto t = create_task(after(1ms, 1));
      CHECK_THROWS_AS(co_await wait(std::vector<task<int>>(1, t), {.return_when = static_cast<return_when_t>(7)}), std::invalid_argument);
      co_await t;
    }());
  }

  TEST_CASE("a cancelled caller: wait ends cancelled, the children run on") {
    testing::run_bounded([]() -> coroutine<void> {
      // The second child waits on a gate opened after the cancel (a timer could come due first
      // on a loaded machine).
      auto gate = event_loop::current().create_future<void>();
      auto behind = [](future<void> g, int v) -> coroutine<int> {
        co_await g;
        co_return v;
      };
      std::vector<task<int>> tasks;
      tasks.push_back(create_task(after(1ms, 1)));
      tasks.push_back(create_task(behind(gate, 2)));
      tasks.push_back(create_task(after(1h, 3)));
      auto waiting = create_task(wait(tasks));
      co_await tasks[0];
      waiting.cancel();
      CHECK_THROWS_AS(co_await waiting, cancelled_error);
      CHECK_FALSE(tasks[1].done());
      gate.set_result();
      CHECK_FALSE(tasks[1].cancelled());
      CHECK(co_await tasks[1] == 2);  // its callback was removed: it completes without a wait around
      tasks[2].cancel();
      // The waiting coroutine destroyed unstarted and while suspended: nothing dangles.
      { auto never = wait(tasks); }
      auto child = create_task(after(3ms, 7));
      {
        auto w = wait(std::vector<task<int>>(1, child));
        auto holder = create_task(std::move(w));
        co_await sleep(0s);
        holder.cancel();
        co_await wait_done(holder);
      }
      CHECK(co_await child == 7);
    }());
  }

  TEST_CASE("a vector of handles filled in a loop; helpers returning temporaries") {
    testing::run_bounded([]() -> coroutine<void> {
      // Seven groups that finish one after the other (gates, not timers: a slow build must not
      // spread a group over two rounds); each first_completed round takes one whole group.
      std::vector<future<void>> gates;
      for (int k = 0; k < 7; ++k) gates.push_back(event_loop::current().create_future<void>());
      auto behind = [](future<void> gate, int i) -> coroutine<int> {
        co_await gate;
        co_return i;
      };
      std::vector<task<int>> v;
      for (int i = 0; i < 100; ++i) v.push_back(create_task(behind(gates[static_cast<std::size_t>(i % 7)], i)));
      std::vector<task<int>> left = v;
      for (int k = 0; k < 7; ++k) {
        gates[static_cast<std::size_t>(k)].set_result();
        auto r = co_await wait(left, {.return_when = first_completed});
        CHECK(r.done.size() == (k < 2 ? 15u : 14u));  // 100 = 7 * 14 + 2
        for (auto& t : r.done) CHECK(t.result() % 7 == k);
        left = std::move(r.pending);
      }
      CHECK(left.empty());
      for (int i = 0; i < 100; ++i) CHECK(v[static_cast<std::size_t>(i)].result() == i);
      // A temporary straight in. (The margin is wide: a sanitizer build on a loaded machine can
      // reach the 20 ms child's timer late.)
      auto r = co_await wait(three_tasks(), {.timeout = 500ms});
      CHECK(r.done.size() == 2);
      r.pending[0].cancel();
    }());
  }
}
#endif
