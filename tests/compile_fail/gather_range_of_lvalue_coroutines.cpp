// expect: a coroutine is taken by value and cannot be copied: move it in (std::move(c))
#include "async_utils.hpp"
#include <vector>
using namespace codestare::async_utils;
coroutine<int> work() { co_return 1; }
coroutine<void> body() {
  std::vector<coroutine<int>> many;
  many.push_back(work());
  co_await gather(many);
}
int main() {}
