// shield(aw): asyncio.shield. Cancelling the awaiting task does not cancel what it awaits.
#pragma once

namespace codestare::async_utils {
namespace detail {
template <class T>
struct shielded {
  future<T> inner;
  auto operator co_await() const& noexcept { return future_awaiter<T, false, true>(inner.state_ptr()); }
  auto operator co_await() && noexcept { return future_awaiter<T, true, true>(inner.state_ptr()); }
};
}  // namespace detail

/// Runs `aw` in a task (if it is not one) and returns an awaitable of its result that does
/// not propagate cancellation: the awaiting task gets cancelled_error, the inner one runs on.
template <class A>
auto shield(A&& aw) {
  auto fut = detail::ensure_future(std::forward<A>(aw));
  return detail::shielded<typename decltype(fut)::value_type>{std::move(fut)};
}

}  // namespace codestare::async_utils
