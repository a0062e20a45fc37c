// Shared by the C++ side of the parity scenarios: the trace printer and a few names.
// A scenario's main() ends with `return 0;`: run.py builds every scenario into one program, where
// main() becomes an ordinary function (without it the scenario is built alone, more slowly).
#pragma once

#include "async_utils.hpp"

#include <iostream>
#include <string>

using namespace codestare::async_utils;
using namespace std::chrono_literals;

/// One trace line, flushed at once so that a crash keeps what came before it.
inline void say(const std::string& line) { std::cout << line << std::endl; }

/// Python's bool spelling, so the traces compare.
inline std::string py(bool b) { return b ? "True" : "False"; }

/// The Python name of the exception an exception_ptr holds, for traces.
inline std::string exc_name(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const cancelled_error&) {
    return "CancelledError";
  } catch (const timeout_error&) {
    return "TimeoutError";
  } catch (const std::invalid_argument& x) {
    return std::string("ValueError(") + x.what() + ")";
  } catch (const std::runtime_error& x) {
    return std::string("RuntimeError(") + x.what() + ")";
  } catch (...) {
    return "other";
  }
}
