// expect: wait() takes task<T>, future<T> or any_task handles (asyncio 3.11 forbids coroutines): create_task() first
#include "by_value.hpp"
coroutine<void> body() {
  std::vector<coroutine<int>> v;
  v.push_back(work());
  co_await wait(std::move(v));
}
int main() {}
