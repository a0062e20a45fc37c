// Async context managers: the concept, async_context(enter, exit), async_with(cm, body) for
// `async with`, and async_exit_stack (contextlib.AsyncExitStack).
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../platform/log.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/exception_group.hpp"
#include "../runtime/any_task.hpp"
#include "../runtime/awaitable.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/run.hpp"

#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

// g++ flags the frames of these coroutine templates when they hold a lambda of an anonymous
// namespace defined in a header (as the embedded tests do); the frames are internal.
ASYNC_UTILS_USER_TYPES_IN_FRAMES_BEGIN

namespace codestare::async_utils {

/// An async context manager: `aenter()` is awaitable (its result is what `async with cm as x`
/// binds), `aexit(std::exception_ptr)` is awaitable and yields true to suppress the exception
/// (null when the body ended normally). A void aexit counts as false.
template <class CM>
concept async_context_manager = requires(CM& cm, std::exception_ptr error) {
  { cm.aenter() } -> awaitable;
  { cm.aexit(error) } -> awaitable;
};

namespace detail {

/// What fn(args...) yields, awaited when it is an awaitable.
template <class F, class... Args>
using call_await_t = typename awaited_or_value<std::invoke_result_t<F, Args...>>::type;

/// A type a coroutine can return for T: lvalue references become std::reference_wrapper (the
/// runtime has no coroutine<T&>), other types decay.
template <class T>
using storable_t = std::conditional_t<std::is_lvalue_reference_v<T>, std::reference_wrapper<std::remove_reference_t<T>>, std::remove_cvref_t<T>>;

/// Calls fn(args...) and, if that returns an awaitable, awaits it. The references are used at
/// once: await the result in the same expression.
template <class R, class F, class... Args>
coroutine<R> call_and_await(F& fn, Args&... args) {
  if constexpr (awaitable<std::invoke_result_t<F&, Args&...>>) {
    if constexpr (std::is_void_v<R>) co_await std::invoke(fn, args...);
    else co_return co_await std::invoke(fn, args...);
  } else {
    if constexpr (std::is_void_v<R>) static_cast<void>(std::invoke(fn, args...));
    else co_return std::invoke(fn, args...);
  }
}

/// Runs an exit function fn(error) (or fn()): a bool, an awaitable of bool, or void (false).
template <class F>
coroutine<bool> call_exit(F& fn, std::exception_ptr error) {
  if constexpr (std::is_invocable_v<F&, std::exception_ptr&>) {
    using R = call_await_t<F&, std::exception_ptr&>;
    if constexpr (std::is_void_v<R>) {
      co_await call_and_await<void>(fn, error);
      co_return false;
    } else {
      co_return static_cast<bool>(co_await call_and_await<storable_t<R>>(fn, error));
    }
  } else {
    static_assert(std::is_invocable_v<F&>, "an exit function takes a std::exception_ptr (or nothing) and returns bool, void or an awaitable of them");
    using R = call_await_t<F&>;
    if constexpr (std::is_void_v<R>) {
      co_await call_and_await<void>(fn);
      co_return false;
    } else {
      co_return static_cast<bool>(co_await call_and_await<storable_t<R>>(fn));
    }
  }
}

/// cm.aexit(error) as a bool (a void aexit does not suppress).
template <class CM>
coroutine<bool> aexit_of(CM& cm, std::exception_ptr error) {
  using R = await_result_t<decltype(cm.aexit(error))>;
  if constexpr (std::is_void_v<R>) {
    co_await cm.aexit(error);
    co_return false;
  } else {
    co_return static_cast<bool>(co_await cm.aexit(error));
  }
}

/// Awaitable that yields a reference at once (aenter of an exit stack yields the stack).
template <class T>
struct ready_ref {
  T& value;
  bool await_ready() const noexcept { return true; }
  void await_suspend(std::coroutine_handle<>) const noexcept {}
  T& await_resume() const noexcept { return value; }
};

/// If `raised` is exactly an E, rethrows a copy of it with the handled exception nested.
template <class E>
void throw_nested_if(const std::exception_ptr& raised) {
  std::optional<E> copy;
  try {
    std::rethrow_exception(raised);
  } catch (const E& e) {
#if defined(__cpp_rtti) || defined(__GXX_RTTI)
    if (typeid(e) == typeid(E)) copy.emplace(e);  // a subclass would be sliced: leave it alone
#endif
  } catch (...) {
  }
  if (copy) std::throw_with_nested(std::move(*copy));
}

/// Python's implicit exception chaining (__context__): `raised` with `context` nested, as
/// std::throw_with_nested would have made it inside a `catch` of `context`. Exceptions of the
/// standard and library types are chained; another type is returned unchanged and the context
/// is logged, since C++ cannot add a base class to an exception that already exists.
ASYNC_UTILS_LINK std::exception_ptr chain_exceptions(std::exception_ptr raised, std::exception_ptr context);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::exception_ptr chain_exceptions(std::exception_ptr raised, std::exception_ptr context) {
  if (!raised || !context || raised == context) return raised;
  try {
    std::rethrow_exception(context);
  } catch (...) {
    try {
      throw_nested_if<exception_group>(raised);
      throw_nested_if<cancelled_error>(raised);
      throw_nested_if<timeout_error>(raised);
      throw_nested_if<invalid_state_error>(raised);
      throw_nested_if<queue_empty>(raised);
      throw_nested_if<queue_full>(raised);
      throw_nested_if<std::invalid_argument>(raised);
      throw_nested_if<std::domain_error>(raised);
      throw_nested_if<std::length_error>(raised);
      throw_nested_if<std::out_of_range>(raised);
      throw_nested_if<std::logic_error>(raised);
      throw_nested_if<std::range_error>(raised);
      throw_nested_if<std::overflow_error>(raised);
      throw_nested_if<std::underflow_error>(raised);
      throw_nested_if<std::runtime_error>(raised);
      throw_nested_if<std::bad_alloc>(raised);
      throw_nested_if<std::exception>(raised);
    } catch (...) {
      return std::current_exception();
    }
  }
  try {
    log(log_level::warning, "an exception (" + describe(context) + ") was replaced by another one (" + describe(raised) +
                                ") whose type cannot carry it nested");
  } catch (...) {
  }
  return raised;
}
#endif  // ASYNC_UTILS_DEFINITIONS

template <class F>
coroutine<bool> held_exit(std::shared_ptr<F> fn, std::exception_ptr error) {
  co_return co_await call_exit(*fn, std::move(error));
}
template <class P>
coroutine<bool> held_aexit(P cm, std::exception_ptr error) {
  co_return co_await aexit_of(*cm, std::move(error));
}
template <class F>
coroutine<bool> held_callback(std::shared_ptr<F> fn) {
  co_await call_and_await<void>(*fn);
  co_return false;
}
template <class T>
coroutine<bool> release_resource(std::shared_ptr<T> resource) {
  resource.reset();  // destroyed now, in its place in the LIFO order
  co_return false;
}

template <class T>
struct is_shared_ptr : std::false_type {};
template <class T>
struct is_shared_ptr<std::shared_ptr<T>> : std::true_type {};
template <class T>
struct is_unique_ptr : std::false_type {};
template <class T, class D>
struct is_unique_ptr<std::unique_ptr<T, D>> : std::true_type {};

/// The context manager behind `cm` as passed to enter_async_context: itself or the pointee.
template <class CM>
struct managed {
  using type = std::remove_cvref_t<CM>;
};
template <class CM>
  requires is_shared_ptr<std::remove_cvref_t<CM>>::value || is_unique_ptr<std::remove_cvref_t<CM>>::value
struct managed<CM> {
  using type = typename std::remove_cvref_t<CM>::element_type;
};
template <class CM>
using managed_t = typename managed<CM>::type;

/// What enter_async_context(cm) yields: aenter's result (references as std::reference_wrapper).
template <class CM>
using entered_t = await_result_t<decltype(std::declval<CM&>().aenter())>;

}  // namespace detail

/// contextlib.AsyncExitStack: exit callbacks and entered async context managers, unwound LIFO
/// by aclose() or at the end of `async_with(stack, ...)`.
///
/// Unwinding: every callback runs, in reverse order of registration, even when one throws; a
/// callback sees the exception pending at that point (the body's, or one raised by a later
/// registered callback) and may suppress it by returning true. If a callback raised, the last
/// raised exception leaves aexit() with the earlier pending one nested (std::nested_exception,
/// Python's __context__); aexit() returns true when it received an exception and a callback
/// suppressed one. Movable (move construction only), not copyable. Destroying a stack with
/// callbacks pending does not run them (as in Python) and logs a warning.
class async_exit_stack {
 public:
  /// The erased form of every registered callback: called once with the pending exception.
  using exit_callback = std::function<coroutine<bool>(std::exception_ptr)>;

