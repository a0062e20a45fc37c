// How futures finish and tasks run: the loop-facing half of future_core (step, suspend, wake,
// cancel, finish), written after event_loop because it schedules on it.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../platform/log.hpp"
#include "future_core.hpp"
#include "any_task.hpp"
#include "event_loop.hpp"

#include <string>
#include <utility>

namespace codestare::async_utils::detail {

inline future_core& current_task_core(const char* what) {
  event_loop* loop = running_loop;
  if (!loop || !loop->running_task())
    throw std::runtime_error(std::string(what) + " must be awaited inside a task of a running event loop");
  return *loop->running_task();
}

[[noreturn, gnu::noinline]] inline void throw_other_loop(const char* what) {
  throw std::runtime_error(std::string(what) + ": the future or task is attached to a different loop");
}

ASYNC_UTILS_LINK void check_same_loop(const future_core& core, const event_loop* loop, const char* what);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void check_same_loop(const future_core& core, const event_loop* loop, const char* what) {
  // A closed loop forgot its futures (loop() is null): their outcome is final and may be read.
  if (core.loop() != loop && core.loop()) [[unlikely]]
    throw_other_loop(what);
}
#endif  // ASYNC_UTILS_DEFINITIONS

inline void future_core::release() noexcept {
  if (--refs_ != 0) return;
  if (status_ == future_status::finished && error_ && !retrieved_ && !report_never_retrieved()) return;
  dispose();
}

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK future_core::~future_core() { drop_callbacks(); }

ASYNC_UTILS_LINK bool future_core::report_never_retrieved() noexcept {
  retrieved_ = true;
  refs_ = 1;  // a handle for the report; the handler may even keep it
  {
    exception_context context{is_task_ ? "Task exception was never retrieved" : "Future exception was never retrieved",
                              error_, std::nullopt, std::nullopt};
    if (is_task_) context.task = any_task(this);
    if (loop_) {
      loop_->call_exception_handler(context);
    } else {
      try {
        log(log_level::error, context.message + ": " + describe(error_));
      } catch (...) {
      }
    }
  }
  return --refs_ == 0;
}

ASYNC_UTILS_LINK void future_core::check_result() {
  switch (status_) {
    case future_status::pending: throw invalid_state_error("result is not set yet");
    case future_status::cancelled: retrieved_ = true; throw cancelled_error(cancel_message());
    case future_status::finished:
      retrieved_ = true;
      if (error_) std::rethrow_exception(error_);
  }
}

ASYNC_UTILS_LINK std::exception_ptr future_core::exception() {
  if (status_ == future_status::pending) throw invalid_state_error("exception is not set yet");
  if (status_ == future_status::cancelled) throw cancelled_error(cancel_message());
  retrieved_ = true;
  return error_;
}

ASYNC_UTILS_LINK void future_core::set_exception(std::exception_ptr error) {
  if (is_task_) throw std::logic_error("a task's outcome is set by its coroutine, not by set_exception");
  if (done()) throw invalid_state_error("future is already done");
  if (!error) throw std::invalid_argument("set_exception: null exception_ptr");
  error_ = std::move(error);
  finish(future_status::finished);
}

ASYNC_UTILS_LINK bool future_core::cancel(std::string message) {
  if (done()) return false;
  set_cancel_message(std::move(message));  // may allocate: before anything changes
  ++cancel_requests_;
  if (!is_task_) {
    finish(future_status::cancelled);
    return true;
  }
  // asyncio: withdraw the current wait if possible; it stays registered, since an awaited task
  // may swallow this cancellation and need another one later.
  if (waiting_on_ && waiting_on_->cancel(waiting_on_)) return true;
  must_cancel_ = true;
  return true;
}

ASYNC_UTILS_LINK callback_id future_core::add_done_callback(std::function<void(future_core&)> fn) {
  if (!fn) throw std::invalid_argument("add_done_callback: empty callback");
  static thread_local callback_id last_id = 0;  // unique per thread, the futures' loop thread
  std::unique_ptr<done_callback> node(new done_callback);
  node->id = ++last_id;
  node->core = this;
  node->fn = std::move(fn);
  node->notify = &done_callback::schedule;
  const callback_id id = node->id;
  if (done()) done_callback::schedule(node.get());  // via call_soon, as asyncio does
  else waiters_.push_back(*node);
  node.release();  // owned by the list, or by the scheduled job
  return id;
}

ASYNC_UTILS_LINK std::size_t future_core::remove_done_callback(callback_id id) noexcept {
  std::size_t removed = 0;
  waiters_.for_each([&](completion_waiter& w) {
    if (w.notify != &done_callback::schedule || static_cast<done_callback&>(w).id != id) return;
    w.unlink();
    delete &static_cast<done_callback&>(w);
    ++removed;
  });
  return removed;
}

ASYNC_UTILS_LINK void future_core::drop_callbacks() noexcept {
  waiters_.for_each([](completion_waiter& w) {
    if (w.notify != &done_callback::schedule) return;
    w.unlink();
    delete &static_cast<done_callback&>(w);
  });
}

ASYNC_UTILS_LINK void future_core::done_callback::schedule(completion_waiter* w) {
  auto* self = static_cast<done_callback*>(w);
  event_loop* loop = self->core->loop_;
  if (!loop || loop->is_closed()) {  // nothing will run it any more
    delete self;
    return;
  }
  loop->schedule({&run, self});
  self->core->add_ref();  // the job's (after schedule, which may throw)
}

ASYNC_UTILS_LINK void future_core::done_callback::run(void* arg, bool run) noexcept {
  auto* self = static_cast<done_callback*>(arg);
  future_core* core = self->core;
  if (run) {
    try {
      self->fn(*core);
    } catch (...) {
      if (core->loop_)
        core->loop_->call_exception_handler({"Exception in done callback", std::current_exception(), std::nullopt, std::nullopt});
    }
  }
  delete self;
  core->release();
}
#endif  // ASYNC_UTILS_DEFINITIONS

inline void future_core::finish(future_status status) noexcept {
  if (status_ != future_status::pending) return;
  status_ = status;
  if (loop_) loop_->retire_core(*this);  // leaves the pending-task list
  while (completion_waiter* w = waiters_.pop_front()) w->notify(w);
}

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void future_core::start(std::coroutine_handle<> top, std::string&& name) {
  if (!name.empty()) extras().name = std::move(name);
  number_ = loop_->next_task_number();
  resume_at_ = top;
  loop_->register_core(*this);
  scheduled_ = true;
  loop_->schedule({&run_step, this});  // never inline: the task starts on a later iteration
}
#endif  // ASYNC_UTILS_DEFINITIONS

inline void future_core::suspend_on(cancel_hook* hook, std::coroutine_handle<> where) {
  resume_at_ = where;
  waiting_on_ = hook;
  // A cancel() that came while running reaches the new wait at once (asyncio's __step).
  if (must_cancel_ && hook && hook->cancel(hook)) must_cancel_ = false;
}

inline void future_core::wake() {
  waiting_on_ = nullptr;
  if (scheduled_ || !loop_ || done()) [[unlikely]] {
    wake_refused();
    return;
  }
  scheduled_ = true;
  loop_->schedule({&run_step, this});
}

[[gnu::noinline]] inline void future_core::wake_refused() {
  // Two wake-ups for one suspension would resume a coroutine twice; refuse loudly.
  if (scheduled_) log(log_level::error, "internal error: task " + name() + " woken twice");
}

inline void future_core::throw_if_cancelled(bool withdrawn) {
  if (withdrawn || must_cancel_) [[unlikely]]
    throw_cancelled();
}

[[gnu::noinline]] inline void future_core::throw_cancelled() {
  must_cancel_ = false;
  throw cancelled_error(cancel_message());
}

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void future_core::run_step(void* self, bool run) noexcept {
  if (run) static_cast<future_core*>(self)->step();
}

ASYNC_UTILS_LINK void future_core::step() {
  scheduled_ = false;
  if (!started_) {
    started_ = true;
    if (must_cancel_) {  // cancelled before it started: the body never runs
      must_cancel_ = false;
      destroy_frame();
      finish(future_status::cancelled);
      release();
      return;
    }
  }
  future_core* previous = loop_->current_;
  loop_->current_ = this;
  if (gate_) [[unlikely]] {
    resume_gate* gate = std::exchange(gate_, nullptr);
    if (!gate->pass(gate)) {  // waits on: the coroutine stays suspended
      loop_->current_ = previous;
      return;
    }
  }
  resume_at_.resume();
  loop_->current_ = previous;
  if (frame_done()) complete();
}

ASYNC_UTILS_LINK void future_core::complete() noexcept {
  harvest();
  destroy_frame();
  future_status status = future_status::finished;
  if (error_) {
    try {
      std::rethrow_exception(error_);
    } catch (const cancelled_error& e) {
      status = future_status::cancelled;
      try {
        set_cancel_message(std::string(e.message()));
      } catch (...) {  // out of memory for the message: the cancellation still counts
      }
      error_ = nullptr;
    } catch (...) {
    }
  } else if (must_cancel_) {
    status = future_status::cancelled;  // cancel() arrived right before the coroutine returned
  }
  must_cancel_ = false;
  finish(status);
  release();  // the running reference
}

ASYNC_UTILS_LINK void future_core::abandon() noexcept {
  waiting_on_ = nullptr;
  gate_ = nullptr;
  must_cancel_ = false;
  destroy_frame();
  finish(future_status::cancelled);
  release();
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils::detail
