// The untyped state behind future<T> and task<T>: status, waiters, done callbacks, cancellation.
#pragma once

#include "intrusive_list.hpp"

#include <atomic>
#include <coroutine>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace codestare::async_utils {

class event_loop;
/// Identifies a done callback for remove_done_callback (std::function cannot be compared).
using callback_id = std::uint64_t;

namespace detail {

enum class future_status : std::uint8_t { pending, finished, cancelled };

/// Waits for a future to finish (an awaiting task, gather, run_until_complete, a done
/// callback). Notified synchronously when it finishes, after being unlinked; notify only
/// schedules, never runs user code. Waiters and done callbacks share one list, so they are
/// scheduled in the order they were registered (asyncio wakes an awaiting task by a done
/// callback: one added before the await runs before the task resumes).
struct completion_waiter : list_node {
  void (*notify)(completion_waiter*) = nullptr;
};

/// What a suspended task currently waits on. task.cancel() calls cancel(), which withdraws the
/// wait and schedules the task so that its await throws cancelled_error; false means the wait
/// can no longer be withdrawn (as asyncio's `_fut_waiter.cancel()` returning False).
struct cancel_hook {
  bool (*cancel)(cancel_hook*) = nullptr;
};

/// An awaitable that needs to run code in its task before the coroutine resumes (and may decide
/// to keep waiting instead) installs one with set_resume_gate() while suspending: the next
/// step() calls pass() with the task current; false means it re-suspended, so the coroutine
/// stays suspended. Lets a loop such as condition.wait_for run without a coroutine frame.
struct resume_gate {
  bool (*pass)(resume_gate*) noexcept = nullptr;
};

/// One object serves asyncio's Future and Task: a task is a future that also drives a coroutine.
/// Reference counted by handles (loop thread only); a task holds one extra reference while it runs.
class future_core : public list_node {
 public:
  future_core(event_loop* loop, bool is_task) noexcept : loop_(loop), is_task_(is_task) {}
  future_core(const future_core&) = delete;
  future_core& operator=(const future_core&) = delete;
  virtual ~future_core();

  void add_ref() noexcept { ++refs_; }
  void release() noexcept;
  std::uint32_t use_count() const noexcept { return refs_; }

  event_loop* loop() const noexcept { return loop_; }
  bool done() const noexcept { return status_ != future_status::pending; }
  bool cancelled() const noexcept { return status_ == future_status::cancelled; }
  bool is_task() const noexcept { return is_task_; }
  bool has_error() const noexcept { return status_ == future_status::finished && error_ != nullptr; }

  /// Throws what result() must throw (invalid_state_error, cancelled_error, the stored
  /// exception); returns normally when a value is there. Marks the outcome as retrieved.
  void check_result();
  /// asyncio's exception(): the stored exception or null; throws when pending or cancelled.
  std::exception_ptr exception();
  void set_exception(std::exception_ptr error);
  /// Future: cancels now. Task: withdraws the current wait or cancels at the next suspension.
  bool cancel(std::string message);
  callback_id add_done_callback(std::function<void(future_core&)> fn);
  std::size_t remove_done_callback(callback_id id) noexcept;
  void add_waiter(completion_waiter& waiter) noexcept { waiters_.push_back(waiter); }
  const std::string& cancel_message() const noexcept { return extras_ ? extras_->cancel_message : no_text(); }

  // ---- task part -------------------------------------------------------------------------
  std::string name() const;
  void set_name(std::string name) { extras().name = std::move(name); }
  /// asyncio's cancelling(): the number of cancel() calls so far.
  unsigned cancel_requests() const noexcept { return cancel_requests_; }
  /// asyncio's uncancel(): takes back one request; at zero a cancellation not yet delivered is
  /// dropped too (CPython 3.12+), so a handled timeout leaves no stray cancellation behind.
  unsigned uncancel() noexcept {
    if (cancel_requests_ > 0 && --cancel_requests_ == 0) must_cancel_ = false;
    return cancel_requests_;
  }
  /// A cancellation taken by an awaitable that had to return a value first: delivered again at
  /// the task's next suspension (the request count is unchanged).
  void keep_cancel_pending() noexcept {
    if (cancel_requests_ > 0) must_cancel_ = true;
  }
  /// Called by an awaitable about to suspend the running task at `where`.
  void suspend_on(cancel_hook* hook, std::coroutine_handle<> where);
  /// A task created to wait on `hook` from the start (gather's): a cancel() even before its
  /// first step reaches the hook. Its first await on the hook's object suspends on it as usual.
  void wait_on(cancel_hook* hook) noexcept { waiting_on_ = hook; }
  /// Whatever the outcome, nobody is to be told that it was never retrieved (a gather has
  /// taken charge of it, as asyncio's gather retrieves its children's exceptions).
  void mark_retrieved() noexcept { retrieved_ = true; }
  /// Schedules the next step (the awaited thing is ready or was withdrawn).
  void wake();
  /// Called by awaitables on resumption: throws cancelled_error if their wait was withdrawn or a
  /// cancel() arrived after the wake-up (consuming it, as one asyncio __step would).
  void throw_if_cancelled(bool withdrawn = false);
  /// A cancel() that arrived while the task could not withdraw its wait, not yet delivered.
  bool cancel_pending() const noexcept { return must_cancel_; }
  /// See resume_gate; consumed by the next step().
  void set_resume_gate(resume_gate* gate) noexcept { gate_ = gate; }
  /// Runs the task until its next suspension (loop thread).
  void step();
  /// Loop closing with this task pending: destroys the coroutine, ends the task cancelled.
  void abandon() noexcept;

