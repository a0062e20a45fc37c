// expect: a coroutine is taken by value and cannot be copied: move it in (std::move(c))
#include "by_value.hpp"
using namespace std::chrono_literals;
coroutine<void> body() {
  auto c = work();
  co_await wait_for(c, std::chrono::seconds(1));
}
int main() {}
