// make_async(fn): turns a blocking function into one that returns a coroutine running it on the
// loop's default executor (codestare's make_async decorator).
#pragma once

#include "../platform/config.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/job_queue.hpp"
#include "../runtime/event_loop.hpp"
#include "../runtime/awaitable.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/executor.hpp"
#include "../runtime/run.hpp"

#include <functional>
#include <memory>
#include <type_traits>
#include <utility>

namespace codestare::async_utils {
namespace detail {

/// The declared result of a callable whose signature is fixed (function pointer, std::function,
/// a lambda or functor with one non-template call operator); void for generic ones.
template <class F, class = void>
struct declared_result {
  using type = void;
  static constexpr bool known = false;
};
template <class R, class... A>
struct declared_result<R (*)(A...)> {
  using type = R;
  static constexpr bool known = true;
};
template <class R, class... A>
struct declared_result<std::function<R(A...)>> {
  using type = R;
  static constexpr bool known = true;
};
template <class M>
struct call_operator_result;
template <class C, class R, class... A>
struct call_operator_result<R (C::*)(A...)> {
  using type = R;
};
template <class C, class R, class... A>
struct call_operator_result<R (C::*)(A...) const> {
  using type = R;
};
template <class C, class R, class... A>
struct call_operator_result<R (C::*)(A...) noexcept> {
  using type = R;
};
template <class C, class R, class... A>
struct call_operator_result<R (C::*)(A...) const noexcept> {
  using type = R;
};
template <class F>
struct declared_result<F, std::void_t<decltype(&F::operator())>> {
  using type = typename call_operator_result<decltype(&F::operator())>::type;
  static constexpr bool known = true;
};

/// True when F is known to return an awaitable: make_async(fn) is then fn itself.
template <class F>
inline constexpr bool returns_awaitable = declared_result<std::decay_t<F>>::known && awaitable<typename declared_result<std::decay_t<F>>::type>;


/// A move-only nullary job. The coroutine below stores this, never the caller's callable: g++
/// warns (-Wsubobject-linkage) when a header coroutine's frame holds a lambda's type.
template <class R>
class erased_job {
 public:
  template <class F>
  explicit erased_job(F fn) : impl_(std::make_unique<model<F>>(std::move(fn))) {}
  R operator()() { return impl_->call(); }

 private:
  struct concept_base {
    virtual ~concept_base() = default;
    virtual R call() = 0;
  };
  template <class F>
  struct model final : concept_base {
    explicit model(F f) : fn(std::move(f)) {}
    R call() override { return std::invoke(fn); }
    F fn;
  };
  std::unique_ptr<concept_base> impl_;
};

/// Runs the job on the executor, resumes on the loop thread; an awaitable the job returns is
/// awaited there too.
template <class J>
coroutine<typename awaited_or_value<J>::type> run_async(erased_job<J> job) {
  auto result = event_loop::current().run_in_executor(std::move(job));
  if constexpr (awaitable<J>) {
    J continuation = co_await std::move(result);
    co_return co_await std::move(continuation);
  } else {
    co_return co_await std::move(result);
  }
}

}  // namespace detail

/// What make_async returns for a blocking function: calling it returns a coroutine<R>.
template <class F>
class async_function {
 public:
  explicit async_function(F fn) : fn_(std::move(fn)) {}
  /// A coroutine that runs fn(args...) on the running loop's default executor and resumes on
  /// the loop thread with the result or the exception. Cancelling the awaiting task throws
  /// cancelled_error at once; the job finishes in the background and its result is dropped.
  template <class... Args>
    requires std::is_invocable_v<const F&, std::decay_t<Args>...>
  auto operator()(Args&&... args) const {
    using J = std::remove_cvref_t<std::invoke_result_t<const F&, std::decay_t<Args>...>>;
    // Arguments are copied or moved into the job now: nothing the caller owns is referenced.
    return detail::run_async<J>(detail::erased_job<J>(
        [fn = fn_, ... a = std::decay_t<Args>(std::forward<Args>(args))]() mutable -> J { return std::invoke(fn, std::move(a)...); }));
  }
  const F& function() const noexcept { return fn_; }

 private:
  F fn_;
};

/// codestare's make_async: a blocking fn becomes a function returning a coroutine that runs it
/// in the executor. A fn already returning an awaitable (a coroutine function) is returned as it is.
template <class F>
auto make_async(F fn) {
  if constexpr (detail::returns_awaitable<F>) return fn;
  else return async_function<F>(std::move(fn));
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <atomic>
#include <thread>
TEST_SUITE("make_async") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  int blocking_square(int x) {
    std::this_thread::sleep_for(1ms);
    return x * x;
  }
  coroutine<int> already_async(int x) { co_return x + 1; }

  TEST_CASE("runs on another thread and resumes on the loop thread with the result") {
    testing::run_bounded([]() -> coroutine<void> {
      const auto loop_thread = std::this_thread::get_id();
      auto square = make_async(&blocking_square);
      CHECK(co_await square(7) == 49);
      std::thread::id job_thread;
      auto where = make_async([&job_thread] { job_thread = std::this_thread::get_id(); });
      co_await where();
      CHECK(job_thread != loop_thread);
      CHECK(std::this_thread::get_id() == loop_thread);
    }());
  }

  TEST_CASE("exceptions reach the awaiter; arguments are copied, never referenced") {
    testing::run_bounded([]() -> coroutine<void> {
      auto fails = make_async([](int) -> int { throw std::range_error("in the job"); });
      CHECK_THROWS_AS(co_await fails(1), std::range_error);
      auto length = make_async([](const std::string& s) { return s.size(); });
      std::string text = "four";
      auto pending = length(text);
      text = "changed after the call";
      CHECK(co_await pending == 4);
    }());
  }

  TEST_CASE("a function that already returns an awaitable is returned as it is") {
    auto same = make_async(&already_async);
    CHECK((same == &already_async));
    auto lambda = [](int x) -> coroutine<int> { co_return x; };
    static_assert(std::is_same_v<decltype(make_async(lambda)), decltype(lambda)>);
    testing::run_bounded([&]() -> coroutine<void> { CHECK(co_await same(1) == 2); }());
  }

  TEST_CASE("a job that returns an awaitable: it is awaited on the loop thread") {
    testing::run_bounded([]() -> coroutine<void> {
      auto two_step = make_async([](int x) { return already_async(x * 10); });
      CHECK(co_await two_step(4) == 41);
    }());
  }

  TEST_CASE("cancelling the awaiter throws at once; the job finishes in the background") {
    static std::atomic<bool> release{false};
    static std::atomic<bool> finished{false};
    testing::run_bounded([]() -> coroutine<void> {
      auto slow = make_async([] {
        while (!release) std::this_thread::sleep_for(1ms);
        finished = true;
        return 5;
      });
      auto t = create_task(slow());
      co_await sleep(5ms);
      t.cancel();
      co_await wait_done(t);
      CHECK(t.cancelled());
      CHECK_FALSE(finished);
      release = true;  // run() joins the executor: the job ends, its result is dropped
    }());
    CHECK(finished);
  }
}
#endif
