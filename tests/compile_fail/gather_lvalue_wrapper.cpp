// expect: this awaitable can be neither copied nor moved: pass std::ref(obj) and keep obj alive until it is done
#include "async_utils.hpp"
using namespace codestare::async_utils;
struct counter : coroutine_wrapper<int> {
  counter() { set_coroutine(run()); }
  coroutine<int> run() { co_return 2; }
};
coroutine<void> body() {
  counter k;
  co_await gather(k);
}
int main() {}
