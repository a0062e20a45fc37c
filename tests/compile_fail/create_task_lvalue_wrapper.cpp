// expect: this awaitable can be neither copied nor moved: pass std::ref(obj) and keep obj alive until it is done
#include "by_value.hpp"
using namespace std::chrono_literals;
coroutine<void> body() {
  counter k;
  co_await create_task(k);
}
int main() {}
