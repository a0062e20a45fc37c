// gather(aws...) and gather(range): asyncio.gather, with the return_exceptions form.
#pragma once

#include <array>
#include <iterator>
#include <span>
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

/// Waits for children: all of them, or (without return_exceptions) the first failure. Cancelling
/// it cancels every child; it then throws cancelled_error once they are all done (asyncio).
struct gather_awaiter : cancel_hook {
  struct child_waiter : completion_waiter {
    gather_awaiter* owner;
    future_core* child;
  };
  std::span<future_core* const> children;
  bool return_exceptions;
  future_core* task = nullptr;
  future_core* first_failure = nullptr;
  std::size_t remaining = 0;
  bool cancel_requested = false;
  bool woken = false;
  std::vector<child_waiter> waiters;

  gather_awaiter(std::span<future_core* const> c, bool return_exc) noexcept : children(c), return_exceptions(return_exc) {}
  gather_awaiter(const gather_awaiter&) = delete;
  static bool failed(const future_core* c) { return c->cancelled() || c->has_error(); }
  bool await_ready() {
    for (future_core* c : children) {
      if (!c->done()) ++remaining;
      else if (!first_failure && failed(c)) first_failure = c;
    }
    return remaining == 0 || (!return_exceptions && first_failure);
  }
  void await_suspend(std::coroutine_handle<> h) {
    task = &current_task_core("gather()");
    waiters.resize(children.size());
    for (std::size_t i = 0; i < children.size(); ++i) {
      if (children[i]->done()) continue;
      if (children[i] == task) throw std::runtime_error("a task cannot gather itself");
      waiters[i].owner = this;
      waiters[i].child = children[i];
      waiters[i].notify = [](completion_waiter* w) {
        auto* cw = static_cast<child_waiter*>(w);
        gather_awaiter& g = *cw->owner;
        --g.remaining;
        if (!g.first_failure && failed(cw->child)) g.first_failure = cw->child;
        if (!g.woken && (g.remaining == 0 || (!g.return_exceptions && g.first_failure == cw->child))) {
          g.woken = true;
          g.task->wake();
        }
      };
      children[i]->add_waiter(waiters[i]);
    }
    cancel = [](cancel_hook* c) {
      auto* self = static_cast<gather_awaiter*>(c);
      bool any = false;
      for (future_core* child : self->children) any = child->cancel(self->task->cancel_message()) || any;
      if (any) self->cancel_requested = true;
      return any;
    };
    task->suspend_on(this, h);
  }
  void await_resume() {
    for (auto& w : waiters) w.unlink();
    if (task) task->throw_if_cancelled();
    if (cancel_requested && remaining == 0) throw cancelled_error(task->cancel_message());
    if (!return_exceptions && first_failure) first_failure->check_result();
  }
};

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
template <bool ReturnExceptions, class... H>
auto gather_impl(H... aws) -> coroutine<std::conditional_t<ReturnExceptions, std::tuple<outcome<argument_result_t<H>>...>,
                                                            std::tuple<gathered_t<argument_result_t<H>>...>>> {
  // Braced initialisation creates the tasks left to right, in argument order.
  std::tuple<decltype(ensure_future(std::move(aws), "gather"))...> futures{ensure_future(std::move(aws), "gather")...};
  std::array<future_core*, sizeof...(H)> cores = std::apply([](auto&... f) { return std::array<future_core*, sizeof...(H)>{f.state_ptr()...}; }, futures);
  co_await gather_awaiter(cores, ReturnExceptions);
  if constexpr (ReturnExceptions) co_return std::apply([](auto&... f) { return std::tuple{gathered_outcome(f)...}; }, futures);
  else co_return std::apply([](auto&... f) { return std::tuple<gathered_t<argument_result_t<H>>...>{gathered_value(f)...}; }, futures);
}

template <bool ReturnExceptions, class Range>
auto gather_range_impl(Range range) {
  using T = argument_result_t<typename Range::value_type>;
  using V = std::conditional_t<ReturnExceptions, outcome<T>, gathered_t<T>>;
  return [](Range r) -> coroutine<std::vector<V>> {
    std::vector<future<T>> futures;
    for (auto& aw : r) futures.push_back(ensure_future(std::move(aw), "gather"));
    std::vector<future_core*> cores;
    cores.reserve(futures.size());
    for (auto& f : futures) cores.push_back(f.state_ptr());
    co_await gather_awaiter(cores, ReturnExceptions);
    std::vector<V> results;
    results.reserve(futures.size());
    for (auto& f : futures) {
      if constexpr (ReturnExceptions) results.push_back(gathered_outcome(f));
      else results.push_back(gathered_value(f));
    }
    co_return results;
  }(std::move(range));
}

ASYNC_UTILS_USER_TYPES_IN_FRAMES_END

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
