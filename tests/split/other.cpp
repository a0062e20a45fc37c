// Second user TU of the split build (compiled with -DASYNC_UTILS_SPLIT): gather, a task_group,
// an async_exit_stack and an event, called from main.cpp.
#include "async_utils.hpp"

#include <vector>

namespace au = codestare::async_utils;

namespace {
au::coroutine<int> value_after(int v, au::event& go) {
  co_await go.wait();
  co_return v;
}
}  // namespace

// 1 + 2 + ... + n, collected through a task_group and an exit stack.
au::coroutine<int> other_tu_total(int n) {
  au::event go;
  std::vector<au::task<int>> parts;
  int total = 0;
  au::async_exit_stack stack;
  stack.push_async_callback([&]() -> au::coroutine<void> {
    total += 0;  // runs at aclose()
    co_return;
  });
  co_await au::async_with(au::task_group{}, [&](au::task_group& tg) -> au::coroutine<void> {
    for (int i = 1; i <= n; ++i) parts.push_back(tg.create_task(value_after(i, go)));
    go.set();
    co_return;
  });
  for (auto& p : parts) total += co_await p;
  co_await stack.aclose();
  co_return total;
}
