// sleep(duration): asyncio.sleep. sleep(0s) yields to the loop once without a timer.
#pragma once

#include <chrono>

namespace codestare::async_utils {
namespace detail {

struct sleep_awaiter : cancel_hook, timer_node {
  clock::duration delay;
  future_core* task = nullptr;
  bool withdrawn = false;

  explicit sleep_awaiter(clock::duration d) noexcept : delay(d) {}
  sleep_awaiter(const sleep_awaiter&) = delete;
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) {
    task = &current_task_core("sleep()");
    if (delay <= clock::duration::zero()) {  // a bare yield: nothing to withdraw
      task->suspend_on(nullptr, h);
      task->wake();
      return;
    }
    fire = [](timer_node* node, bool run) {
      if (run) static_cast<sleep_awaiter*>(node)->task->wake();
    };
    cancel = [](cancel_hook* c) {
      auto* self = static_cast<sleep_awaiter*>(c);
      self->task->loop()->remove_timer(*self);
      self->withdrawn = true;
      self->task->wake();
      return true;
    };
    task->loop()->add_timer(*this, clock::now() + delay);
    task->suspend_on(this, h);
  }
  void await_resume() { task->throw_if_cancelled(withdrawn); }
  ~sleep_awaiter() {
    if (scheduled() && task && task->loop()) task->loop()->remove_timer(*this);
  }
};

/// What sleep() returns: a movable value; the awaiter (holding the timer) lives in the frame.
struct sleep_for {
  clock::duration delay;
  sleep_awaiter operator co_await() const noexcept { return sleep_awaiter(delay); }
};

}  // namespace detail

/// Suspends the running task for `delay` (asyncio.sleep); cancellable.
template <class Rep, class Period>
detail::sleep_for sleep(std::chrono::duration<Rep, Period> delay) {
  return {std::chrono::duration_cast<detail::clock::duration>(delay)};
}

}  // namespace codestare::async_utils
