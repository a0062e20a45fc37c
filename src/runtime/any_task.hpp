// any_task, the untyped task handle (what current_task() and all_tasks() return), and the
// exception_context given to the loop's exception handler.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "future_core.hpp"

#include <optional>
#include <ostream>
#include <string>
#include <utility>

namespace codestare::async_utils {

namespace detail {
// Here, before event_loop.hpp, whose definitions name tasks in their messages.
#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::string future_core::name() const {
  if (extras_ && !extras_->name.empty()) return extras_->name;
  if (!is_task_) return {};
  return "Task-" + std::to_string(number_);
}
#endif  // ASYNC_UTILS_DEFINITIONS
}  // namespace detail

/// A handle to a task of any result type (asyncio.Task as seen by all_tasks()).
/// Copyable; use it on its loop's thread only.
class any_task {
 public:
  any_task() noexcept = default;
  explicit any_task(detail::future_core* core) noexcept : core_(core) {
    if (core_) core_->add_ref();
  }
  any_task(const any_task& other) noexcept : any_task(other.core_) {}
  any_task(any_task&& other) noexcept : core_(std::exchange(other.core_, nullptr)) {}
  any_task& operator=(any_task other) noexcept {
    std::swap(core_, other.core_);
    return *this;
  }
  ~any_task() {
    if (core_) core_->release();
  }

  explicit operator bool() const noexcept { return core_ != nullptr; }
  std::string name() const { return core().name(); }
  void set_name(std::string name) { core().set_name(std::move(name)); }
  bool done() const { return core().done(); }
  bool cancelled() const { return core().cancelled(); }
  /// Requests cancellation (asyncio's Task.cancel); false when the task is already done.
  bool cancel(std::string message = {}) { return core().cancel(std::move(message)); }
  /// asyncio's cancelling(): how many cancellation requests the task has received.
  unsigned cancelling() const { return core().cancel_requests(); }
  /// asyncio's uncancel(): one cancellation request handled; returns the requests left.
  unsigned uncancel() { return core().uncancel(); }
  /// The exception the task ended with (null if it returned); throws while it is pending
  /// (invalid_state_error) or when it was cancelled (cancelled_error).
  std::exception_ptr exception() const { return core().exception(); }
  /// Runs fn(task) on the loop, via call_soon, once the task is done.
  callback_id add_done_callback(std::function<void(any_task)> fn) {
    return core().add_done_callback([fn = std::move(fn)](detail::future_core& c) { fn(any_task(&c)); });
  }
  std::size_t remove_done_callback(callback_id id) { return core().remove_done_callback(id); }

  friend bool operator==(const any_task& a, const any_task& b) noexcept { return a.core_ == b.core_; }
  friend std::ostream& operator<<(std::ostream& os, const any_task& t) {
    if (!t) return os << "<task none>";
    os << "<task " << t.name();
    if (t.cancelled()) os << " cancelled";
    else if (t.done()) os << " done";
    else os << " pending";
    return os << '>';
  }
  detail::future_core* core_ptr() const noexcept { return core_; }

 private:
  detail::future_core& core() const {
    if (!core_) throw invalid_state_error("empty task handle");
    return *core_;
  }
  detail::future_core* core_ = nullptr;
};

/// What the loop's exception handler receives (asyncio's context dict).
struct exception_context {
  std::string message;
  std::exception_ptr exception;
  std::optional<any_task> task;
  /// The sentinel task of the task_nursery whose child failed, if any.
  std::optional<any_task> sentinel;
};

/// A readable one-line description of an exception_ptr (the what() of std::exception).
ASYNC_UTILS_LINK std::string describe(const std::exception_ptr& error);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::string describe(const std::exception_ptr& error) {
  if (!error) return "no exception";
  try {
    std::rethrow_exception(error);
  } catch (const cancelled_error& e) {
    return std::string("cancelled_error: ") + e.what();
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown exception";
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils
