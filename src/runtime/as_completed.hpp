// as_completed(aws, timeout): asyncio.as_completed (3.11), a range of awaitables that yield the
// results in completion order, timeout_error for those not done when the timeout passes.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "test_support.hpp"
#include "timer_heap.hpp"
#include "future_core.hpp"
#include "handle.hpp"
#include "event_loop.hpp"
#include "awaitable.hpp"
#include "future.hpp"
#include "coroutine.hpp"
#include "sleep.hpp"
#include "task.hpp"
#include "wait_for.hpp"
#include "gather.hpp"
#include "wait.hpp"

#include <cstddef>
#include <deque>
#include <iterator>
#include <memory>
#include <unordered_set>
#include <utility>
#include <vector>

namespace codestare::async_utils {
namespace detail {

/// What as_completed's elements share: the children, a done callback on each, and asyncio's
/// queue of finished children (an empty handle stands for one the timeout gave up on).
/// Children and timer refer to it weakly: whoever holds the last element or the range owns it.
template <class T>
class as_completed_state : public std::enable_shared_from_this<as_completed_state<T>> {
 public:
  explicit as_completed_state(event_loop& loop) : loop_(&loop) {}
  as_completed_state(const as_completed_state&) = delete;
  as_completed_state& operator=(const as_completed_state&) = delete;
  ~as_completed_state() { forget_children(); }

  void start(std::vector<future<T>> children, const optional_timeout& timeout) {
    todo_ = std::move(children);
    ids_.resize(todo_.size());
    std::weak_ptr<as_completed_state> self = this->shared_from_this();
    for (std::size_t i = 0; i < todo_.size(); ++i) {
      ids_[i] = todo_[i].state_ptr()->add_done_callback([self, i](future_core&) {
        if (auto s = self.lock()) s->on_completion(i);
      });
      ++remaining_;
    }
    if (remaining_ > 0 && timeout.value()) {
      if (auto deadline = deadline_after(*timeout.value())) {
        timer_ = loop_->call_at(*deadline, [self] {
          if (auto s = self.lock()) s->on_timeout();
        });
      }
    }
  }

  // asyncio's Queue.get on the queue of finished children; then the child's result.
  static coroutine<T> next(std::shared_ptr<as_completed_state> s) {
    while (s->finished_.empty()) {
      auto getter = s->loop_->template create_future<void>();
      s->getters_.push_back(getter);
      try {
        co_await getter;
      } catch (...) {
        getter.cancel();
        std::erase_if(s->getters_, [&](const future<void>& g) { return g.state_ptr() == getter.state_ptr(); });
        if (!s->finished_.empty() && !getter.cancelled()) s->wake_next();  // pass the wake-up on
        throw;
      }
    }
    future<T> f = std::move(s->finished_.front());
    s->finished_.pop_front();
    if (!f) throw timeout_error("as_completed: timed out");
    co_return take_result(*f.state_ptr());
  }

 private:
  void put(future<T> f) {
    finished_.push_back(std::move(f));
    wake_next();
  }
  void wake_next() {
    while (!getters_.empty()) {
      future<void> g = std::move(getters_.front());
      getters_.pop_front();
      if (!g.done()) {
        g.set_result();
        return;
      }
    }
  }
  void on_completion(std::size_t i) {
    if (remaining_ == 0 || !todo_[i]) return;  // the timeout came first
    put(std::exchange(todo_[i], {}));
    if (--remaining_ == 0) timer_.cancel();
  }
  void on_timeout() {
    for (auto& f : todo_) {
      if (!f) continue;
      put(future<T>());  // what the awaiting element turns into timeout_error
    }
    forget_children();
  }
  /// The children not reported yet lose their callback (they run on, untouched).
  void forget_children() noexcept {
    timer_.cancel();
    for (std::size_t i = 0; i < todo_.size(); ++i) {
      if (todo_[i]) std::exchange(todo_[i], {}).state_ptr()->remove_done_callback(ids_[i]);
    }
    remaining_ = 0;
  }

