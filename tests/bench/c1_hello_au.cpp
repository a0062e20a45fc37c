// C1: the cost of including async_utils.hpp and running one hello task.
#include "async_utils.hpp"

#include <cstdio>

namespace au = codestare::async_utils;

au::coroutine<int> hello() {
  std::puts("hello");
  co_return 0;
}

int main() { return au::run(hello()); }
