// Shared by the by-value cases: a coroutine function and a non-movable coroutine_wrapper.
#pragma once
#include "async_utils.hpp"
#include <chrono>
#include <functional>
#include <vector>
using namespace codestare::async_utils;
inline coroutine<int> work() { co_return 1; }
struct counter : coroutine_wrapper<int> {
  counter() { set_coroutine(run()); }
  coroutine<int> run() { co_return 2; }
};
