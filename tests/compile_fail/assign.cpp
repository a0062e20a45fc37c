// expect: direct assignment is not supported; use co_await prop.set(value)
#include "prelude.hpp"
int main() {
  thing t;
  t.full = 3;
}
