// expect: a coroutine is taken by value and cannot be copied: move it in (std::move(c))
#include "async_utils.hpp"
#include <chrono>
using namespace codestare::async_utils;
coroutine<int> work() { co_return 1; }
coroutine<void> body() {
  auto c = work();
  co_await wait_for(c, std::chrono::seconds(1));
}
int main() {}
