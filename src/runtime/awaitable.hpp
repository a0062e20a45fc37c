// What counts as an awaitable, and what co_await on it yields (used by create_task and friends).
#pragma once

#include "event_loop.hpp"  // declares coroutine

#include <concepts>
#include <coroutine>
#include <functional>
#include <type_traits>
#include <utility>

namespace codestare::async_utils::detail {

template <class A>
concept has_member_co_await = requires(A&& a) { std::forward<A>(a).operator co_await(); };
template <class A>
concept has_free_co_await = requires(A&& a) { operator co_await(std::forward<A>(a)); };
template <class A>
concept is_awaiter = requires(A& a, std::coroutine_handle<> h) {
  { a.await_ready() } -> std::convertible_to<bool>;
  a.await_suspend(h);
  a.await_resume();
};

/// The awaiter co_await would use for `a` (member or free operator co_await, or `a` itself).
template <class A>
decltype(auto) get_awaiter(A&& a) {
  if constexpr (has_member_co_await<A>) return std::forward<A>(a).operator co_await();
  else if constexpr (has_free_co_await<A>) return operator co_await(std::forward<A>(a));
  else return std::forward<A>(a);
}

}  // namespace codestare::async_utils::detail

namespace codestare::async_utils {

/// Anything `co_await` accepts in our coroutines.
template <class A>
concept awaitable = requires(A&& a) {
  { detail::get_awaiter(std::forward<A>(a)) };
} && detail::is_awaiter<std::remove_reference_t<decltype(detail::get_awaiter(std::declval<A>()))>>;

/// The type `co_await std::declval<A>()` yields.
template <class A>
using await_result_t = decltype(std::declval<std::remove_reference_t<decltype(detail::get_awaiter(std::declval<A>()))>&>().await_resume());

namespace detail {
/// T itself, or what awaiting it yields when T is an awaitable (for callables whose result is
/// awaited when it can be).
template <class T>
struct awaited_or_value {
  using type = T;
};
template <class T>
  requires awaitable<T>
struct awaited_or_value<T> {
  using type = await_result_t<T>;
};

template <class T>
struct is_reference_wrapper : std::false_type {};
template <class T>
struct is_reference_wrapper<std::reference_wrapper<T>> : std::true_type {};
template <class A>
struct is_coroutine : std::false_type {};
template <class T>
struct is_coroutine<coroutine<T>> : std::true_type {};

// The by-value rule of create_task, wait_for, gather and shield (SPEC "By value"): they keep a
// copy of a handle, the moved object of an rvalue, or the std::reference_wrapper the caller
// gave; nothing they keep refers to a caller's local by accident.

/// What such a call keeps of an argument of type A (A as deduced for a forwarding reference).
template <class A>
using held_t = std::decay_t<A>;
/// How a kept argument is awaited: a std::reference_wrapper as the object it refers to,
/// anything else as an rvalue.
template <class H>
struct held_traits {
  using awaited = H&&;
  static H&& unwrap(H& h) noexcept { return std::move(h); }
};
template <class T>
struct held_traits<std::reference_wrapper<T>> {
  using awaited = T&;
  static T& unwrap(std::reference_wrapper<T> h) noexcept { return h.get(); }
};
template <class A>
using awaited_t = typename held_traits<held_t<A>>::awaited;
template <class H>
decltype(auto) unwrap_held(H& h) noexcept {
  return held_traits<H>::unwrap(h);
}

/// Rejects, with a message saying what to do, an argument that cannot be kept by value. Used
/// as `if constexpr (check_by_value<A>())` so that nothing else is instantiated after the message.
template <class A>
constexpr bool check_by_value() {
  using D = std::remove_cvref_t<A>;
  constexpr bool lvalue = std::is_lvalue_reference_v<A>;
  if constexpr (is_reference_wrapper<D>::value) {
    return true;
  } else if constexpr (lvalue && is_coroutine<D>::value) {
    static_assert(!is_coroutine<D>::value, "a coroutine is taken by value and cannot be copied: move it in (std::move(c))");
    return false;
  } else if constexpr (!std::is_move_constructible_v<D>) {
    static_assert(std::is_move_constructible_v<D>,
                  "this awaitable can be neither copied nor moved: pass std::ref(obj) and keep obj alive until it is done");
    return false;
  } else if constexpr (lvalue && !std::is_copy_constructible_v<D>) {
    static_assert(std::is_copy_constructible_v<D>,
                  "this awaitable is taken by value and cannot be copied: move it in (std::move(x)) or pass std::ref(x)");
    return false;
  } else {
    return true;
  }
}

}  // namespace detail

/// What create_task, wait_for, gather and shield accept: an awaitable, or std::ref(awaitable)
/// for one that has to stay where it is (a coroutine_wrapper, an awaitable_predicate).
template <class A>
concept awaitable_argument = awaitable<detail::awaited_t<A>>;
/// What awaiting such an argument yields.
template <class A>
using argument_result_t = await_result_t<detail::awaited_t<A>>;

}  // namespace codestare::async_utils
