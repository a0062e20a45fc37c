// First of two translation units that include the header with tests on; this one owns main().
#define ASYNC_UTILS_TESTS_MAIN
#include "async_utils.hpp"
#include "async_utils.hpp"  // a second include must be a no-op

int multi_tu_b();

// Keeps b.cpp's object in the link even if it held no tests.
[[maybe_unused]] static const int linked_b = multi_tu_b();
