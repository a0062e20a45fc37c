// task<T>: asyncio.Task, a future driving a coroutine; create_task, current_task, all_tasks.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace codestare::async_utils {
namespace detail {

/// A task's state: the future part plus the coroutine it drives (freed as soon as it ends).
template <class T>
class task_state final : public future_state<T> {
 public:
  task_state(event_loop* loop, typename coroutine<T>::handle_type frame, std::string name)
      : future_state<T>(loop, true), frame_(frame) {
    this->start(frame, std::move(name));
  }
  ~task_state() override { destroy_frame(); }

 protected:
  void harvest() noexcept override {
    auto& p = frame_.promise();
    if (p.error) {
      this->error_ = p.error;
      return;
    }
    if constexpr (!std::is_void_v<T>) {
      try {
        this->value_.emplace(std::move(*p.value));
      } catch (...) {
        this->error_ = std::current_exception();
      }
    }
  }
  void destroy_frame() noexcept override {
    if (frame_) std::exchange(frame_, {}).destroy();
  }
  bool frame_done() const noexcept override { return !frame_ || frame_.done(); }

 private:
  typename coroutine<T>::handle_type frame_;
};

template <class R, class A>
coroutine<R> await_in_coroutine(A aw) {
  if constexpr (std::is_void_v<R>) co_await std::move(aw);
  else co_return co_await std::move(aw);
}

template <class A>
struct is_coroutine : std::false_type {};
template <class T>
struct is_coroutine<coroutine<T>> : std::true_type {};

/// A coroutine<R> that runs `aw`: the coroutine itself, or one that awaits any other awaitable
/// (an lvalue is awaited by reference, so a coroutine_wrapper stays with its creator).
template <class A>
auto as_coroutine(A&& aw) {
  using R = await_result_t<A>;
  if constexpr (is_coroutine<std::remove_cvref_t<A>>::value && std::is_rvalue_reference_v<A&&>) return std::move(aw);
  else return await_in_coroutine<R, A>(std::forward<A>(aw));
}

/// Result of a finished future for a single consumer: moved out when nobody else can read it.
template <class T>
T take_result(future_state<T>& state) {
  if constexpr (std::is_void_v<T>) state.value();
  else if constexpr (!std::is_copy_constructible_v<T>) return std::move(state.value());
  else return state.use_count() == 1 ? T(std::move(state.value())) : T(state.value());
}

}  // namespace detail

/// asyncio.Task: a future<T> whose result is set by the coroutine it drives. Copyable handle;
/// the task keeps running when every handle is gone. Loop thread only.
template <class T = void>
class task : public future<T> {
 public:
  using future<T>::future;
  task(const future<T>&) = delete;  // a plain future is not a task

  std::string name() const { return this->state_ptr()->name(); }
  void set_name(std::string name) { this->state_ptr()->set_name(std::move(name)); }
  /// asyncio's cancelling(): how many cancel() calls the task has received.
  unsigned cancelling() const { return this->state_ptr()->cancel_requests(); }
  /// Only the coroutine sets a task's outcome (asyncio raises RuntimeError for these).
  template <class... Args>
  void set_result(Args&&...) = delete;
  void set_exception(std::exception_ptr) = delete;
  operator any_task() const { return any_task(this->state_ptr()); }
};

template <class A>
auto event_loop::create_task(A&& aw, std::string name) {
  static_assert(awaitable<A>, "create_task needs a coroutine or another awaitable");
  check_open();
  using R = await_result_t<A>;
  coroutine<R> coro = detail::as_coroutine(std::forward<A>(aw));
  if (!coro.valid()) throw invalid_state_error("coroutine was already awaited or scheduled");
  auto* state = new detail::task_state<R>(this, coro.release(), std::move(name));
  return task<R>(state);  // the new state's own reference is the "running" one
}

namespace detail {
template <class A>
struct is_future_handle : std::false_type {};
template <class T>
struct is_future_handle<future<T>> : std::true_type {};
template <class T>
struct is_future_handle<task<T>> : std::true_type {};
}  // namespace detail

template <class A>
auto event_loop::run_until_complete(A&& aw) {
  auto fut = [&] {
    if constexpr (detail::is_future_handle<std::remove_cvref_t<A>>::value) return aw;
    else return create_task(std::forward<A>(aw));
  }();
  auto* state = fut.state_ptr();
  struct stopper : detail::completion_waiter {
    event_loop* loop;
  } waiter;
  waiter.loop = this;
  waiter.notify = [](detail::completion_waiter* w) { static_cast<stopper*>(w)->loop->stop(); };
  if (!state->done()) {
    state->add_waiter(waiter);
    run_forever();
  }
  if (!state->done()) throw std::runtime_error("event loop stopped before the future completed");
  return detail::take_result(*state);
}

/// Schedules `aw` on the running loop (asyncio.create_task).
template <class A>
auto create_task(A&& aw, std::string name = {}) {
  return event_loop::current().create_task(std::forward<A>(aw), std::move(name));
}

/// The task running now, if any (asyncio.current_task).
inline std::optional<any_task> current_task() {
  event_loop* loop = detail::running_loop;
  if (!loop || !loop->running_task()) return std::nullopt;
  return any_task(loop->running_task());
}

/// The running loop's tasks that are not done yet (asyncio.all_tasks).
inline std::vector<any_task> all_tasks() {
  std::vector<any_task> tasks;
  event_loop::current().for_each_task([&](detail::future_core& core) { tasks.emplace_back(&core); });
  return tasks;
}

}  // namespace codestare::async_utils
