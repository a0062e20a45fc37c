// The library's logger: one pluggable sink, stderr by default.
#pragma once

#include "config.hpp"

#include <cstdio>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>

namespace codestare::async_utils {

enum class log_level { debug, info, warning, error };

/// Signature of a log sink; it may be called from any thread that logs.
using log_handler = std::function<void(log_level, std::string_view message)>;

namespace detail {
struct log_state {
  std::recursive_mutex mutex;  // recursive: a sink may log itself
  log_handler handler;  // empty: the stderr default
};
ASYNC_UTILS_LINK log_state& log_sink();

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK log_state& log_sink() {
  static log_state state;
  return state;
}
#endif  // ASYNC_UTILS_DEFINITIONS

ASYNC_UTILS_LINK const char* level_name(log_level level) noexcept;

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK const char* level_name(log_level level) noexcept {
  switch (level) {
    case log_level::debug: return "DEBUG";
    case log_level::info: return "INFO";
    case log_level::warning: return "WARNING";
    case log_level::error: return "ERROR";
  }
  return "?";
}
#endif  // ASYNC_UTILS_DEFINITIONS
}  // namespace detail

/// Replaces the sink (an empty function restores the stderr default). Returns the previous one.
ASYNC_UTILS_LINK log_handler set_log_handler(log_handler handler);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK log_handler set_log_handler(log_handler handler) {
  auto& sink = detail::log_sink();
  std::lock_guard guard(sink.mutex);
  std::swap(sink.handler, handler);
  return handler;
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// Sends one message to the sink. Sinks are called one at a time (under a recursive mutex), so they need no locking.
ASYNC_UTILS_LINK void log(log_level level, std::string_view message);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void log(log_level level, std::string_view message) {
  auto& sink = detail::log_sink();
  std::lock_guard guard(sink.mutex);
  if (sink.handler) {
    sink.handler(level, message);
  } else {
    std::fprintf(stderr, "async_utils %s: %.*s\n", detail::level_name(level),
                 static_cast<int>(message.size()), message.data());
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("log") {
  TEST_CASE("set_log_handler captures messages and restores the previous sink") {
    using namespace codestare::async_utils;
    std::string seen;
    auto previous = set_log_handler([&](log_level level, std::string_view message) {
      seen += std::string(detail::level_name(level)) + ":" + std::string(message);
    });
    log(log_level::warning, "hello");
    CHECK(seen == "WARNING:hello");
    auto mine = set_log_handler(std::move(previous));
    CHECK(static_cast<bool>(mine));
  }
}
#endif