  async_exit_stack() = default;
  async_exit_stack(async_exit_stack&& other) noexcept : exits_(std::exchange(other.exits_, {})) {}
  async_exit_stack(const async_exit_stack&) = delete;  // the callbacks must run once
  async_exit_stack& operator=(const async_exit_stack&) = delete;
  async_exit_stack& operator=(async_exit_stack&&) = delete;  // would drop pending callbacks
  ~async_exit_stack();

  /// Enters `cm` and registers its aexit; yields aenter's result (a reference comes as
  /// std::reference_wrapper). An lvalue is used by reference (it must outlive the stack's
  /// unwinding); an rvalue, std::unique_ptr or std::shared_ptr is owned by the stack until its
  /// aexit has run. If aenter throws, nothing is registered.
  template <class CM>
  auto enter_async_context(CM&& cm) {
    using M = detail::managed_t<CM>;
    static_assert(async_context_manager<M>, "enter_async_context needs an async context manager: aenter() and aexit(std::exception_ptr)");
    using raw = std::remove_cvref_t<CM>;
    if constexpr (detail::is_shared_ptr<raw>::value) {
      if (!cm) throw std::invalid_argument("enter_async_context: null pointer");
      return enter_held<M>(std::shared_ptr<M>(cm));
    } else if constexpr (detail::is_unique_ptr<raw>::value) {
      static_assert(std::is_rvalue_reference_v<CM&&>, "enter_async_context: move the std::unique_ptr in (the stack takes ownership)");
      if (!cm) throw std::invalid_argument("enter_async_context: null pointer");
      return enter_held<M>(std::shared_ptr<M>(std::move(cm)));
    } else if constexpr (std::is_lvalue_reference_v<CM>) {
      return enter_held<M>(&cm);
    } else {
      return enter_held<M>(std::make_shared<M>(std::move(cm)));
    }
  }

