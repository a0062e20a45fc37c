// gather(aws...) and gather(range): asyncio.gather, with the return_exceptions form.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "test_support.hpp"
#include "future_core.hpp"
#include "any_task.hpp"
#include "event_loop.hpp"
#include "awaitable.hpp"
#include "future.hpp"
#include "coroutine.hpp"
#include "sleep.hpp"
#include "completion.hpp"
#include "task.hpp"
#include "wait_for.hpp"

#include <iterator>
#include <memory>
#include <tuple>
#include <variant>
#include <vector>

namespace codestare::async_utils {

/// Tag for gather's return_exceptions form: gather(return_exceptions, a, b).
struct return_exceptions_t {
  explicit return_exceptions_t() = default;
};
inline constexpr return_exceptions_t return_exceptions{};

/// A gathered result: void results become std::monostate.
template <class T>
using gathered_t = std::conditional_t<std::is_void_v<T>, std::monostate, T>;
/// A gathered result with return_exceptions: the value or the exception (cancelled_error for
/// a cancelled child).
template <class T>
using outcome = std::variant<gathered_t<T>, std::exception_ptr>;

namespace detail {

/// asyncio's _GatheringFuture, as what the gather task waits on. Registered on the children when
/// gather() is called, so their completions are seen in completion order even before the gather
/// task first runs. Decided when every child is done or, without return_exceptions, at the
/// first failure (an exception or a cancellation); from then on every child's exception counts
/// as retrieved, as asyncio's callbacks retrieve them. It is the gather task's cancel hook from
/// its creation: cancelling the gather cancels the children, and the gather then ends cancelled.
class gather_control : public cancel_hook {
 public:
  gather_control(std::vector<future_core*> children, bool return_exceptions);
  gather_control(const gather_control&) = delete;
  gather_control& operator=(const gather_control&) = delete;

  /// The gather task, waiting on this from before its first step.
  void attach(future_core& task) noexcept;

  /// What the gather task awaits: nothing once decided; then the first failure, or the
  /// cancellation it asked for, is thrown.
  struct awaiter {
    gather_control& g;
    bool await_ready() const noexcept { return g.decided(); }
    void await_suspend(std::coroutine_handle<> h) {
      g.waiting_ = true;
      g.task_->suspend_on(&g, h);
    }
    void await_resume() const {
      g.task_->wait_on(nullptr);  // the control goes away before the task ends
      g.task_->throw_if_cancelled();
      if (!g.return_exceptions_ && g.first_failure_) g.first_failure_->check_result();
      if (g.cancel_requested_) throw cancelled_error(g.task_->cancel_message());
    }
  };
  awaiter operator co_await() noexcept { return {*this}; }

 private:
  struct child_waiter : completion_waiter {
    gather_control* owner = nullptr;
    future_core* child = nullptr;
  };
  static bool failed(const future_core* c) noexcept { return c->cancelled() || c->has_error(); }
  bool decided() const noexcept { return remaining_ == 0 || (!return_exceptions_ && first_failure_); }
  void note(future_core* child) noexcept;
  void mark_children_retrieved() noexcept;
  static void child_done(completion_waiter* w);
  static bool cancel_children(cancel_hook* hook);

