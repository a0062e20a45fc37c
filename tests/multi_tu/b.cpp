// Second translation unit with tests on: its copies of the TEST_CASEs must not run twice.
#define ASYNC_UTILS_TESTS
#include "async_utils.hpp"

int multi_tu_b() { return 0; }
