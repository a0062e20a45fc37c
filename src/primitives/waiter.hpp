// The parked task every primitive queues: a node in the awaiting frame, plus the scoped guard.
#pragma once

#include "../platform/config.hpp"
#include "../platform/log.hpp"
#include "../runtime/intrusive_list.hpp"
#include "../runtime/future_core.hpp"
#include "../runtime/task_steps.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/task.hpp"

#include <coroutine>
#include <exception>
#include <string>
#include <utility>

namespace codestare::async_utils {
namespace detail {

/// A task suspended on a primitive (asyncio keeps a future per waiter; we keep this node in the
/// awaiting coroutine frame, so waiting never allocates). Its list is the primitive's FIFO.
struct parked_task : list_node, cancel_hook {
  future_core* task = nullptr;
  bool woken = false;      // chosen by the primitive; resumes on a later loop iteration
  bool withdrawn = false;  // cancelled while parked: unlinked, resumes only to throw
  bool abandoned = false;  // its primitive was destroyed: never touch it again

  parked_task() noexcept = default;
  // Movable until await_suspend (so wait_for, gather, shield and create_task can keep the
  // awaiter by value); the node only parks then, so a move yields a fresh, unbound node.
  // Moving an awaiter while it is suspended is not possible through the library.
  parked_task(parked_task&&) noexcept : list_node(), cancel_hook() {}
  parked_task(const parked_task&) = delete;
  parked_task& operator=(const parked_task&) = delete;

  /// Binds the running task (await_suspend; throws outside a task before anything changed).
  void bind(const char* what) { task = &current_task_core(what); }
  /// Links this node into `queue` and suspends the task; `cancel` must be set already, since
  /// suspend_on may call it at once for a cancel() that arrived while the task ran.
  template <class Node>
  void park(intrusive_list<Node>& queue, std::coroutine_handle<> h) {
    queue.push_back(static_cast<Node&>(*this));
    task->suspend_on(this, h);
  }
  /// The primitive hands this waiter what it waited for: schedule its task.
  void wake_up() {
    woken = true;
    task->wake();
  }
  /// The usual cancel hook body: leave the queue, resume the task so that it throws.
  void withdraw() {
    unlink();
    withdrawn = true;
    task->wake();
  }
  static bool withdraw_hook(cancel_hook* c) {
    static_cast<parked_task*>(c)->withdraw();
    return true;
  }
  /// Throws cancelled_error when the wait was withdrawn or a cancel() came after the wake-up.
  void check_cancelled() { task->throw_if_cancelled(withdrawn); }
  /// First thing an await_resume does before it touches its primitive.
  void throw_if_abandoned() {
    if (abandoned) task->throw_if_cancelled(true);
  }
  /// The primitive is being destroyed: the wait ends with cancelled_error (a woken task is
  /// scheduled already) and nothing of the primitive is touched from now on.
  void abandon() {
    unlink();
    abandoned = true;
    withdrawn = true;
    if (!std::exchange(woken, false)) task->wake();
  }
};

/// Runs fn, which may schedule tasks, from a destructor: a failure there (out of memory while
/// scheduling) is logged instead of terminating.
template <class F>
void from_destructor(const char* what, F&& fn) noexcept {
  try {
    fn();
  } catch (const std::exception& e) {
    try {
      log(log_level::error, std::string(what) + ": " + e.what());
    } catch (...) {
    }
  } catch (...) {
  }
}

/// A primitive's destructor: every task still waiting on it (parked or woken) gets
/// cancelled_error instead of a pointer to a dead object (SPEC: destroying ends waits).
ASYNC_UTILS_LINK void abandon_all(intrusive_list<parked_task>& waiters) noexcept;

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void abandon_all(intrusive_list<parked_task>& waiters) noexcept {
  while (parked_task* w = waiters.pop_front()) from_destructor("abandoning a waiter failed", [w] { w->abandon(); });
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace detail

/// What `co_await x.scoped()` returns for a lock, condition or semaphore: owns one acquisition
/// and releases it when destroyed (Python's `async with x:`). Move-only.
template <class Primitive>
class [[nodiscard]] scoped_guard {
 public:
  scoped_guard() noexcept = default;
  explicit scoped_guard(Primitive& p) noexcept : p_(&p) {}
  scoped_guard(scoped_guard&& other) noexcept : p_(std::exchange(other.p_, nullptr)) {}
  scoped_guard& operator=(scoped_guard&& other) {
    if (this != &other) {
      reset();
      p_ = std::exchange(other.p_, nullptr);
    }
    return *this;
  }
  scoped_guard(const scoped_guard&) = delete;
  scoped_guard& operator=(const scoped_guard&) = delete;
  ~scoped_guard() {
    // Releasing can only fail if someone released behind the guard's back; a destructor must
    // not throw, so that misuse is logged.
    detail::from_destructor("scoped_guard: release failed", [this] { reset(); });
  }

  /// True while the guard still owns its acquisition.
  bool owns() const noexcept { return p_ != nullptr; }
  explicit operator bool() const noexcept { return owns(); }
  /// Releases now (the end of the `async with` block, early).
  void reset() {
    if (p_) std::exchange(p_, nullptr)->release();
  }

 private:
  Primitive* p_ = nullptr;
};

}  // namespace codestare::async_utils
