// expect: unreadable attribute (the property has no getter)
#include "prelude.hpp"
coroutine<int> body(thing& t) { co_return co_await t.write_only.get(); }
int main() {}
