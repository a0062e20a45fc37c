// expect: can't set attribute (the property has no setter)
#include "prelude.hpp"
coroutine<void> body(thing& t) { co_await t.read_only.set(1); }
int main() {}
