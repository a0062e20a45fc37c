// What counts as an awaitable, and what co_await on it yields (used by create_task and friends).
#pragma once

#include <concepts>
#include <coroutine>
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
}  // namespace detail

}  // namespace codestare::async_utils
