// The implementation TU of the split build: the one place where the non-template definitions
// of async_utils are compiled (ASYNC_UTILS_IMPLEMENTATION implies ASYNC_UTILS_SPLIT).
#define ASYNC_UTILS_IMPLEMENTATION
#include "async_utils.hpp"
