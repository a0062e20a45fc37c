// gather(..., return_exceptions=True): results in argument order, exceptions (a cancelled child
// included) as values; nothing propagates.
#include "parity.hpp"

coroutine<int> ok(int v, int steps) {
  for (int i = 0; i < steps; ++i) co_await sleep(0s);
  say("ok(" + std::to_string(v) + ") returns");
  co_return v;
}

coroutine<int> fail(std::string msg) {
  co_await sleep(0s);
  say("fail(" + msg + ") raises");
  throw std::invalid_argument(msg);
}

template <class V>
std::string show(const std::variant<V, std::exception_ptr>& r) {  // an outcome<T>
  if (r.index() == 1) return exc_name(std::get<1>(r));
  if constexpr (std::is_same_v<V, std::monostate>) return "None";
  else return std::to_string(std::get<0>(r));
}

int main() {
  run([]() -> coroutine<void> {
    auto victim = create_task(sleep(10s));
    event_loop::current().call_soon([victim]() mutable { victim.cancel(); });
    auto [a, b, c, d] = co_await gather(return_exceptions, ok(1, 3), fail("bad"), victim, ok(2, 0));
    say("gather returned");
    say(show(a));
    say(show(b));
    say(show(c));
    say(show(d));
  }());
  return 0;
}