  /// Takes ownership of an object (an RAII guard, such as a lock's scoped guard) and destroys
  /// it in its place in the LIFO unwinding. Returns the owned object.
  template <class T>
  std::remove_cvref_t<T>& enter_context(T&& resource) {
    auto held = std::make_shared<std::remove_cvref_t<T>>(std::forward<T>(resource));
    auto& ref = *held;
    exits_.push_back([held](std::exception_ptr) mutable { return detail::release_resource(std::move(held)); });
    return ref;
  }

  /// Registers an exit function `fn(std::exception_ptr)` returning an awaitable of bool (or
  /// bool, or void = false), or the aexit of an async context manager that is not entered
  /// (an lvalue by reference, an rvalue owned).
  template <class F>
  void push_async_exit(F&& exit) {
    using raw = std::remove_cvref_t<F>;
    if constexpr (async_context_manager<raw>) {
      if constexpr (std::is_lvalue_reference_v<F>) {
        raw* cm = &exit;
        exits_.push_back([cm](std::exception_ptr error) { return detail::held_aexit(cm, std::move(error)); });
      } else {
        auto cm = std::make_shared<raw>(std::move(exit));
        exits_.push_back([cm](std::exception_ptr error) { return detail::held_aexit(cm, std::move(error)); });
      }
    } else {
      push_exit_function(std::forward<F>(exit));
    }
  }

  /// ExitStack.push: a synchronous exit function `fn(std::exception_ptr) -> bool` (or void).
  template <class F>
  void push(F&& exit) {
    using raw = std::remove_cvref_t<F>;
    if constexpr (std::is_invocable_v<raw&, std::exception_ptr&>)
      static_assert(!awaitable<std::invoke_result_t<raw&, std::exception_ptr&>>, "push() takes a synchronous exit function: use push_async_exit() for one returning an awaitable");
    push_exit_function(std::forward<F>(exit));
  }

  /// Registers `fn(args...)` (an async callback: its awaitable result is awaited); the arguments
  /// are stored by value. It never suppresses an exception.
  template <class F, class... Args>
  void push_async_callback(F&& fn, Args&&... args) {
    using B = decltype(std::bind_front(std::forward<F>(fn), std::forward<Args>(args)...));
    auto bound = std::make_shared<B>(std::bind_front(std::forward<F>(fn), std::forward<Args>(args)...));
    exits_.push_back([bound](std::exception_ptr) { return detail::held_callback(bound); });
  }