  event_loop* loop_;
  std::vector<future<T>> todo_;  // emptied as each child is reported
  std::vector<callback_id> ids_;
  std::size_t remaining_ = 0;
  std::deque<future<T>> finished_;
  std::deque<future<void>> getters_;
  handle timer_;
};

}  // namespace detail

/// What as_completed() returns: a range of as many awaitables as it was given distinct
/// awaitables. Each element, a coroutine<T>, yields the next result in completion order (or
/// rethrows that child's exception), or throws timeout_error once the timeout has passed.
/// Elements may be awaited after the range is gone; cancelling an awaiting element leaves the
/// next result for the next element.
template <class T>
class as_completed_range {
 public:
  using state = detail::as_completed_state<T>;

  class iterator {
   public:
    using value_type = coroutine<T>;
    using difference_type = std::ptrdiff_t;
    iterator() = default;
    iterator(std::shared_ptr<state> s, std::size_t i) : s_(std::move(s)), i_(i) {}
    coroutine<T> operator*() const { return state::next(s_); }
    iterator& operator++() {
      ++i_;
      return *this;
    }
    void operator++(int) { ++i_; }
    friend bool operator==(const iterator& a, const iterator& b) noexcept { return a.i_ == b.i_; }

   private:
    std::shared_ptr<state> s_;
    std::size_t i_ = 0;
  };

  as_completed_range(std::shared_ptr<state> s, std::size_t n) : s_(std::move(s)), n_(n) {}
  iterator begin() const { return {s_, 0}; }
  iterator end() const { return {s_, n_}; }
  std::size_t size() const noexcept { return n_; }