  std::vector<future_core*> children_;  // kept alive by the gather task's handles
  std::unique_ptr<child_waiter[]> waiters_;
  future_core* task_ = nullptr;
  future_core* first_failure_ = nullptr;
  std::size_t remaining_ = 0;
  bool return_exceptions_;
  bool cancel_requested_ = false;
  bool waiting_ = false;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK gather_control::gather_control(std::vector<future_core*> children, bool return_exceptions)
    : children_(std::move(children)), waiters_(new child_waiter[children_.size()]), return_exceptions_(return_exceptions) {
  cancel = &cancel_children;
  for (std::size_t i = 0; i < children_.size(); ++i) {
    future_core* child = children_[i];
    if (child->done()) {
      note(child);
      continue;
    }
    ++remaining_;
    waiters_[i].owner = this;
    waiters_[i].child = child;
    waiters_[i].notify = &child_done;
    child->add_waiter(waiters_[i]);
  }
  if (decided()) mark_children_retrieved();
}

ASYNC_UTILS_LINK void gather_control::attach(future_core& task) noexcept {
  task_ = &task;
  task.wait_on(this);
}

ASYNC_UTILS_LINK void gather_control::note(future_core* child) noexcept {
  if (!first_failure_ && failed(child)) first_failure_ = child;
}

ASYNC_UTILS_LINK void gather_control::mark_children_retrieved() noexcept {
  for (future_core* c : children_) c->mark_retrieved();
}

ASYNC_UTILS_LINK void gather_control::child_done(completion_waiter* w) {
  auto* cw = static_cast<child_waiter*>(w);
  gather_control& g = *cw->owner;
  const bool was_decided = g.decided();
  --g.remaining_;
  g.note(cw->child);
  if (was_decided || !g.decided()) return;
  g.mark_children_retrieved();
  if (g.waiting_) {
    g.waiting_ = false;
    g.task_->wake();
  }
}

ASYNC_UTILS_LINK bool gather_control::cancel_children(cancel_hook* hook) {
  auto& g = static_cast<gather_control&>(*hook);
  if (g.decided()) return false;  // asyncio: the gathering future is done already
  bool any = false;
  for (future_core* c : g.children_) any = c->cancel(g.task_->cancel_message()) || any;
  if (any) g.cancel_requested_ = true;
  return any;
}
#endif  // ASYNC_UTILS_DEFINITIONS

template <class T>
gathered_t<T> gathered_value(future<T>& f) {
  if constexpr (std::is_void_v<T>) {
    f.result();
    return {};
  } else {
    return take_result(*f.state_ptr());
  }
}
template <class T>
outcome<T> gathered_outcome(future<T>& f) {
  try {
    return outcome<T>(std::in_place_index<0>, gathered_value(f));
  } catch (...) {
    return outcome<T>(std::in_place_index<1>, std::current_exception());
  }
}

ASYNC_UTILS_USER_TYPES_IN_FRAMES_BEGIN
template <bool ReturnExceptions, class... T>
auto gather_tuple_body(std::unique_ptr<gather_control> control, std::tuple<future<T>...> futures)
    -> coroutine<std::conditional_t<ReturnExceptions, std::tuple<outcome<T>...>, std::tuple<gathered_t<T>...>>> {
  co_await *control;
  control.reset();  // leaves the children still running
  if constexpr (ReturnExceptions) co_return std::apply([](auto&... f) { return std::tuple{gathered_outcome(f)...}; }, futures);
  else co_return std::apply([](auto&... f) { return std::tuple<gathered_t<T>...>{gathered_value(f)...}; }, futures);
}

template <bool ReturnExceptions, class T>
auto gather_range_body(std::unique_ptr<gather_control> control, std::vector<future<T>> futures)
    -> coroutine<std::vector<std::conditional_t<ReturnExceptions, outcome<T>, gathered_t<T>>>> {
  co_await *control;
  control.reset();
  std::vector<std::conditional_t<ReturnExceptions, outcome<T>, gathered_t<T>>> results;
  results.reserve(futures.size());
  for (auto& f : futures) {
    if constexpr (ReturnExceptions) results.push_back(gathered_outcome(f));
    else results.push_back(gathered_value(f));
  }
  co_return results;
}
ASYNC_UTILS_USER_TYPES_IN_FRAMES_END

/// The gather task: `body` waits on `control`, which is its cancel hook from the start.
template <class R>
task<R> start_gather(event_loop& loop, gather_control* control, coroutine<R> body) {
  auto t = loop.create_task(std::move(body));
  control->attach(*t.state_ptr());
  return t;
}

template <bool ReturnExceptions, class... H>
auto gather_impl(H... aws) {
  event_loop& loop = event_loop::current();  // before any task is made: no running loop, nothing started
  // Braced initialisation creates the tasks left to right, in argument order.
  std::tuple<decltype(ensure_future(std::move(aws), "gather"))...> futures{ensure_future(std::move(aws), "gather")...};
  auto control = std::apply([](auto&... f) { return std::make_unique<gather_control>(std::vector<future_core*>{f.state_ptr()...}, ReturnExceptions); }, futures);
  gather_control* g = control.get();
  return start_gather(loop, g, gather_tuple_body<ReturnExceptions>(std::move(control), std::move(futures)));
}

template <bool ReturnExceptions, class E>
auto gather_range_impl(std::vector<E> range) {
  using T = argument_result_t<E>;
  event_loop& loop = event_loop::current();
  std::vector<future<T>> futures;
  futures.reserve(range.size());
  for (auto& aw : range) futures.push_back(ensure_future(std::move(aw), "gather"));
  std::vector<future_core*> cores;
  cores.reserve(futures.size());
  for (auto& f : futures) cores.push_back(f.state_ptr());
  auto control = std::make_unique<gather_control>(std::move(cores), ReturnExceptions);
  gather_control* g = control.get();
  return start_gather(loop, g, gather_range_body<ReturnExceptions>(std::move(control), std::move(futures)));
}

/// std::ranges::iterator_t / input_range / range_reference_t, spelled with what <iterator>
/// provides, so that this header does not pull in all of <ranges>.
template <class R>
using range_iterator_t = decltype(std::ranges::begin(std::declval<R&>()));
template <class R>
concept awaitable_range = requires(R& r) {
  std::ranges::begin(r);
  std::ranges::end(r);
} && std::input_iterator<range_iterator_t<R>> && !awaitable<R> && awaitable_argument<std::iter_value_t<range_iterator_t<R>>>;

/// The elements of `range` in a vector of their own: copied from an lvalue range (the caller's
/// handles stay as they are), moved from an rvalue one.
template <class R>
auto take_range(R&& range) {
  using E = std::iter_value_t<range_iterator_t<R>>;
  if constexpr (!check_by_value<std::conditional_t<std::is_lvalue_reference_v<R>, E&, E>>()) return std::vector<E>();
  else if constexpr (std::is_lvalue_reference_v<R>) return std::vector<E>(std::ranges::begin(range), std::ranges::end(range));
  else return std::vector<E>(std::make_move_iterator(std::ranges::begin(range)), std::make_move_iterator(std::ranges::end(range)));
}

}  // namespace detail

/// Runs the awaitables concurrently (each in a task) and returns their results as a tuple
/// (void -> std::monostate). The first exception (or child cancellation) is rethrown at once;
/// the other children keep running. Cancelling gather cancels every child.
template <awaitable_argument... A>
  requires(sizeof...(A) > 0)
auto gather(A&&... aws) {
  if constexpr (!(detail::check_by_value<A>() && ...)) return;
  else return detail::gather_impl<false, detail::held_t<A>...>(detail::held_t<A>(std::forward<A>(aws))...);
}
/// As gather(aws...), but every result is an outcome<T>: the value or the exception.
template <awaitable_argument... A>
auto gather(return_exceptions_t, A&&... aws) {
  if constexpr (!(detail::check_by_value<A>() && ...)) return;
  else return detail::gather_impl<true, detail::held_t<A>...>(detail::held_t<A>(std::forward<A>(aws))...);
}
/// gather over a range of awaitables (a vector of coroutines or tasks) -> std::vector. An
/// lvalue range is copied (its handles stay valid); an rvalue range is moved from.
template <detail::awaitable_range R>
auto gather(R&& range) {
  return detail::gather_range_impl<false>(detail::take_range(std::forward<R>(range)));
}
template <detail::awaitable_range R>
auto gather(return_exceptions_t, R&& range) {
  return detail::gather_range_impl<true>(detail::take_range(std::forward<R>(range)));
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("gather") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  coroutine<int> after(std::chrono::milliseconds d, int v) {
    co_await sleep(d);
    co_return v;
  }
  coroutine<void> fail_after(std::chrono::milliseconds d) {
    co_await sleep(d);
    throw std::runtime_error("child failed");
  }

  TEST_CASE("tuple and vector results in argument order, void as monostate") {
    testing::run_bounded([]() -> coroutine<void> {
      auto [a, b, c] = co_await gather(after(3ms, 1), after(1ms, 2), []() -> coroutine<void> { co_return; }());
      CHECK(a == 1);
      CHECK(b == 2);
      CHECK(c == std::monostate{});
      std::vector<coroutine<int>> many;
      for (int i = 0; i < 50; ++i) many.push_back(after(std::chrono::milliseconds(i % 5), i));
      auto results = co_await gather(std::move(many));
      REQUIRE(results.size() == 50);
      for (int i = 0; i < 50; ++i) CHECK(results[static_cast<std::size_t>(i)] == i);
      auto t = create_task(after(1ms, 5));
      auto [x] = co_await gather(t);  // tasks are awaited as they are
      CHECK(x == 5);
      CHECK((co_await gather(std::vector<coroutine<int>>{})).empty());
    }());
  }

  TEST_CASE("the first failure propagates at once; return_exceptions collects outcomes") {
    testing::run_bounded([]() -> coroutine<void> {
      auto slow = create_task(after(50ms, 1));
      std::string message;
      try {
        co_await gather(slow, fail_after(1ms));
      } catch (const std::runtime_error& e) {
        message = e.what();
      }
      CHECK(message == "child failed");
      CHECK_FALSE(slow.done());  // the others keep running, as in asyncio
      auto [ok, bad] = co_await gather(return_exceptions, after(1ms, 3), fail_after(1ms));
      CHECK(std::get<0>(ok) == 3);
      CHECK_THROWS_AS(std::rethrow_exception(std::get<1>(bad)), std::runtime_error);
      auto cancelled = create_task(after(1h, 0));
      cancelled.cancel();
      std::vector<task<int>> tasks(1, cancelled);  // (g++ 12 rejects an initializer_list inside co_await)
      auto outcomes = co_await gather(return_exceptions, tasks);
      CHECK_THROWS_AS(std::rethrow_exception(std::get<1>(outcomes[0])), cancelled_error);
      co_await slow;
    }());
  }

  TEST_CASE("handles given by helpers and loops are copied; an lvalue vector stays whole") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<task<std::tuple<int>>> singles;
      for (int i = 0; i < 3; ++i) {
        auto t = create_task(after(1ms, i));  // loop-local: gone before the gathers run
        singles.push_back(create_task(gather(t)));
      }
      for (int i = 0; i < 3; ++i) CHECK(std::get<0>(co_await singles[static_cast<std::size_t>(i)]) == i);
      std::vector<task<int>> tasks;
      for (int i = 0; i < 4; ++i) tasks.push_back(create_task(after(std::chrono::milliseconds(4 - i), i * 10)));
      auto results = co_await gather(tasks);
      CHECK(results == std::vector<int>{0, 10, 20, 30});
      REQUIRE(tasks.size() == 4);
      CHECK(tasks[0].result() == 0);  // the caller's handles were copied, not moved out
      CHECK(tasks[3].result() == 30);
      auto outcomes = co_await gather(return_exceptions, tasks);
      CHECK(std::get<0>(outcomes[2]) == 20);
      CHECK(tasks[2].result() == 20);
      auto moved = co_await gather(std::move(tasks));  // an rvalue range may be moved from
      CHECK(moved.size() == 4);
    }());
  }

  coroutine<int> fail_with(std::chrono::milliseconds d, std::string message) {
    co_await sleep(d);
    throw std::runtime_error(message);
  }

  TEST_CASE("gather is eager and returns a task; outside a running loop it throws") {
    static_assert(std::is_same_v<decltype(gather(after(1ms, 1), fail_after(1ms))), task<std::tuple<int, std::monostate>>>);
    static_assert(std::is_same_v<decltype(gather(std::vector<coroutine<int>>{})), task<std::vector<int>>>);
    CHECK_THROWS_WITH_AS(gather(after(1ms, 1)), "no running event loop", std::runtime_error);
    std::vector<coroutine<int>> later;
    later.push_back(after(1ms, 1));
    CHECK_THROWS_AS(gather(std::move(later)), std::runtime_error);
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<int> started;
      auto note = [&](int n) -> coroutine<int> {
        started.push_back(n);
        co_await sleep(0s);
        co_return n * 10;
      };
      auto g = gather(note(1), note(2));  // CPython: both children run at the next iteration
      CHECK(started.empty());
      co_await sleep(0s);
      CHECK(started == std::vector<int>{1, 2});
      CHECK(co_await g == std::tuple<int, int>{10, 20});
      auto none = gather(std::vector<task<int>>{});
      CHECK((co_await none).empty());
    }());
  }

  TEST_CASE("the first failure in completion order fails the gather; the others' exceptions are retrieved") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> reports;
      event_loop::current().set_exception_handler([&](event_loop&, const exception_context& c) { reports.push_back(c.message); });
      // CPython: the second argument fails first, so gather raises its exception. The first
      // one fails only once the gather is over (a gate, not a longer sleep: a loaded machine
      // may start a timer late).
      auto gate = event_loop::current().create_future<void>();
      auto late = create_task([](future<void> g) -> coroutine<int> {
        co_await g;
        throw std::runtime_error("first argument");
      }(gate));
      auto early = create_task(fail_with(5ms, "second argument"));
      try {
        co_await gather(late, early);
        FAIL("gather returned");
      } catch (const std::runtime_error& e) {
        CHECK(std::string(e.what()) == "second argument");
      }
      CHECK_FALSE(late.done());  // not cancelled: it runs on, as in asyncio
      gate.set_result();
      co_await wait_done(late);
      CHECK(late.exception() != nullptr);
      // Children that fail in the same step: the first in argument order, as in CPython.
      std::string first;
      try {
        co_await gather(fail_with(0ms, "x"), fail_with(0ms, "y"));
      } catch (const std::runtime_error& e) {
        first = e.what();
      }
      CHECK(first == "x");
      // Temporaries only: nobody else can look at "later", yet its failure is not reported as
      // never retrieved (with a task_nursery alive, that report would shut the program down).
      auto keeps = create_task(after(40ms, 3));
      try {
        co_await gather(fail_with(1ms, "now"), fail_with(10ms, "later"), keeps);
      } catch (const std::runtime_error& e) {
        CHECK(std::string(e.what()) == "now");
      }
      co_await sleep(20ms);
      CHECK(co_await keeps == 3);
      CHECK(reports.empty());
    }());
  }

  TEST_CASE("cancelling the gather cancels its children; it ends cancelled, with the message") {
    testing::run_bounded([]() -> coroutine<void> {
      auto a = create_task(after(1h, 1));
      auto b = create_task(after(1h, 2));
      auto g = gather(a, b);
      CHECK(g.cancel("stop"));  // before the gather task ran at all: still reaches the children
      try {
        co_await g;
        FAIL("gather returned");
      } catch (const cancelled_error& e) {
        CHECK(e.message() == "stop");
      }
      CHECK(g.cancelled());
      CHECK(a.cancelled());
      CHECK(b.cancelled());
      CHECK_THROWS_WITH_AS(a.result(), "stop", cancelled_error);
      std::vector<task<int>> running;
      for (int i = 0; i < 3; ++i) running.push_back(create_task(after(1h, i)));
      auto all = gather(return_exceptions, running);
      co_await sleep(1ms);
      all.cancel();
      CHECK_THROWS_AS(co_await all, cancelled_error);  // return_exceptions: cancelled all the same
      for (auto& t : running) CHECK(t.cancelled());
      // A child that swallows the cancellation: the gather still ends cancelled (asyncio).
      auto stubborn = create_task([]() -> coroutine<int> {
        try {
          co_await sleep(1h);
        } catch (const cancelled_error&) {
        }
        co_return 7;
      }());
      auto g2 = gather(stubborn);
      co_await sleep(0s);
      g2.cancel();
      CHECK_THROWS_AS(co_await g2, cancelled_error);
      CHECK(stubborn.result() == 7);
    }());
  }

  TEST_CASE("a child cancelled from outside fails the gather at once; the sibling runs on") {
    testing::run_bounded([]() -> coroutine<void> {
      auto a = create_task(after(1h, 1));
      auto b = create_task(after(5ms, 2));
      auto g = gather(a, b);
      co_await sleep(0s);
      a.cancel();
      CHECK_THROWS_AS(co_await g, cancelled_error);
      CHECK_FALSE(b.done());
      CHECK(co_await b == 2);
      // return_exceptions: the cancellation is one more outcome.
      auto c = create_task(after(1h, 0));
      auto both = gather(return_exceptions, after(1ms, 5), c);
      co_await sleep(0s);
      c.cancel();
      auto [x, y] = co_await both;
      CHECK(std::get<0>(x) == 5);
      CHECK_THROWS_AS(std::rethrow_exception(std::get<1>(y)), cancelled_error);
    }());
  }

  TEST_CASE("cancelling gather cancels every child and then raises cancelled_error") {
    testing::run_bounded([]() -> coroutine<void> {
      auto a = create_task(after(1h, 1));
      auto b = create_task(after(1h, 2));
      auto g = create_task(gather(a, b));
      co_await sleep(1ms);
      g.cancel();
      co_await wait_done(g);
      CHECK(g.cancelled());
      CHECK(a.cancelled());
      CHECK(b.cancelled());
    }());
  }
}
#endif
