// task_group: asyncio.TaskGroup (3.11), an async context manager that waits for its tasks at
// exit. The first failure cancels the rest and the body; every failure leaves as one
// exception_group.
#pragma once

#include "../platform/config.hpp"

#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "async_exit_stack.hpp"
#include "timeout.hpp"

namespace codestare::async_utils {

/// asyncio.TaskGroup. Enter it with async_with (or an async_exit_stack). Movable until it is
/// entered (so that `async_with(task_group{}, ...)` can take it in); moving an entered group
/// throws std::logic_error, since its tasks' done callbacks point at it.
class task_group {
 public:
  task_group() = default;
  task_group(task_group&& other);
  task_group& operator=(task_group&&) = delete;

  /// A task of the group (create_task's rules for `aw`). std::runtime_error before the group is
  /// entered, once it is finished, or while it is shutting down after a failure.
  template <class A>
  auto create_task(A&& aw, std::string name = {}) {
    if (!entered_) throw std::runtime_error("task_group: has not been entered");
    if (exiting_ && pending_ == 0) throw std::runtime_error("task_group: is finished");
    if (aborting_) throw std::runtime_error("task_group: is shutting down");
    auto t = async_utils::create_task(std::forward<A>(aw), std::move(name));
    any_task child(t);
    tasks_.push_back(child);
    ++pending_;
    try {
      // On the state itself: any_task's wrapper would cost one more allocation per child.
      t.state_ptr()->add_done_callback([this](detail::future_core& done) { on_task_done(any_task(&done)); });
    } catch (...) {  // out of memory: the task runs unwatched, so stop it
      tasks_.pop_back();
      --pending_;
      child.cancel();
      throw;
    }
    return t;
  }

  /// Enters the group in the running task (std::runtime_error outside a task or when entered
  /// twice); yields the group.
  detail::ready_ref<task_group> aenter();

  /// Waits for every task; then rethrows as asyncio does: an outside cancellation as
  /// cancelled_error when nothing failed, else every failure (the body's last) in one
  /// exception_group.
  coroutine<bool> aexit(std::exception_ptr error);

 private:
  void abort();

  void on_task_done(const any_task& done);

  /// Lets go of the finished children once they make up half of tasks_ (amortised O(1) per
  /// child), so a long-lived group holds about as many handles as it has running children.
  void drop_finished();