  /// ExitStack.callback: registers a synchronous `fn(args...)`, arguments stored by value.
  template <class F, class... Args>
  void callback(F&& fn, Args&&... args) {
    static_assert(!awaitable<std::invoke_result_t<std::decay_t<F>&, std::decay_t<Args>&...>>,
                  "callback() is for synchronous functions: use push_async_callback() for one returning an awaitable");
    push_async_callback(std::forward<F>(fn), std::forward<Args>(args)...);
  }

  /// Moves every registered callback to a new stack, leaving this one empty.
  async_exit_stack pop_all() noexcept;

  /// Unwinds the stack (aexit without an exception).
  coroutine<void> aclose();

  /// `async with stack as s` binds the stack itself.
  detail::ready_ref<async_exit_stack> aenter() noexcept { return {*this}; }

  /// Runs every callback, LIFO, as described on the class.
  coroutine<bool> aexit(std::exception_ptr error);

  /// Number of callbacks waiting to run.
  std::size_t size() const noexcept { return exits_.size(); }
  bool empty() const noexcept { return exits_.empty(); }

 private:
  template <class M, class P>
  coroutine<detail::storable_t<detail::entered_t<M>>> enter_held(P cm) {
    using E = detail::entered_t<M>;
    exits_.reserve(exits_.size() + 1);  // registering cannot fail once entered
    if constexpr (std::is_void_v<E>) {
      co_await cm->aenter();
      exits_.push_back([cm](std::exception_ptr error) { return detail::held_aexit(cm, std::move(error)); });
    } else {
      auto&& entered = co_await cm->aenter();
      exits_.push_back([cm](std::exception_ptr error) { return detail::held_aexit(cm, std::move(error)); });
      if constexpr (std::is_lvalue_reference_v<E>) co_return std::ref(entered);
      else co_return std::move(entered);
    }
  }

  template <class F>
  void push_exit_function(F&& exit) {
    using raw = std::remove_cvref_t<F>;
    static_assert(std::is_invocable_v<raw&, std::exception_ptr&> || std::is_invocable_v<raw&>,
                  "an exit function takes a std::exception_ptr and returns bool, void or an awaitable of them");
    auto fn = std::make_shared<raw>(std::forward<F>(exit));
    exits_.push_back([fn](std::exception_ptr error) { return detail::held_exit(fn, std::move(error)); });
  }

