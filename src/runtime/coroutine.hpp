// coroutine<T>: what an `async def` returns. Lazy, move-only, awaited once or run by a task.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "test_support.hpp"
#include "handle.hpp"

#include <coroutine>
#include <cstddef>
#include <exception>
#include <new>
#include <optional>
#include <type_traits>
#include <utility>

#include "frame_cache.hpp"

namespace codestare::async_utils {
namespace detail {

/// A coroutine frame is a block of the frame cache: the frame and a 16-byte header, nothing
/// more (a task keeps its state in a block of its own). Out of line, so that each coroutine
/// type does not inline the cache.
#ifdef ASYNC_UTILS_TESTS
inline thread_local std::size_t last_frame_size = 0;  // the tests read what a frame asked for
#endif
[[gnu::noinline]] inline void* allocate_frame(std::size_t n) {
#ifdef ASYNC_UTILS_TESTS
  last_frame_size = n;
#endif
  return cached_allocate(n);
}
[[gnu::noinline]] inline void free_frame(void* frame, std::size_t n) noexcept { cached_free(frame, n); }

/// Shared by every coroutine promise. Awaiting a child starts it inline and, if it finishes
/// without suspending, continues the parent by returning from await_suspend: no new stack frame
/// per await, so a million ready awaits in a loop cannot overflow the stack even where the
/// compiler does not turn symmetric transfer into a tail call (g++ at -O0 or with sanitizers).
struct promise_base {
  std::coroutine_handle<> continuation;
  bool started_inline = false;  // the parent's await_suspend is still on the stack below us
  std::exception_ptr error;

  static void* operator new(std::size_t n) { return allocate_frame(n); }
  static void operator delete(void* frame, std::size_t n) noexcept { free_frame(frame, n); }

  std::suspend_always initial_suspend() noexcept { return {}; }
  struct final_awaiter {
    bool await_ready() const noexcept { return false; }
    template <class P>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<P> h) const noexcept {
      promise_base& p = h.promise();
      if (p.started_inline || !p.continuation) return std::noop_coroutine();
      return p.continuation;
    }
    void await_resume() const noexcept {}
  };
  final_awaiter final_suspend() const noexcept { return {}; }
  void unhandled_exception() noexcept { error = std::current_exception(); }
};

template <class T>
struct promise_value : promise_base {
  std::optional<T> value;
  template <class U = T>
    requires std::is_convertible_v<U&&, T>
  void return_value(U&& v) {
    value.emplace(std::forward<U>(v));
  }
  T take() {
    if (error) std::rethrow_exception(error);
    return std::move(*value);
  }
};
template <>
struct promise_value<void> : promise_base {
  void return_void() const noexcept {}
  void take() const {
    if (error) std::rethrow_exception(error);
  }
};

}  // namespace detail

/// asyncio's coroutine object. Starts when awaited or given to create_task; `co_await` yields
/// its T or rethrows. Awaiting it a second time throws invalid_state_error. Destroying an
/// unstarted one frees its frame.
template <class T = void>
class [[nodiscard]] coroutine {
  static_assert(!std::is_reference_v<T>, "coroutine<T&> is not supported: return a pointer or std::reference_wrapper");

 public:
  using value_type = T;
  struct promise_type : detail::promise_value<T> {
    coroutine get_return_object() noexcept { return coroutine(std::coroutine_handle<promise_type>::from_promise(*this)); }
  };
  using handle_type = std::coroutine_handle<promise_type>;