  std::vector<any_task> tasks_;  // the children, finished ones dropped in batches
  std::size_t pending_ = 0;
  std::size_t finished_since_drop_ = 0;
  std::vector<std::exception_ptr> errors_;
  std::optional<future<void>> on_completed_;
  any_task parent_;
  bool entered_ = false;
  bool exiting_ = false;
  bool aborting_ = false;
  bool parent_cancel_requested_ = false;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK task_group::task_group(task_group&& other) {
  if (other.entered_) throw std::logic_error("task_group: cannot be moved once entered");
}

ASYNC_UTILS_LINK detail::ready_ref<task_group> task_group::aenter() {
  if (entered_) throw std::runtime_error("task_group: has already been entered");
  auto parent = current_task();
  if (!parent) throw std::runtime_error("task_group: must be entered inside a task");
  parent_ = *parent;
  entered_ = true;
  return {*this};
}

ASYNC_UTILS_LINK void task_group::abort() {
  aborting_ = true;
  for (auto& t : tasks_)
    if (!t.done()) t.cancel();
}

ASYNC_UTILS_LINK void task_group::on_task_done(const any_task& done) {
  --pending_;
  drop_finished();
  if (on_completed_ && pending_ == 0 && !on_completed_->done()) on_completed_->set_result();
  if (done.cancelled()) return;
  std::exception_ptr e = done.exception();
  if (!e) return;
  errors_.push_back(e);
  if (parent_.done()) {
    log(log_level::error, "task_group: a task failed after its parent task had finished: " + describe(e));
    return;
  }
  if (!aborting_ && !parent_cancel_requested_) {
    abort();
    parent_cancel_requested_ = true;
    parent_.cancel();
  }
}

ASYNC_UTILS_LINK void task_group::drop_finished() {
  // Counted per done callback: at most one pass over tasks_ per tasks_.size() / 2 callbacks.
  if (++finished_since_drop_ * 2 < tasks_.size() || tasks_.size() < 64) return;
  finished_since_drop_ = 0;
  std::erase_if(tasks_, [](const any_task& t) { return t.done(); });
  if (tasks_.capacity() > 4 * tasks_.size() + 64) tasks_.shrink_to_fit();
}
#endif  // ASYNC_UTILS_DEFINITIONS

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK coroutine<bool> task_group::aexit(std::exception_ptr error) {
  exiting_ = true;
  const bool body_cancelled = detail::is_cancellation(error);
  std::exception_ptr propagate_cancel = body_cancelled ? error : nullptr;
  // The group's own cancel() of the parent is handled here; only an outside one propagates.
  if (parent_cancel_requested_ && parent_.uncancel() == 0) propagate_cancel = nullptr;
  if (error && !aborting_) abort();
  while (pending_ > 0) {
    on_completed_ = event_loop::current().create_future<void>();
    try {
      co_await *on_completed_;
    } catch (const cancelled_error&) {
      if (!aborting_) {
        propagate_cancel = std::current_exception();
        abort();
      }
    }
    on_completed_.reset();
  }
  tasks_.clear();
  if (propagate_cancel && errors_.empty()) std::rethrow_exception(propagate_cancel);
  if (error && !body_cancelled) errors_.push_back(error);
  if (!errors_.empty()) throw exception_group("unhandled errors in a task_group", std::exchange(errors_, {}));
  co_return false;
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("task_group") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  using testing::after;
  using testing::fail_after;

  TEST_CASE("waits for every task at exit; results through the handles") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<task<int>> handles;
      co_await async_with(task_group{}, [&](task_group& tg) {
        for (int i = 0; i < 5; ++i) handles.push_back(tg.create_task(after(std::chrono::milliseconds(5 - i), i)));
      });
      for (int i = 0; i < 5; ++i) {
        CHECK(handles[static_cast<std::size_t>(i)].done());
        CHECK(co_await handles[static_cast<std::size_t>(i)] == i);
      }
      CHECK(current_task()->cancelling() == 0);
    }());
  }

  ASYNC_UTILS_USER_TYPES_IN_FRAMES_BEGIN
  coroutine<std::vector<std::string>> group_failures(bool body_fails) {
    std::vector<std::string> seen;
    bool body_cancelled = false;
    task<int> slow;
    try {
      co_await async_with(task_group{}, [&](task_group& tg) -> coroutine<void> {
        tg.create_task(fail_after(1ms, "first"));
        tg.create_task(fail_after(1ms, "second"));
        slow = tg.create_task(after(1h, 0));
        try {
          if (body_fails) throw std::logic_error("body");
          co_await sleep(1h);
        } catch (const cancelled_error&) {
          body_cancelled = true;
          throw;
        }
      });
    } catch (const exception_group& g) {
      seen.push_back(g.what());
      for (const auto& e : g.exceptions()) {
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& ex) {
          seen.push_back(ex.what());
        }
      }
    }
    seen.push_back(body_cancelled ? "body cancelled" : "body not cancelled");
    seen.push_back(slow.cancelled() ? "sibling cancelled" : "sibling not cancelled");
    seen.push_back("cancelling " + std::to_string(current_task()->cancelling()));
    co_return seen;
  }
  ASYNC_UTILS_USER_TYPES_IN_FRAMES_END

  TEST_CASE("the first failure cancels siblings and body; all failures leave as one group") {
    testing::run_bounded([]() -> coroutine<void> {
      // CPython 3.11 prints the same: both children fail in the same iteration.
      const std::vector<std::string> children_fail{"unhandled errors in a task_group (2 sub-exceptions)", "first", "second", "body cancelled", "sibling cancelled", "cancelling 0"};
      const std::vector<std::string> body_fails{"unhandled errors in a task_group (1 sub-exception)", "body", "body not cancelled", "sibling cancelled", "cancelling 0"};
      auto got = co_await group_failures(false);
      CHECK(got == children_fail);
      got = co_await group_failures(true);
      CHECK(got == body_fails);
      co_await sleep(0s);  // no stray cancellation left
    }());
  }

  TEST_CASE("an outside cancellation ends as cancelled_error after the children finished") {
    testing::run_bounded([]() -> coroutine<void> {
      bool child_cleaned = false;
      auto child = [&]() -> coroutine<void> {
        bool cancelled = false;
        try {
          co_await sleep(1h);
        } catch (const cancelled_error&) {
          cancelled = true;
        }
        if (cancelled) {
          co_await sleep(1ms);  // cleanup that takes a while
          child_cleaned = true;
          throw cancelled_error();
        }
      };
      auto outer = create_task(async_with(task_group{}, [&](task_group& tg) -> coroutine<void> {
        tg.create_task(child());
        co_await sleep(1h);
      }));
      co_await sleep(1ms);
      outer.cancel();
      CHECK_THROWS_AS(co_await outer, cancelled_error);
      CHECK(child_cleaned);
      // A group that finished in a cancelled parent still waits; the parent's cancel stays.
      auto parent = create_task([]() -> coroutine<void> {
        co_await async_with(task_group{}, [](task_group& tg) { tg.create_task(after(1ms, 1)); });
      }());
      parent.cancel();
      CHECK_THROWS_AS(co_await parent, cancelled_error);
    }());
  }

  TEST_CASE("misuse: create_task outside, after exit, entering twice, no task") {
    testing::run_bounded([]() -> coroutine<void> {
      task_group outside;
      CHECK_THROWS_AS(outside.create_task(after(1ms, 0)), std::runtime_error);
      task_group* kept = nullptr;
      co_await async_with(task_group{}, [&](task_group& tg) { kept = &tg; });
      (void)kept;
      task_group twice;
      co_await async_with(twice, [] {});
      CHECK_THROWS_AS(twice.create_task(after(1ms, 0)), std::runtime_error);  // finished
      CHECK_THROWS_AS(co_await async_with(twice, [] {}), std::runtime_error);
      // With a timeout around it: the deadline cancels the body, the group cancels the children.
      task<int> child;
      CHECK_THROWS_AS(co_await async_with(timeout(1ms), [&]() -> coroutine<void> {
        co_await async_with(task_group{}, [&](task_group& tg) -> coroutine<void> {
          child = tg.create_task(after(1h, 0));
          co_await sleep(1h);
        });
      }), timeout_error);
      CHECK(child.cancelled());
      CHECK(current_task()->cancelling() == 0);
    }());
    CHECK_THROWS_AS(task_group().aenter(), std::runtime_error);
  }

  coroutine<void> nothing() { co_return; }

  TEST_CASE("moving an entered group throws std::logic_error; before entering it is fine") {
    testing::run_bounded([]() -> coroutine<void> {
      task_group fresh;
      task_group moved(std::move(fresh));  // not entered yet: allowed
      bool threw = false;
      auto body = [&](task_group& tg) -> coroutine<void> {
        tg.create_task(nothing());
        try {
          task_group stolen(std::move(tg));
        } catch (const std::logic_error& e) {
          threw = std::string(e.what()) == "task_group: cannot be moved once entered";
        }
        co_return;
      };
      co_await async_with(moved, body);
      CHECK(threw);
    }());
  }

  TEST_CASE("a long-lived group lets go of its finished children (100,000 of them)") {
    testing::run_bounded([]() -> coroutine<void> {
      task<int> first;
      task<void> middle;
      std::size_t first_refs = 0, middle_refs = 0;
      auto body = [&](task_group& tg) -> coroutine<void> {
        first = tg.create_task(after(0ms, 1));
        for (int i = 0; i < 100000; ++i) {
          auto t = tg.create_task(nothing());
          if (i == 50000) middle = t;
          if (i % 1000 == 999) co_await sleep(0s);  // the batch runs, its done callbacks next
        }
        co_await sleep(0s);
        co_await sleep(0s);
        // Only our handle is left: the group dropped its own long before its exit.
        first_refs = first.state_ptr()->use_count();
        middle_refs = middle.state_ptr()->use_count();
      };
      co_await async_with(task_group{}, body);
      CHECK(first_refs == 1);
      CHECK(middle_refs == 1);
      CHECK(first.result() == 1);
    }(), std::chrono::milliseconds(60000));
  }
}
#endif