  std::vector<exit_callback> exits_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK async_exit_stack::~async_exit_stack() {
  if (!exits_.empty()) {
    try {
      log(log_level::warning, "async_exit_stack destroyed with " + std::to_string(exits_.size()) +
                                  " exit callback(s) that never ran: call aclose() or use async_with()");
    } catch (...) {
    }
  }
}

ASYNC_UTILS_LINK async_exit_stack async_exit_stack::pop_all() noexcept {
  async_exit_stack moved;
  moved.exits_ = std::exchange(exits_, {});
  return moved;
}
#endif  // ASYNC_UTILS_DEFINITIONS

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK coroutine<void> async_exit_stack::aclose() { co_await aexit(nullptr); }

ASYNC_UTILS_LINK coroutine<bool> async_exit_stack::aexit(std::exception_ptr error) {
  const bool received = error != nullptr;
  bool suppressed = false;
  bool pending_raise = false;
  std::exception_ptr pending = std::move(error);
  while (!exits_.empty()) {  // callbacks registered while unwinding run too
    exit_callback cb = std::move(exits_.back());
    exits_.pop_back();
    std::exception_ptr raised;
    try {
      if (co_await cb(pending)) {
        suppressed = true;
        pending_raise = false;
        pending = nullptr;
      }
    } catch (...) {
      raised = std::current_exception();
    }
    if (raised) {
      pending = detail::chain_exceptions(raised, pending);
      pending_raise = true;
    }
  }
  if (pending_raise) std::rethrow_exception(pending);
  co_return received && suppressed;
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// An async context manager made of two callables: `enter()` (its result, awaited when it is an
/// awaitable, is what async_with binds) and `exit(std::exception_ptr)` (or `exit()`) returning
/// bool, void or an awaitable of them. The object must outlive the awaits of aenter/aexit.
template <class Enter, class Exit>
class callable_async_context {
 public:
  callable_async_context(Enter enter, Exit exit) : enter_(std::move(enter)), exit_(std::move(exit)) {}
  auto aenter() { return detail::call_and_await<detail::storable_t<detail::call_await_t<Enter&>>>(enter_); }
  coroutine<bool> aexit(std::exception_ptr error) { return detail::call_exit(exit_, std::move(error)); }

 private:
  Enter enter_;
  Exit exit_;
};

/// Builds an async context manager from `enter()` and `exit(std::exception_ptr)`
/// (contextlib.asynccontextmanager, without generators).
template <class Enter, class Exit>
callable_async_context<std::decay_t<Enter>, std::decay_t<Exit>> async_context(Enter&& enter, Exit&& exit) {
  return {std::forward<Enter>(enter), std::forward<Exit>(exit)};
}

namespace detail {

/// What body(entered) (or body()) yields, awaited, as async_with stores it; void stays void.
template <class Body, class E>
struct with_body {
  using type = storable_t<call_await_t<Body&, E&>>;
};
template <class Body, class E>
  requires(!std::is_invocable_v<Body&, E&>)
struct with_body<Body, E> {
  using type = storable_t<call_await_t<Body&>>;
};
template <class Body>
struct with_body<Body, void> {
  using type = storable_t<call_await_t<Body&>>;
};
template <class Body, class E>
using with_body_t = typename with_body<Body, E>::type;

template <class V>
using with_result_t = std::conditional_t<std::is_void_v<V>, void, std::optional<V>>;

/// Runs the body, catching whatever it throws into `error`.
template <class V, class Body, class... E>
coroutine<void> run_with_body(Body& body, std::exception_ptr& error, std::optional<std::conditional_t<std::is_void_v<V>, int, V>>& value, E&... entered) {
  try {
    if constexpr (std::is_invocable_v<Body&, E&...>) {
      if constexpr (std::is_void_v<V>) co_await call_and_await<void>(body, entered...);
      else value.emplace(co_await call_and_await<V>(body, entered...));
    } else {
      if constexpr (std::is_void_v<V>) co_await call_and_await<void>(body);
      else value.emplace(co_await call_and_await<V>(body));
    }
  } catch (...) {
    error = std::current_exception();
  }
}

template <class CM, class Body>
coroutine<with_result_t<with_body_t<Body, entered_t<std::remove_reference_t<CM>>>>> async_with_impl(CM cm, Body body) {
  using E = entered_t<std::remove_reference_t<CM>>;
  using V = with_body_t<Body, E>;
  std::exception_ptr error;
  std::optional<std::conditional_t<std::is_void_v<V>, int, V>> value;
  if constexpr (std::is_void_v<E>) {
    co_await cm.aenter();
    co_await run_with_body<V>(body, error, value);
  } else {
    auto&& entered = co_await cm.aenter();
    co_await run_with_body<V>(body, error, value, entered);
  }
  bool suppress = false;
  std::exception_ptr exit_error;
  try {
    suppress = co_await aexit_of(cm, error);
  } catch (...) {
    exit_error = std::current_exception();
  }
  if (exit_error) std::rethrow_exception(chain_exceptions(exit_error, error));
  if (error && !suppress) std::rethrow_exception(error);
  if constexpr (!std::is_void_v<V>) co_return error ? std::nullopt : std::move(value);
}

}  // namespace detail

/// `async with cm as x: body`: awaits cm.aenter(), then body(x) (or body() — its result is
/// awaited when it is an awaitable), then cm.aexit(the body's exception or null). An exception
/// is rethrown unless aexit returned true; an exception from aexit itself propagates with the
/// body's nested. Yields void for a void body, else std::optional of the body's result, empty
/// when an exception was suppressed. An lvalue `cm` is used by reference, an rvalue is moved
/// into the returned coroutine.
template <class CM, class Body>
auto async_with(CM&& cm, Body body) {
  static_assert(async_context_manager<std::remove_cvref_t<CM>>, "async_with needs an async context manager: aenter() and aexit(std::exception_ptr)");
  return detail::async_with_impl<CM, Body>(std::forward<CM>(cm), std::move(body));
}

}  // namespace codestare::async_utils

ASYNC_UTILS_USER_TYPES_IN_FRAMES_END

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("async_exit_stack") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  /// Records its enter and exit in a shared journal; suppresses when told to.
  struct recorder {
    std::vector<std::string>* journal;
    std::string name;
    bool suppress = false;
    recorder(std::vector<std::string>* j, std::string n) : journal(j), name(std::move(n)) {}
    coroutine<std::string> aenter() {
      co_await sleep(0s);
      journal->push_back("enter " + name);
      co_return name;
    }
    coroutine<bool> aexit(std::exception_ptr error) {
      co_await sleep(0s);
      journal->push_back("exit " + name + (error ? " with " + describe(error) : ""));
      co_return suppress;
    }
  };