 private:
  std::shared_ptr<state> s_;
  std::size_t n_;
};

/// asyncio.as_completed(aws, timeout=): starts waiting at once (a running loop is needed, as
/// in asyncio): each awaitable of the range becomes a task, a task or future handle is copied
/// (an lvalue range stays as it is, an rvalue one is moved from; the same handle twice counts
/// once). Iterate with `for (auto next : as_completed(aws, 1s)) { T v = co_await next; }`. At
/// the timeout the children still running are left alone (not cancelled) and the elements
/// awaited for them throw timeout_error. Children that are done already come first, in the
/// range's order (asyncio: in an unspecified order).
template <detail::awaitable_range R>
auto as_completed(R&& aws, optional_timeout timeout = {}) {
  using E = std::iter_value_t<detail::range_iterator_t<R>>;
  using T = argument_result_t<E>;
  event_loop& loop = event_loop::current();
  std::vector<future<T>> children;
  std::unordered_set<detail::future_core*> seen;
  for (auto&& aw : detail::take_range(std::forward<R>(aws))) {
    auto f = detail::ensure_future(std::move(aw), "as_completed");
    if (seen.insert(f.state_ptr()).second) children.push_back(std::move(f));
  }
  const std::size_t n = children.size();
  auto s = std::make_shared<detail::as_completed_state<T>>(loop);
  s->start(std::move(children), timeout);
  return as_completed_range<T>(std::move(s), n);
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("as_completed") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  using testing::after;
  using testing::fail_after;
  std::vector<coroutine<int>> countdown() {
    std::vector<coroutine<int>> v;
    for (int i = 0; i < 4; ++i) v.push_back(after(std::chrono::milliseconds(4 * (4 - i)), i));
    return v;
  }

  TEST_CASE("results in completion order, each element awaited in a range-for") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<int> got;
      for (auto next : as_completed(countdown())) got.push_back(co_await next);
      CHECK(got == std::vector<int>{3, 2, 1, 0});
      // Tasks from a loop, an lvalue vector: copied, left as they are; a duplicate counts once.
      std::vector<task<int>> tasks;
      for (int i = 0; i < 5; ++i) tasks.push_back(create_task(after(std::chrono::milliseconds(5 - i), i)));
      tasks.push_back(tasks[0]);
      auto range = as_completed(tasks);
      CHECK(range.size() == 5);
      got.clear();
      for (auto next : range) got.push_back(co_await next);
      CHECK(got == std::vector<int>{4, 3, 2, 1, 0});
      CHECK(tasks.size() == 6);
      CHECK(tasks[0].result() == 0);
      // Empty input: nothing to iterate.
      int count = 0;
      for (auto next : as_completed(std::vector<task<int>>{})) {
        (void)next;
        ++count;
      }
      CHECK(count == 0);
      // void results.
      std::vector<coroutine<void>> nothing;
      nothing.push_back([]() -> coroutine<void> { co_return; }());
      for (auto next : as_completed(std::move(nothing))) co_await next;
    }());
  }

  TEST_CASE("a child that throws: its element rethrows, the others go on") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<coroutine<int>> v;
      v.push_back(after(6ms, 1));
      v.push_back(fail_after(1ms, "boom"));
      std::vector<std::string> seen;
      for (auto next : as_completed(std::move(v))) {
        try {
          seen.push_back(std::to_string(co_await next));
        } catch (const std::runtime_error& e) {
          seen.push_back(e.what());
        }
      }
      CHECK(seen == std::vector<std::string>{"boom", "1"});
    }());
  }

  TEST_CASE("timeout: timeout_error for the remaining ones, which run on; zero and duration::max()") {
    testing::run_bounded([]() -> coroutine<void> {
      auto slow = create_task(after(1h, 0));
      std::vector<task<int>> v{create_task(after(1ms, 1)), slow, create_task(after(1h, 2))};
      std::vector<std::string> seen;
      for (auto next : as_completed(v, 30ms)) {
        try {
          seen.push_back(std::to_string(co_await next));
        } catch (const timeout_error&) {
          seen.push_back("timeout");
        }
      }
      CHECK(seen == std::vector<std::string>{"1", "timeout", "timeout"});
      CHECK_FALSE(slow.done());  // not cancelled
      // Zero: only what is done already (and what finishes before the timer's turn).
      auto quick = create_task(after(0ms, 5));
      co_await sleep(1ms);
      std::vector<task<int>> w{slow, quick};
      seen.clear();
      for (auto next : as_completed(w, 0s)) {
        try {
          seen.push_back(std::to_string(co_await next));
        } catch (const timeout_error&) {
          seen.push_back("timeout");
        }
      }
      CHECK(seen == std::vector<std::string>{"5", "timeout"});
      std::vector<coroutine<int>> c;
      c.push_back(after(2ms, 9));
      for (auto next : as_completed(std::move(c), std::chrono::hours::max())) CHECK(co_await next == 9);
      for (auto& t : v) t.cancel();
    }());
  }

  TEST_CASE("a cancelled awaiter leaves the result to the next element; elements outlive the range") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<coroutine<int>> c;
      c.push_back(after(5ms, 1));
      c.push_back(after(10ms, 2));
      std::vector<coroutine<int>> elements;
      {
        auto range = as_completed(std::move(c));
        for (auto next : range) elements.push_back(std::move(next));
      }  // the range is gone; the elements hold what they need
      auto first = create_task(std::move(elements[0]));
      co_await sleep(1ms);
      first.cancel();
      CHECK_THROWS_AS(co_await first, cancelled_error);
      CHECK(co_await elements[1] == 1);  // the first result was not lost
      // Elements compose: awaited through wait_for.
      auto hour = create_task(after(1h, 0));
      auto never = *as_completed(std::vector<task<int>>(1, hour)).begin();
      CHECK_THROWS_AS(co_await wait_for(std::move(never), 1ms), timeout_error);
      CHECK_FALSE(hour.cancelled());  // wait_for cancelled the element, not the child
      hour.cancel();
    }());
  }

  TEST_CASE("range and elements destroyed while the children run; no loop; a cancelled caller") {
    CHECK_THROWS_AS(as_completed(countdown()), std::runtime_error);  // no running loop
    testing::run_bounded([]() -> coroutine<void> {
      auto child = create_task(after(3ms, 3));
      {
        auto range = as_completed(std::vector<task<int>>(1, child), 1ms);
        auto element = *range.begin();
      }
      // The timer and the child's callback are gone with them; the child runs on.
      co_await sleep(2ms);
      CHECK(co_await child == 3);
      // A caller cancelled while awaiting an element: the child is not cancelled (asyncio).
      auto lasting = create_task(after(5ms, 4));
      auto caller = create_task([](task<int> t) -> coroutine<int> {
        int sum = 0;
        for (auto next : as_completed(std::vector<task<int>>(1, t))) sum += co_await next;
        co_return sum;
      }(lasting));
      co_await sleep(1ms);
      caller.cancel();
      CHECK_THROWS_AS(co_await caller, cancelled_error);
      CHECK(co_await lasting == 4);
    }());
  }
}
#endif