  coroutine() noexcept = default;
  explicit coroutine(handle_type h) noexcept : handle_(h) {}
  coroutine(coroutine&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
  coroutine& operator=(coroutine&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, {});
    }
    return *this;
  }
  ~coroutine() { reset(); }

  /// False once awaited, handed to a task, or moved from.
  bool valid() const noexcept { return static_cast<bool>(handle_); }
  /// True when it ran to its end (an unstarted or consumed coroutine is not done).
  bool done() const noexcept { return handle_ && handle_.done(); }
  /// Destroys the frame, started or not (Python's coroutine.close()).
  void reset() noexcept {
    if (handle_) std::exchange(handle_, {}).destroy();
  }
  handle_type handle() const noexcept { return handle_; }
  /// Hands the frame over (to a task); the coroutine becomes invalid.
  handle_type release() noexcept { return std::exchange(handle_, {}); }

  struct awaiter {
    handle_type h;
    bool await_ready() const noexcept { return !h; }
    bool await_suspend(std::coroutine_handle<> parent) {
      auto& p = h.promise();
      p.continuation = parent;
      p.started_inline = true;
      h.resume();
      p.started_inline = false;
      return !h.done();  // finished already: continue the parent right here
    }
    T await_resume() {
      if (!h) throw invalid_state_error("coroutine was already awaited or scheduled");
      return h.promise().take();
    }
    ~awaiter() {
      if (h) h.destroy();
    }
  };
  awaiter operator co_await() && noexcept { return awaiter{release()}; }
  awaiter operator co_await() & noexcept { return awaiter{release()}; }

 private:
  handle_type handle_;
};

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("coroutine") {
  using namespace codestare::async_utils;

  TEST_CASE("a million sequential awaits of ready coroutines do not grow the stack") {
    auto one = []() -> coroutine<int> { co_return 1; };
    auto many = [&]() -> coroutine<long> {
      long sum = 0;
      for (int i = 0; i < 1000000; ++i) sum += co_await one();
      co_return sum;
    };
    testing::run_bounded([&]() -> coroutine<void> { CHECK(co_await many() == 1000000); }(), std::chrono::seconds(60));
  }

  TEST_CASE("results, exceptions, and awaiting a consumed coroutine") {
    auto value = []() -> coroutine<std::string> { co_return "x"; };
    auto fails = []() -> coroutine<int> {
      throw std::invalid_argument("bad");
      co_return 0;
    };
    auto body = [&]() -> coroutine<void> {
      CHECK(co_await value() == "x");
      CHECK_THROWS_AS(co_await fails(), std::invalid_argument);
      auto c = value();
      CHECK(c.valid());
      CHECK(co_await c == "x");
      CHECK_FALSE(c.valid());
      CHECK_THROWS_AS(co_await c, invalid_state_error);
    };
    testing::run_bounded(body());
  }

  TEST_CASE("destroying an unstarted coroutine frees its frame and arguments") {
    static int alive = 0;
    struct tracked {
      tracked() { ++alive; }
      tracked(const tracked&) { ++alive; }
      ~tracked() { --alive; }
    };
    auto make = [](tracked) -> coroutine<void> { co_return; };
    {
      auto c = make(tracked{});
      CHECK(alive == 1);  // the frame's copy of the argument
      CHECK_FALSE(c.done());
    }
    CHECK(alive == 0);
    auto c = make(tracked{});
    c.reset();
    CHECK(alive == 0);
    CHECK_FALSE(c.valid());
  }

  TEST_CASE("a lazy coroutine's frame takes its own size and a 16-byte header, no room for a task") {
    namespace detail = codestare::async_utils::detail;
    auto make = [](long v) -> coroutine<long> { co_return v; };
    detail::frame_cache_trim();  // the next blocks of the class are carved one after another from a new chunk
    detail::last_frame_size = 0;
    auto a = make(1);
    const std::size_t frame = detail::last_frame_size;
    auto b = make(2);
    REQUIRE(frame > 0);
    CHECK(detail::cached_block_size(frame) < frame + 2 * detail::frame_granule);
#ifndef ASYNC_UTILS_NO_FRAME_CACHE
    const auto distance = static_cast<std::byte*>(b.handle().address()) - static_cast<std::byte*>(a.handle().address());
    CHECK(distance == static_cast<std::ptrdiff_t>(detail::cached_block_size(frame)));
#endif
    testing::run_bounded([](coroutine<long> x, coroutine<long> y) -> coroutine<void> {
      CHECK(co_await std::move(x) + co_await std::move(y) == 3);
    }(std::move(a), std::move(b)));
  }
}
#endif
