// handle: what call_soon, call_later and call_at return (asyncio's Handle and TimerHandle).
#pragma once

#include "job_queue.hpp"
#include "future_core.hpp"  // declares event_loop
#include "timer_heap.hpp"

#include <atomic>
#include <functional>

namespace codestare::async_utils {
namespace detail {

/// A scheduled callback. Shared by the loop (while queued or timed) and the user's handle, so
/// the count is atomic: call_soon_threadsafe hands handles to other threads.
struct handle_state : timer_node {
  explicit handle_state(event_loop* l, std::function<void()> f) : loop(l), fn(std::move(f)) {}
  void add_ref() noexcept { refs.fetch_add(1, std::memory_order_relaxed); }
  void release() noexcept {
    if (refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }
  /// A job that runs the callback unless cancelled, then drops the job's reference.
  static void run_job(void* self, bool run) noexcept;
  detail::job as_job() noexcept {
    add_ref();
    return {&run_job, this};
  }

  std::atomic<std::uint32_t> refs{1};
  std::atomic<bool> cancelled{false};
  /// A timer still in the loop's heap. Atomic, unlike the heap position: handle::cancel() reads
  /// it from any thread (and only then may touch the loop, which is alive while it holds).
  std::atomic<bool> in_heap{false};
  event_loop* loop;
  std::function<void()> fn;
};

}  // namespace detail

/// asyncio.Handle / TimerHandle: cancel() stops a callback that has not run yet.
class handle {
 public:
  handle() noexcept = default;
  explicit handle(detail::handle_state* state) noexcept : state_(state) {
    if (state_) state_->add_ref();
  }
  handle(const handle& other) noexcept : handle(other.state_) {}
  handle& operator=(handle other) noexcept {
    std::swap(state_, other.state_);
    return *this;
  }
  ~handle() {
    if (state_) state_->release();
  }
  /// Safe from any thread; a timer cancelled on its loop's thread leaves the timer heap at once.
  void cancel() noexcept;
  bool cancelled() const noexcept { return state_ && state_->cancelled.load(std::memory_order_acquire); }
  /// For timers: the loop time at which the callback is due.
  detail::clock::time_point when() const noexcept { return state_ ? state_->when : detail::clock::time_point{}; }
  explicit operator bool() const noexcept { return state_ != nullptr; }

 private:
  detail::handle_state* state_ = nullptr;
};

/// asyncio's name for the handle call_later / call_at return; the same type here.
using timer_handle = handle;

}  // namespace codestare::async_utils
