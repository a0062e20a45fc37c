// future<T>: asyncio.Future, a copyable handle to a result slot bound to a loop.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "future_core.hpp"
#include "event_loop.hpp"
#include "task_steps.hpp"

#include <memory>
#include <new>
#include <type_traits>

namespace codestare::async_utils {
namespace detail {

/// Room for a value constructed later (or never): a union, so that nothing runs until then.
template <class V>
union value_room {
  value_room() noexcept {}
  ~value_room() {}
  V value;
};

/// future_core plus the typed value. Tasks derive from it too, so a task is a future.
template <class T>
class future_state : public future_core {
 public:
  future_state(event_loop* loop, bool is_task) noexcept : future_core(loop, is_task) {}
  ~future_state() override {
    if constexpr (!std::is_void_v<T>) {
      if (has_value_) value_.value.~T();
    }
  }
  template <class... Args>
  void set_value(Args&&... args) {
    if (is_task()) throw std::logic_error("a task's result is set by its coroutine, not by set_result");
    if (done()) throw invalid_state_error("future is already done");
    if constexpr (!std::is_void_v<T>) emplace_value(std::forward<Args>(args)...);
    finish(future_status::finished);
  }
  /// result(): the value, or what check_result() throws.
  std::add_lvalue_reference_t<T> value() {
    check_result();
    if constexpr (!std::is_void_v<T>) return value_.value;
  }

 protected:
  template <class... Args>
  void emplace_value(Args&&... args) {
    ::new (static_cast<void*>(std::addressof(value_.value))) T(std::forward<Args>(args)...);
    has_value_ = true;
  }
  struct empty {};
  // The flag on its own rather than a std::optional: it takes the tail padding of future_core,
  // so that a task of a word-sized result fits 128 bytes (a frame cache class smaller).
  bool has_value_ = false;
  [[no_unique_address]] std::conditional_t<std::is_void_v<T>, empty, value_room<std::conditional_t<std::is_void_v<T>, int, T>>> value_;
};

/// co_await on a future or task: waits on it from the running task. Cancelling the waiting task
/// cancels the awaited future (asyncio's propagation) unless `shielded`. An rvalue await (Move)
/// takes the handle's reference over: the handle is left empty, and the result may be moved out
/// when no other handle can read it.
template <class T, bool Move, bool Shielded = false>
struct future_awaiter : completion_waiter, cancel_hook {
  future_state<T>* state;
  future_core* task = nullptr;
  bool withdrawn = false;

  explicit future_awaiter(future_state<T>* s) noexcept : state(s) {}
  future_awaiter(const future_awaiter&) = delete;
  ~future_awaiter() {
    if constexpr (Move) {
      completion_waiter::unlink();
      state->release();
    }
  }
  bool await_ready() const {
    check_same_loop(*state, running_loop, "co_await");
    return state->done();
  }
  void await_suspend(std::coroutine_handle<> h) {
    task = &current_task_core("co_await on a future");
    if (task == state) throw std::runtime_error("a task cannot await itself");
    notify = [](completion_waiter* w) { static_cast<future_awaiter*>(w)->task->wake(); };
    cancel = [](cancel_hook* c) {
      auto* self = static_cast<future_awaiter*>(c);
      if constexpr (Shielded) {
        // shield(): only the waiting task is cancelled, the awaited one runs on.
        self->completion_waiter::unlink();
        self->withdrawn = true;
        self->task->wake();
        return true;
      } else {
        return self->state->cancel(self->task->cancel_message());
      }
    };
    state->add_waiter(*this);
    task->suspend_on(this, h);
  }
  T await_resume() {
    completion_waiter::unlink();
    if (task) task->throw_if_cancelled(withdrawn);
    if constexpr (std::is_void_v<T>) state->value();
    else if constexpr (!std::is_copy_constructible_v<T>) return std::move(state->value());
    // An rvalue await may take the value only when no other handle can still read it.
    else if constexpr (Move) return state->use_count() == 1 ? T(std::move(state->value())) : T(state->value());
    else return state->value();
  }
};

}  // namespace detail

/// asyncio.Future. Copies share one slot. Use on the loop's thread (call_soon_threadsafe to
/// reach it from another). Done callbacks run via call_soon, never inline.
template <class T = void>
class future {
 public:
  using value_type = T;
  using state_type = detail::future_state<T>;