  /// The what() of an exception and of every exception nested in it, outermost first.
  std::vector<std::string> chain_of(std::exception_ptr error) {
    std::vector<std::string> out;
    while (error) {
      try {
        std::rethrow_exception(error);
      } catch (const std::exception& e) {
        out.push_back(e.what());
        auto* nested = dynamic_cast<const std::nested_exception*>(&e);
        error = nested ? nested->nested_ptr() : nullptr;
      } catch (...) {
        out.push_back("?");
        error = nullptr;
      }
    }
    return out;
  }

  TEST_CASE("async_with enters, runs the body, exits, and returns the body's result") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      recorder cm(&journal, "a");
      auto result = co_await async_with(cm, [&](std::string& as) -> coroutine<int> {
        journal.push_back("body " + as);
        co_return 7;
      });
      REQUIRE(result.has_value());
      CHECK(*result == 7);
      CHECK(journal == std::vector<std::string>{"enter a", "body a", "exit a"});
      // A plain (not awaitable) body, and a void one, and one that ignores the entered value.
      auto plain = co_await async_with(recorder(&journal, "b"), [](const std::string& as) { return as + "!"; });
      CHECK(plain == std::optional<std::string>("b!"));
      co_await async_with(cm, [&] { journal.push_back("void body"); });
      CHECK(journal.back() == "exit a");
    }());
  }

  TEST_CASE("async_with: exceptions are passed to aexit, rethrown or suppressed") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      recorder cm(&journal, "a");
      try {
        co_await async_with(cm, [](std::string&) -> coroutine<int> {
          throw std::out_of_range("body failed");
          co_return 1;
        });
        FAIL("no exception");
      } catch (const std::out_of_range& e) {
        CHECK(std::string(e.what()) == "body failed");
      }
      CHECK(journal.back() == "exit a with body failed");
      cm.suppress = true;
      auto result = co_await async_with(cm, [](std::string&) -> int { throw std::runtime_error("hidden"); });
      CHECK_FALSE(result.has_value());
      CHECK(journal.back() == "exit a with hidden");
      // Without an exception the return value of aexit does not matter.
      auto fine = co_await async_with(cm, [](std::string&) { return 3; });
      CHECK(fine == std::optional<int>(3));
    }());
  }

  TEST_CASE("async_with: an exception from aexit propagates with the body's nested") {
    testing::run_bounded([]() -> coroutine<void> {
      auto cm = async_context([] { return 1; }, [](std::exception_ptr) -> bool { throw std::logic_error("exit failed"); });
      try {
        co_await async_with(cm, [](int) { throw std::invalid_argument("body failed"); });
        FAIL("no exception");
      } catch (const std::logic_error& e) {
        CHECK(chain_of(std::current_exception()) == std::vector<std::string>{"exit failed", "body failed"});
      }
      try {
        co_await async_with(cm, [](int) {});
        FAIL("no exception");
      } catch (const std::logic_error& e) {
        CHECK(chain_of(std::current_exception()) == std::vector<std::string>{"exit failed"});
      }
    }());
  }

  TEST_CASE("async_context builds a context manager from two callables") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      auto cm = async_context(
          [&]() -> coroutine<int> {
            journal.push_back("enter");
            co_return 5;
          },
          [&](std::exception_ptr error) -> coroutine<bool> {
            journal.push_back(error ? "exit " + describe(error) : "exit");
            co_return true;
          });
      static_assert(async_context_manager<decltype(cm)>);
      auto r = co_await async_with(cm, [](int v) { return v * 2; });
      CHECK(r == std::optional<int>(10));
      auto s = co_await async_with(cm, [](int) -> int { throw std::runtime_error("x"); });
      CHECK_FALSE(s);
      CHECK(journal == std::vector<std::string>{"enter", "exit", "enter", "exit x"});
      // Plain enter and exit functions; a void exit never suppresses; enter may return void.
      auto plain = async_context([] {}, [&] { journal.push_back("plain exit"); });
      try {
        co_await async_with(plain, [] { throw std::runtime_error("kept"); });
        FAIL("no exception");
      } catch (const std::runtime_error& e) {
        CHECK(std::string(e.what()) == "kept");
      }
      CHECK(journal.back() == "plain exit");
    }());
  }

  TEST_CASE("exit stack: LIFO order of every kind of callback") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      recorder a(&journal, "a");
      {
        async_exit_stack stack;
        std::string as = co_await stack.enter_async_context(a);
        CHECK(as == "a");
        stack.callback([&](int n) { journal.push_back("callback " + std::to_string(n)); }, 1);
        stack.push_async_callback([&](std::string s) -> coroutine<void> {
          co_await sleep(0s);
          journal.push_back("async callback " + s);
        }, std::string("x"));
        stack.push([&](std::exception_ptr e) {
          journal.push_back(e ? "push with error" : "push");
          return false;
        });
        stack.push_async_exit([&](std::exception_ptr) -> coroutine<bool> {
          journal.push_back("async exit");
          co_return false;
        });
        auto owned = co_await stack.enter_async_context(recorder(&journal, "owned"));
        CHECK(owned == "owned");
        stack.push_async_exit(recorder(&journal, "not entered"));
        struct guard {
          std::vector<std::string>* journal;
          bool moved = false;
          guard(std::vector<std::string>* j) : journal(j) {}
          guard(guard&& o) noexcept : journal(o.journal) { o.moved = true; }
          ~guard() {
            if (!moved) journal->push_back("guard destroyed");
          }
        };
        stack.enter_context(guard(&journal));
        CHECK(stack.size() == 8);
        journal.push_back("body");
        co_await stack.aclose();
        CHECK(stack.empty());
      }
      CHECK(journal == std::vector<std::string>{"enter a", "enter owned", "body", "guard destroyed", "exit not entered", "exit owned",
                                                "async exit", "push", "async callback x", "callback 1", "exit a"});
    }());
  }

  TEST_CASE("exit stack: owned context managers by unique_ptr and shared_ptr, entered stacks") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      auto shared = std::make_shared<recorder>(recorder(&journal, "shared"));
      co_await async_with(async_exit_stack(), [&](async_exit_stack& stack) -> coroutine<void> {
        co_await stack.enter_async_context(std::make_unique<recorder>(recorder(&journal, "unique")));
        co_await stack.enter_async_context(shared);
        async_exit_stack& inner = co_await stack.enter_async_context(async_exit_stack());
        inner.callback([&] { journal.push_back("inner callback"); });
        CHECK(shared.use_count() == 2);
      });
      CHECK(shared.use_count() == 1);
      CHECK(journal == std::vector<std::string>{"enter unique", "enter shared", "inner callback", "exit shared", "exit unique"});
      async_exit_stack stack;
      try {
        co_await stack.enter_async_context(std::shared_ptr<recorder>());
        FAIL("no exception");
      } catch (const std::invalid_argument&) {
      }
      CHECK(stack.empty());
    }());
  }

  TEST_CASE("exit stack: a failing aenter registers nothing") {
    testing::run_bounded([]() -> coroutine<void> {
      async_exit_stack stack;
      bool exited = false;
      auto bad = async_context([]() -> int { throw std::runtime_error("cannot enter"); }, [&] { exited = true; });
      try {
        co_await stack.enter_async_context(bad);
        FAIL("no exception");
      } catch (const std::runtime_error&) {
      }
      CHECK(stack.empty());
      co_await stack.aclose();
      CHECK_FALSE(exited);
    }());
  }

  TEST_CASE("exit stack: suppression follows contextlib") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      // The inner (later) exit suppresses: the outer one then sees no exception.
      co_await async_with(async_exit_stack(), [&](async_exit_stack& stack) -> coroutine<void> {
        stack.push([&](std::exception_ptr e) {
          journal.push_back(e ? "outer saw " + describe(e) : "outer saw nothing");
          return false;
        });
        stack.push([&](std::exception_ptr e) {
          journal.push_back(e ? "inner saw " + describe(e) : "inner saw nothing");
          return true;
        });
        throw std::runtime_error("boom");
        co_return;
      });
      CHECK(journal == std::vector<std::string>{"inner saw boom", "outer saw nothing"});
      // aexit reports suppression only when it received an exception.
      async_exit_stack stack;
      stack.push([](std::exception_ptr) { return true; });
      CHECK_FALSE(co_await stack.aexit(nullptr));
      stack.push([](std::exception_ptr) { return true; });
      CHECK(co_await stack.aexit(std::make_exception_ptr(std::runtime_error("x"))));
      stack.push([](std::exception_ptr) { return false; });
      CHECK_FALSE(co_await stack.aexit(std::make_exception_ptr(std::runtime_error("x"))));
    }());
  }

  TEST_CASE("exit stack: errors in callbacks run the rest and propagate nested") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> seen;
      async_exit_stack stack;
      stack.callback([&] { seen.push_back("first registered, last run"); });
      stack.push_async_exit([&](std::exception_ptr e) -> coroutine<bool> {
        seen.push_back("saw " + describe(e));
        throw std::invalid_argument("second");
        co_return false;
      });
      stack.callback([&] {
        seen.push_back("third");
        throw std::out_of_range("third");
      });
      try {
        co_await stack.aexit(std::make_exception_ptr(std::runtime_error("body")));
        FAIL("no exception");
      } catch (const std::invalid_argument&) {
        CHECK(chain_of(std::current_exception()) == std::vector<std::string>{"second", "third", "body"});
      }
      CHECK(seen == std::vector<std::string>{"third", "saw third", "first registered, last run"});
      // A later callback may suppress an exception raised by an earlier-run one.
      stack.push([](std::exception_ptr e) { return e != nullptr; });
      stack.callback([] { throw std::runtime_error("swallowed"); });
      CHECK_FALSE(co_await stack.aexit(nullptr));
      // A callback rethrowing the pending exception does not nest it in itself.
      stack.push([](std::exception_ptr e) {
        if (e) std::rethrow_exception(e);
        return false;
      });
      try {
        co_await stack.aexit(std::make_exception_ptr(std::domain_error("same")));
        FAIL("no exception");
      } catch (const std::domain_error&) {
        CHECK(chain_of(std::current_exception()) == std::vector<std::string>{"same"});
      }
    }());
  }

  TEST_CASE("exit stack: an exception of a user type is kept as it is, the context logged") {
    struct custom_error : std::runtime_error {
      using std::runtime_error::runtime_error;
    };
    testing::log_capture log;
    testing::run_bounded([]() -> coroutine<void> {
      async_exit_stack stack;
      stack.callback([] { throw custom_error("custom"); });
      try {
        co_await stack.aexit(std::make_exception_ptr(std::runtime_error("body")));
        FAIL("no exception");
      } catch (const custom_error&) {
        CHECK(chain_of(std::current_exception()) == std::vector<std::string>{"custom"});
      }
    }());
    CHECK(log.text().find("(body) was replaced by another one (custom)") != std::string::npos);
  }

  TEST_CASE("exit stack: pop_all moves the callbacks; callbacks added while unwinding run") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      std::optional<async_exit_stack> kept;
      {
        async_exit_stack stack;
        stack.callback([&] { journal.push_back("moved callback"); });
        kept.emplace(stack.pop_all());
        CHECK(stack.empty());
        co_await stack.aclose();
        CHECK(journal.empty());
      }
      CHECK(kept->size() == 1);
      kept->callback([&] {
        journal.push_back("outer");
        kept->callback([&] { journal.push_back("added while unwinding"); });
      });
      co_await kept->aclose();
      CHECK(journal == std::vector<std::string>{"outer", "added while unwinding", "moved callback"});
    }());
  }

  TEST_CASE("exit stack: cancellation reaches the callbacks as cancelled_error") {
    testing::run_bounded([]() -> coroutine<void> {
      std::string seen;
      auto body = [&]() -> coroutine<void> {
        co_await async_with(async_exit_stack(), [&](async_exit_stack& stack) -> coroutine<void> {
          stack.push([&](std::exception_ptr e) {
            seen = describe(e);
            return false;
          });
          co_await sleep(1h);
        });
      };
      auto t = create_task(body());
      co_await sleep(0s);
      t.cancel("stop");
      co_await wait_done(t);
      CHECK(t.cancelled());
      CHECK(seen == "cancelled_error: stop");
    }());
  }

  TEST_CASE("exit stack: destroyed with callbacks pending logs, never runs them") {
    testing::log_capture log;
    bool ran = false;
    {
      async_exit_stack stack;
      stack.callback([&] { ran = true; });
    }
    CHECK_FALSE(ran);
    CHECK(log.text().find("never ran") != std::string::npos);
    static_assert(!std::is_copy_constructible_v<async_exit_stack>);
    static_assert(std::is_move_constructible_v<async_exit_stack>);
  }
}
#endif
