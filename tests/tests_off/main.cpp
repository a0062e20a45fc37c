// A user program with the embedded tests off: it must build with no doctest anywhere in reach.
#include "async_utils.hpp"

#include <cstdio>

int main() {
  std::printf("async_utils %s\n", ASYNC_UTILS_VERSION);
  return 0;
}
