// expect: COMPILES
// The accepted forms of the by-value rule: rvalue coroutines, copied handles, std::ref(obj).
#include "by_value.hpp"
using namespace std::chrono_literals;
coroutine<void> body() {
  auto c = work();
  auto t = create_task(std::move(c));
  auto copied = create_task(t);
  counter k;
  auto by_ref = create_task(std::ref(k));
  std::vector<task<int>> tasks{t, copied};
  co_await gather(tasks);
  co_await gather(t, work(), std::ref(k));
  co_await wait_for(t, 1s);
  co_await shield(t);
  co_await by_ref;
}
int main() {}
