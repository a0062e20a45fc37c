// The exceptions of asyncio, spelled the C++ way (SPEC section 0).
#pragma once

#include "config.hpp"

#include <stdexcept>
#include <string>

namespace codestare::async_utils {

/// asyncio.CancelledError: thrown at the suspension point of a cancelled task.
class cancelled_error : public std::exception {
 public:
  cancelled_error() = default;
  explicit cancelled_error(std::string message) : message_(std::move(message)) {}
  /// The message given to cancel(), empty when none was.
  const std::string& message() const noexcept { return message_; }
  const char* what() const noexcept override;

 private:
  std::string message_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK const char* cancelled_error::what() const noexcept {
  return message_.empty() ? "cancelled" : message_.c_str();
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// asyncio.TimeoutError: a wait_for() or awaitable_predicate timed out.
class timeout_error : public std::runtime_error {
 public:
  timeout_error() : std::runtime_error("timed out") {}
  explicit timeout_error(const std::string& what) : std::runtime_error(what) {}
};

/// asyncio.InvalidStateError: a future or coroutine used in a state that does not allow it.
class invalid_state_error : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

/// asyncio.QueueEmpty: get_nowait() on an empty queue.
class queue_empty : public std::runtime_error {
 public:
  queue_empty() : std::runtime_error("queue is empty") {}
};

/// asyncio.QueueFull: put_nowait() on a full queue.
class queue_full : public std::runtime_error {
 public:
  queue_full() : std::runtime_error("queue is full") {}
};

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("errors") {
  TEST_CASE("cancelled_error carries the cancel message") {
    using codestare::async_utils::cancelled_error;
    CHECK(std::string(cancelled_error().what()) == "cancelled");
    CHECK(cancelled_error("stop").message() == "stop");
    CHECK(std::string(cancelled_error("stop").what()) == "stop");
  }
  TEST_CASE("error types map to the standard hierarchy") {
    using namespace codestare::async_utils;
    CHECK_THROWS_AS(throw timeout_error(), std::runtime_error);
    CHECK_THROWS_AS(throw invalid_state_error("x"), std::logic_error);
    CHECK_THROWS_AS(throw queue_empty(), std::runtime_error);
    CHECK_THROWS_AS(throw queue_full(), std::runtime_error);
    // cancelled_error is deliberately not a std::runtime_error: catching runtime errors must
    // not swallow cancellation by accident (asyncio made CancelledError a BaseException too).
    CHECK_FALSE(std::is_base_of_v<std::runtime_error, cancelled_error>);
  }
}
#endif
