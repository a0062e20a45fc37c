// expect: a coroutine is taken by value and cannot be copied: move it in (std::move(c))
#include "by_value.hpp"
using namespace std::chrono_literals;
coroutine<void> body() {
  std::vector<coroutine<int>> many;
  many.push_back(work());
  co_await gather(many);
}
int main() {}
