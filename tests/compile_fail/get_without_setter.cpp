// expect: get() without a setter would wait forever
#include "prelude.hpp"
coroutine<int> body(thing& t) { co_return co_await t.read_only.get(); }
int main() {}