  future() noexcept = default;
  explicit future(state_type* state, bool adopt = false) noexcept : state_(state) {
    if (state_ && !adopt) state_->add_ref();
  }
  future(const future& other) noexcept : future(other.state_) {}
  future(future&& other) noexcept : state_(std::exchange(other.state_, nullptr)) {}
  future& operator=(future other) noexcept {
    std::swap(state_, other.state_);
    return *this;
  }
  ~future() {
    if (state_) state_->release();
  }

  explicit operator bool() const noexcept { return state_ != nullptr; }
  bool done() const { return state().done(); }
  bool cancelled() const { return state().cancelled(); }
  /// The value; throws invalid_state_error while pending, cancelled_error if cancelled, or the
  /// stored exception.
  decltype(auto) result() const { return state().value(); }
  std::exception_ptr exception() const { return state().exception(); }
  template <class... Args>
  void set_result(Args&&... args) {
    state().set_value(std::forward<Args>(args)...);
  }
  void set_exception(std::exception_ptr error) { state().set_exception(std::move(error)); }
  bool cancel(std::string message = {}) { return state().cancel(std::move(message)); }
  /// fn(future) runs on the loop via call_soon once this is done (at once if it already is).
  callback_id add_done_callback(std::function<void(future)> fn) {
    if (!fn) throw std::invalid_argument("add_done_callback: empty callback");
    return state().add_done_callback([fn = std::move(fn)](detail::future_core& c) { fn(future(static_cast<state_type*>(&c))); });
  }
  std::size_t remove_done_callback(callback_id id) { return state().remove_done_callback(id); }
  event_loop& get_loop() const {
    if (!state().loop()) throw std::runtime_error("event loop is closed");
    return *state().loop();
  }

  auto operator co_await() const& { return detail::future_awaiter<T, false>(state_ptr()); }
  /// `co_await std::move(f)` consumes the handle: f is empty afterwards.
  auto operator co_await() && { return detail::future_awaiter<T, true>(release_state()); }

  state_type* state_ptr() const {
    if (!state_) throw invalid_state_error("empty future handle");
    return state_;
  }

  /// Hands this handle's reference over to the caller; the handle becomes empty.
  state_type* release_state() {
    state_ptr();  // throws for an empty handle
    return std::exchange(state_, nullptr);
  }

 private:
  state_type& state() const { return *state_ptr(); }
  state_type* state_ = nullptr;
};

template <class T>
future<T> event_loop::create_future() {
  check_open();
  auto* state = new detail::future_state<T>(this, false);
  register_core(*state);
  return future<T>(state, true);
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <thread>
TEST_SUITE("future") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("futures: results, exceptions, cancellation, misuse") {
    event_loop loop;
    auto f = loop.create_future<std::string>();
    CHECK_FALSE(f.done());
    CHECK_THROWS_AS(f.result(), invalid_state_error);
    CHECK_THROWS_AS(f.exception(), invalid_state_error);
    f.set_result("v");
    CHECK(f.result() == "v");
    CHECK(f.exception() == nullptr);
    CHECK_THROWS_AS(f.set_result("again"), invalid_state_error);
    CHECK_FALSE(f.cancel());
    auto g = loop.create_future<int>();
    CHECK_THROWS_AS(g.set_exception(nullptr), std::invalid_argument);
    g.set_exception(std::make_exception_ptr(std::out_of_range("r")));
    CHECK_THROWS_AS(g.result(), std::out_of_range);
    auto h = loop.create_future<void>();
    CHECK(h.cancel("why"));
    CHECK(h.cancelled());
    CHECK_THROWS_WITH_AS(h.result(), "why", cancelled_error);
    future<int> empty;
    CHECK_THROWS_AS(empty.done(), invalid_state_error);
    CHECK(&f.get_loop() == &loop);
  }
  TEST_CASE("a loop blocked with nothing to do wakes for a post from another thread") {
    event_loop loop;
    auto fut = loop.create_future<int>();
    std::thread poster([&] {
      std::this_thread::sleep_for(20ms);
      loop.call_soon_threadsafe([&] { fut.set_result(9); });
    });
    auto guard = loop.call_later(30s, [&] { fut.cancel("not woken"); });
    fut.add_done_callback([&](future<int>) { loop.stop(); });
    loop.run_forever();
    CHECK(fut.result() == 9);
    poster.join();
  }

}
#endif
