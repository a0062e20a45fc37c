// expect: a coroutine is taken by value and cannot be copied: move it in (std::move(c))
#include "async_utils.hpp"
using namespace codestare::async_utils;
coroutine<int> work() { co_return 1; }
coroutine<void> body() {
  auto c = work();
  co_await create_task(c);
}
int main() {}
