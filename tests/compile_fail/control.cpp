// expect: COMPILES
#include "prelude.hpp"
coroutine<int> body(thing& t) {
  co_await t.full.set(1);
  co_await t.write_only.set(2);
  co_return co_await t.full.get();
}
int main() {}
