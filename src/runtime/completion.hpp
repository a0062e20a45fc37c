// wait_done(fut): waits until a future or task is done, without touching its outcome; and the
// completion awaiter behind it, wait_for and run().
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "timer_heap.hpp"
#include "future_core.hpp"
#include "any_task.hpp"
#include "event_loop.hpp"
#include "task_steps.hpp"
#include "future.hpp"

#include <optional>

namespace codestare::async_utils {
namespace detail {

/// now + timeout, or nothing ("never"): wait_for(aw, duration::max()) waits for ever.
ASYNC_UTILS_LINK std::optional<clock::time_point> deadline_after(clock::duration timeout) noexcept;

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::optional<clock::time_point> deadline_after(clock::duration timeout) noexcept {
  const clock::time_point when = saturating_deadline(timeout);
  if (when == never) return std::nullopt;
  return when;
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// Waits until `core` is done, with an optional deadline. Cancelling the waiting task cancels
/// the awaited one (unless shielded). At the deadline the waiting task itself is cancelled, as
/// asyncio.timeout does (which passes on to the awaited one), and `expired` records it; a
/// deadline reached after the awaited one finished does nothing (its wake-up came first).
struct completion_awaiter : completion_waiter, cancel_hook, timer_node {
  future_core* core;
  future_core* task = nullptr;
  bool propagate_cancel;
  bool has_deadline = false;
  bool expired = false;
  bool withdrawn = false;
  clock::duration timeout{};

  completion_awaiter(future_core* c, bool propagate) noexcept : core(c), propagate_cancel(propagate) {}
  completion_awaiter(const completion_awaiter&) = delete;
  bool await_ready() const {
    check_same_loop(*core, running_loop, "co_await");
    return core->done();
  }
  void await_suspend(std::coroutine_handle<> h) {
    task = &current_task_core("waiting on a task");
    if (task == core) throw std::runtime_error("a task cannot await itself");
    notify = [](completion_waiter* w) { static_cast<completion_awaiter*>(w)->task->wake(); };
    cancel = [](cancel_hook* c) {
      auto* self = static_cast<completion_awaiter*>(c);
      if (self->propagate_cancel) return self->core->cancel(self->task->cancel_message());
      self->completion_waiter::unlink();
      self->withdrawn = true;
      self->task->wake();
      return true;
    };
    if (auto deadline = has_deadline ? deadline_after(timeout) : std::nullopt) {
      fire = [](timer_node* node, bool run) {
        auto* self = static_cast<completion_awaiter*>(node);
        if (!run || !self->completion_waiter::linked()) return;
        self->expired = true;
        try {
          self->task->cancel({});  // reaches the awaited one through cancel hook below
        } catch (...) {  // out of memory for a message copy: the expiry is still recorded
        }
      };
      task->loop()->add_timer(*this, *deadline);
    }
    core->add_waiter(*this);
    task->suspend_on(this, h);
  }
  void await_resume() {
    completion_waiter::unlink();
    if (scheduled()) task->loop()->remove_timer(*this);
    if (task) task->throw_if_cancelled(withdrawn);
  }
  ~completion_awaiter() {
    if (scheduled() && task && task->loop()) task->loop()->remove_timer(*this);
  }
};

/// Keeps a counted reference (any_task is the untyped handle of any future_core), so the
/// waiter may be awaited after every other handle is gone.
struct done_waiter {
  any_task target;
  auto operator co_await() const noexcept { return completion_awaiter(target.core_ptr(), false); }
};

}  // namespace detail

/// Waits until a task or future is done, whatever its outcome, without retrieving it and
/// without cancelling it when the waiter is cancelled. Holds its own handle.
ASYNC_UTILS_LINK detail::done_waiter wait_done(const any_task& t);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK detail::done_waiter wait_done(const any_task& t) {
  if (!t) throw invalid_state_error("empty task handle");
  return {t};
}
#endif  // ASYNC_UTILS_DEFINITIONS
template <class T>
detail::done_waiter wait_done(const future<T>& f) {
  return {any_task(f.state_ptr())};
}

}  // namespace codestare::async_utils