 protected:
  /// Task: moves the outcome out of the finished coroutine into this state.
  virtual void harvest() noexcept {}
  /// Frees this state (a task state may live in its coroutine's frame block).
  virtual void dispose() noexcept { delete this; }
  /// Task: destroys the coroutine frame (finished or not).
  void destroy_frame() noexcept {
    if (frame_) std::exchange(frame_, {}).destroy();
  }
  bool frame_done() const noexcept { return !frame_ || frame_.done(); }
  /// Task: numbers and registers it, and schedules its first step; `name` is moved from only
  /// when not empty.
  void start(std::coroutine_handle<> top, std::string&& name);
  void finish(future_status status) noexcept;

  event_loop* loop_;
  std::exception_ptr error_;
  std::coroutine_handle<> frame_;  // task: the coroutine it drives, until that ends

 private:
  friend class codestare::async_utils::event_loop;
  /// A done callback, waiting in waiters_ like an awaiting task; once notified it is the job
  /// that runs it (holding a reference to the future until then).
  struct done_callback : completion_waiter {
    callback_id id;
    future_core* core;
    std::function<void(future_core&)> fn;
    static void schedule(completion_waiter* w);
    static void run(void* self, bool run) noexcept;
  };
  /// Frees the done callbacks never scheduled (a future destroyed while pending).
  void drop_callbacks() noexcept;
  /// What most futures and tasks never use, allocated on first use: keeps the state small
  /// enough to live behind its coroutine frame.
  struct extra_state {
    std::string name;  // empty: "Task-<number>"
    std::string cancel_message;
  };
  static const std::string& no_text() noexcept {
    static const std::string empty;
    return empty;
  }
  extra_state& extras() {
    if (!extras_) extras_ = std::make_unique<extra_state>();
    return *extras_;
  }
  /// Sets the cancel message (allocating the extras only for a non-empty one).
  void set_cancel_message(std::string&& message) {
    if (extras_ || !message.empty()) extras().cancel_message = std::move(message);
  }
  static void run_step(void* self, bool run) noexcept;
  void complete() noexcept;
  [[noreturn]] void throw_cancelled();
  void wake_refused();
  /// release() at zero with an exception nobody retrieved: reports it (the handler may keep a
  /// reference); true when the state is to be freed now.
  [[gnu::cold]] bool report_never_retrieved() noexcept;

  intrusive_list<completion_waiter> waiters_;  // awaiting tasks and done callbacks, in order
  std::unique_ptr<extra_state> extras_;
  std::uint64_t number_ = 0;
  // Task part.
  std::coroutine_handle<> resume_at_;
  cancel_hook* waiting_on_ = nullptr;
  resume_gate* gate_ = nullptr;
  std::uint32_t refs_ = 1;
  unsigned cancel_requests_ = 0;
  future_status status_ = future_status::pending;
  bool is_task_;
  bool started_ = false;
  bool scheduled_ = false;
  bool must_cancel_ = false;
  bool retrieved_ = false;  // someone looked at the outcome: no "never retrieved" report
};

/// The running task of the running loop, or an exception naming `what` that needs one.
future_core& current_task_core(const char* what);
/// asyncio's "attached to a different loop": std::runtime_error unless `core` belongs to `loop`.
void check_same_loop(const future_core& core, const event_loop* loop, const char* what);

}  // namespace detail
}  // namespace codestare::async_utils
