// async_utils.hpp - async_utils 0.1.0
// Python's codestare.async_utils and the asyncio it stands on, for C++20.
//
// GENERATED from src/ by amalgamate.py; edit src/, not this file.
//
// MIT License
//
// Copyright (c) 2026 the async_utils authors
//
// Permission is hereby granted, free of charge, to any person obtaining a copy of this software
// and associated documentation files (the "Software"), to deal in the Software without
// restriction, including without limitation the rights to use, copy, modify, merge, publish,
// distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
// Software is furnished to do so, subject to the following conditions:
//
// The above copyright notice and this permission notice shall be included in all copies or
// substantial portions of the Software.
//
// THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
// BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
// NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
// DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
// OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
//
// Configuration macros (define them before including this header):
//   ASYNC_UTILS_TESTS           compile the embedded doctest TEST_CASEs (needs <doctest/doctest.h>)
//   ASYNC_UTILS_TESTS_MAIN      as ASYNC_UTILS_TESTS, plus doctest's main(); in one TU only
//   ASYNC_UTILS_BACKEND_EPOLL   force the epoll backend (the default on Linux)
//   ASYNC_UTILS_BACKEND_KQUEUE  force the kqueue backend (the default on macOS and the BSDs)
//   ASYNC_UTILS_BACKEND_POLL    force the portable poll(2) backend (the default elsewhere)
//
// Contents:
//   Platform: configuration, errors, logging, the I/O backends.
//     src/platform/config.hpp          Version, backend selection and the hook that turns the
//                                      embedded tests on.
//     src/platform/errors.hpp          The exceptions of asyncio, spelled the C++ way (SPEC section
//                                      0).
//     src/platform/log.hpp             The library's logger: one pluggable sink, stderr by default.
//     src/platform/posix.hpp           Small POSIX helpers shared by the backends: errno to
//                                      exceptions, an owning fd, readiness bits.
//     src/platform/backend_epoll.hpp   The Linux backend: epoll with one-shot arming, so a closed
//                                      and reused descriptor cannot hang.
//     src/platform/backend_kqueue.hpp  The Apple/BSD backend: kqueue with EV_ONESHOT filters.
//                                      Compiled here only against a shim.
//     src/platform/backend_poll.hpp    The portable backend: poll(2) over a compact array of the
//                                      armed descriptors.
//     src/platform/backend.hpp         Picks the I/O backend chosen in config.hpp, and the
//                                      cross-thread wake-up descriptor.
//   Runtime: the event loop, futures, coroutines, tasks and the asyncio helpers.
//     src/runtime/test_support.hpp     Helpers for the embedded tests only: bounded runs,
//                                      descriptor and thread counts, log capture.
//     src/runtime/intrusive_list.hpp   An intrusive doubly linked FIFO: waiters live in the
//                                      awaiting coroutine frame, never on the heap.
//     src/runtime/job_queue.hpp        The loop's ready queue: a ring buffer of two-word jobs, so
//                                      scheduling never allocates once warm.
//     src/runtime/timer_heap.hpp       Timers in a binary min-heap whose nodes know their position,
//                                      so cancelling removes at once.
//     src/runtime/future_core.hpp      The untyped state behind future<T> and task<T>: status,
//                                      waiters, done callbacks, cancellation.
//     src/runtime/any_task.hpp         any_task, the untyped task handle (what current_task() and
//                                      all_tasks() return), and the exception_context given to the
//                                      loop's exception handler.
//     src/runtime/handle.hpp           handle: what call_soon, call_later and call_at return
//                                      (asyncio's Handle and TimerHandle).
//     src/runtime/event_loop.hpp       event_loop: asyncio's loop. Ready jobs, timers, descriptors,
//                                      cross-thread posts, the exception handler; one loop runs per
//                                      thread at a time.
//     src/runtime/task_steps.hpp       How futures finish and tasks run: the loop-facing half of
//                                      future_core (step, suspend, wake, cancel, finish), written
//                                      after event_loop because it schedules on it.
//     src/runtime/awaitable.hpp        What counts as an awaitable, and what co_await on it yields
//                                      (used by create_task and friends).
//     src/runtime/future.hpp           future<T>: asyncio.Future, a copyable handle to a result
//                                      slot bound to a loop.
//     src/runtime/coroutine.hpp        coroutine<T>: what an `async def` returns. Lazy, move-only,
//                                      awaited once or run by a task.
//     src/runtime/sleep.hpp            sleep(duration): asyncio.sleep. sleep(0s) yields to the loop
//                                      once without a timer.
//     src/runtime/completion.hpp       wait_done(fut): waits until a future or task is done,
//                                      without touching its outcome; and the completion awaiter
//                                      behind it, wait_for and run().
//     src/runtime/task.hpp             task<T>: asyncio.Task, a future driving a coroutine;
//                                      create_task, current_task, all_tasks.
//     src/runtime/wait_for.hpp         wait_for(aw, timeout): asyncio.wait_for. On timeout the
//                                      inner task is cancelled, awaited, and timeout_error is
//                                      thrown.
//     src/runtime/gather.hpp           gather(aws...) and gather(range): asyncio.gather, with the
//                                      return_exceptions form.
//     src/runtime/shield.hpp           shield(aw): asyncio.shield. Cancelling the awaiting task
//                                      does not cancel what it awaits.
//     src/runtime/io.hpp               Awaitable I/O on non-blocking descriptors:
//                                      wait_readable/writable and asyncio's sock_* calls. Each
//                                      operation is tried first and waits only on EAGAIN; retries
//                                      run in the loop's dispatch, so a spurious wake-up never
//                                      resumes the task.
//     src/runtime/run.hpp              run(aw): asyncio.run. A fresh loop runs aw, then cancels and
//                                      awaits what is left, shuts the executor down and closes, so
//                                      nothing outlives the call.

#if !defined(__INCLUDE_LEVEL__) || __INCLUDE_LEVEL__ > 0
#pragma once
#endif
#ifndef ASYNC_UTILS_HPP_INCLUDED
#define ASYNC_UTILS_HPP_INCLUDED

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <concepts>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fcntl.h>
#include <functional>
#include <memory>
#include <mutex>
#include <netinet/in.h>
#include <optional>
#include <ostream>
#include <ranges>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <sys/socket.h>
#include <sys/types.h>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unistd.h>
#include <utility>
#include <variant>
#include <vector>

// async_utils: Python's codestare.async_utils and the asyncio it stands on, for C++20.
// This root file lists the parts in dependency order; amalgamate.py inlines them into the
// single header at the repository root.

// Platform: configuration, errors, logging, the I/O backends.
// ---- begin src/platform/config.hpp ----
// Version, backend selection and the hook that turns the embedded tests on.

#define ASYNC_UTILS_VERSION_MAJOR 0
#define ASYNC_UTILS_VERSION_MINOR 1
#define ASYNC_UTILS_VERSION_PATCH 0
#define ASYNC_UTILS_VERSION "0.1.0"

// Backend: forced by the user with ASYNC_UTILS_BACKEND_{EPOLL,KQUEUE,POLL}, else the best the
// platform has. Exactly one of them ends up defined.
#if (defined(ASYNC_UTILS_BACKEND_EPOLL) + defined(ASYNC_UTILS_BACKEND_KQUEUE) + \
     defined(ASYNC_UTILS_BACKEND_POLL)) > 1
#error "async_utils: define at most one of ASYNC_UTILS_BACKEND_EPOLL, _KQUEUE, _POLL"
#endif
#if !defined(ASYNC_UTILS_BACKEND_EPOLL) && !defined(ASYNC_UTILS_BACKEND_KQUEUE) && \
    !defined(ASYNC_UTILS_BACKEND_POLL)
#if defined(__linux__)
#define ASYNC_UTILS_BACKEND_EPOLL
#elif defined(__APPLE__) || defined(__FreeBSD__) || defined(__OpenBSD__) || defined(__NetBSD__) || \
    defined(__DragonFly__)
#define ASYNC_UTILS_BACKEND_KQUEUE
#else
#define ASYNC_UTILS_BACKEND_POLL
#endif
#endif

#if !defined(__unix__) && !defined(__APPLE__)
#error "async_utils needs a POSIX system (Linux, macOS or a BSD)"
#endif

#if __cplusplus < 202002L
#error "async_utils needs C++20 (-std=c++20)"
#endif

// Embedded tests: ASYNC_UTILS_TESTS compiles the doctest TEST_CASEs that sit beside the code,
// ASYNC_UTILS_TESTS_MAIN also supplies doctest's main(). Without either, doctest is never named.
#if defined(ASYNC_UTILS_TESTS_MAIN) && !defined(ASYNC_UTILS_TESTS)
#define ASYNC_UTILS_TESTS
#endif
#ifdef ASYNC_UTILS_TESTS
#ifdef ASYNC_UTILS_TESTS_MAIN
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#endif
#include <doctest/doctest.h>
#endif
// ---- end src/platform/config.hpp ----
// ---- begin src/platform/errors.hpp ----
// The exceptions of asyncio, spelled the C++ way (SPEC section 0).


namespace codestare::async_utils {

/// asyncio.CancelledError: thrown at the suspension point of a cancelled task.
class cancelled_error : public std::exception {
 public:
  cancelled_error() = default;
  explicit cancelled_error(std::string message) : message_(std::move(message)) {}
  /// The message given to cancel(), empty when none was.
  const std::string& message() const noexcept { return message_; }
  const char* what() const noexcept override {
    return message_.empty() ? "cancelled" : message_.c_str();
  }

 private:
  std::string message_;
};

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
// ---- end src/platform/errors.hpp ----
// ---- begin src/platform/log.hpp ----
// The library's logger: one pluggable sink, stderr by default.


namespace codestare::async_utils {

enum class log_level { debug, info, warning, error };

/// Signature of a log sink; it may be called from any thread that logs.
using log_handler = std::function<void(log_level, std::string_view message)>;

namespace detail {
struct log_state {
  std::recursive_mutex mutex;  // recursive: a sink may log itself
  log_handler handler;  // empty: the stderr default
};
inline log_state& log_sink() {
  static log_state state;
  return state;
}
inline const char* level_name(log_level level) noexcept {
  switch (level) {
    case log_level::debug: return "DEBUG";
    case log_level::info: return "INFO";
    case log_level::warning: return "WARNING";
    case log_level::error: return "ERROR";
  }
  return "?";
}
}  // namespace detail

/// Replaces the sink (an empty function restores the stderr default). Returns the previous one.
inline log_handler set_log_handler(log_handler handler) {
  auto& sink = detail::log_sink();
  std::lock_guard guard(sink.mutex);
  std::swap(sink.handler, handler);
  return handler;
}

/// Sends one message to the sink. Sinks are called one at a time (under a recursive mutex), so they need no locking.
inline void log(log_level level, std::string_view message) {
  auto& sink = detail::log_sink();
  std::lock_guard guard(sink.mutex);
  if (sink.handler) {
    sink.handler(level, message);
  } else {
    std::fprintf(stderr, "async_utils %s: %.*s\n", detail::level_name(level),
                 static_cast<int>(message.size()), message.data());
  }
}

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
// ---- end src/platform/log.hpp ----
// ---- begin src/platform/posix.hpp ----
// Small POSIX helpers shared by the backends: errno to exceptions, an owning fd, readiness bits.


namespace codestare::async_utils::detail {

/// Readiness bits the backends report and accept; `io_error` (error, hang-up, closed fd) is
/// always reported and wakes readers and writers alike, so they retry and see the real error.
inline constexpr unsigned io_read = 1;
inline constexpr unsigned io_write = 2;
inline constexpr unsigned io_error = 4;

[[noreturn]] inline void throw_errno(int err, const std::string& what) {
  throw std::system_error(err, std::generic_category(), what);
}
[[noreturn]] inline void throw_errno(const std::string& what) { throw_errno(errno, what); }

/// Throws std::system_error(EBADF) unless fd is an open descriptor.
inline void require_open_fd(int fd, const char* what) {
  if (fd < 0 || ::fcntl(fd, F_GETFD) == -1) throw_errno(EBADF, std::string(what) + ": bad file descriptor " + std::to_string(fd));
}

/// Owns one descriptor; closes it on destruction.
class unique_fd {
 public:
  unique_fd() noexcept = default;
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& other) noexcept {
    reset(std::exchange(other.fd_, -1));
    return *this;
  }
  ~unique_fd() { reset(); }
  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

/// Sets O_NONBLOCK and FD_CLOEXEC, the state every descriptor the loop owns must be in.
inline void make_nonblocking_cloexec(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags == -1 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) == -1) throw_errno("fcntl(O_NONBLOCK)");
  flags = ::fcntl(fd, F_GETFD);
  if (flags == -1 || ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC) == -1) throw_errno("fcntl(FD_CLOEXEC)");
}

/// Milliseconds for poll-style calls: rounded up, so a timer is never woken early and spun on.
inline int timeout_ms(std::chrono::nanoseconds timeout) noexcept {
  if (timeout.count() < 0) return -1;
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(timeout).count();
  return ms > 0x7fffffff ? 0x7fffffff : static_cast<int>(ms);
}

}  // namespace codestare::async_utils::detail
// ---- end src/platform/posix.hpp ----
// ---- begin src/platform/backend_epoll.hpp ----
// The Linux backend: epoll with one-shot arming, so a closed and reused descriptor cannot hang.

#ifdef ASYNC_UTILS_BACKEND_EPOLL
#include <sys/epoll.h>

namespace codestare::async_utils::detail {

/// One-shot registrations: arm(fd, mask) asks for the next readiness in `mask`, and a report
/// disarms the fd until it is armed again. Arming modifies first and adds when the kernel has
/// forgotten the fd (it drops registrations of closed descriptors), so reuse of a number is safe.
class epoll_backend {
 public:
  static constexpr const char* name = "epoll";

  epoll_backend() : epfd_(::epoll_create1(EPOLL_CLOEXEC)) {
    if (!epfd_) throw_errno("epoll_create1");
  }

  /// First sight of fd: registers it disarmed, so a bad descriptor fails here, at the caller.
  void add(int fd) {
    epoll_event ev{};
    ev.events = EPOLLONESHOT;
    ev.data.fd = fd;
    if (::epoll_ctl(epfd_.get(), EPOLL_CTL_ADD, fd, &ev) == -1 && errno != EEXIST)
      throw_errno("epoll_ctl(ADD, fd " + std::to_string(fd) + ")");
  }
  /// Arms fd for one report of `mask` (io_read | io_write); 0 disarms.
  void arm(int fd, unsigned mask) {
    epoll_event ev{};
    ev.events = EPOLLONESHOT | ((mask & io_read) ? EPOLLIN | EPOLLRDHUP : 0u) | ((mask & io_write) ? EPOLLOUT : 0u);
    ev.data.fd = fd;
    if (::epoll_ctl(epfd_.get(), EPOLL_CTL_MOD, fd, &ev) == -1) {
      if (errno != ENOENT || ::epoll_ctl(epfd_.get(), EPOLL_CTL_ADD, fd, &ev) == -1)
        throw_errno("epoll_ctl(fd " + std::to_string(fd) + ")");
    }
  }
  void remove(int fd) noexcept { ::epoll_ctl(epfd_.get(), EPOLL_CTL_DEL, fd, nullptr); }
  /// A permanent, level-triggered read watch (the wake-up and signal descriptors).
  void watch(int fd) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (::epoll_ctl(epfd_.get(), EPOLL_CTL_ADD, fd, &ev) == -1) throw_errno("epoll_ctl(watch)");
  }

  /// Waits up to `timeout` (negative: forever) and calls on_event(fd, bits) for each report.
  template <class F>
  void wait(std::chrono::nanoseconds timeout, F&& on_event) {
    int n = wait_for_events(timeout);
    if (n < 0) {
      if (errno == EINTR) return;
      throw_errno("epoll_wait");
    }
    for (int i = 0; i < n; ++i) {
      const epoll_event& ev = events_[static_cast<std::size_t>(i)];
      unsigned bits = 0;
      if (ev.events & (EPOLLIN | EPOLLRDHUP)) bits |= io_read;
      if (ev.events & EPOLLOUT) bits |= io_write;
      if (ev.events & (EPOLLERR | EPOLLHUP)) bits |= io_error;
      on_event(ev.data.fd, bits);
    }
  }

 private:
  int wait_for_events(std::chrono::nanoseconds timeout) {
    const int max = static_cast<int>(sizeof(events_) / sizeof(events_[0]));
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
    // epoll_pwait2 takes nanoseconds; older kernels say ENOSYS once and we stop asking.
    if (have_pwait2_ && timeout.count() > 0) {
      timespec ts{static_cast<time_t>(timeout.count() / 1000000000),
                  static_cast<long>(timeout.count() % 1000000000)};
      int n = ::epoll_pwait2(epfd_.get(), events_, max, &ts, nullptr);
      if (n >= 0 || errno != ENOSYS) return n;
      have_pwait2_ = false;
    }
#endif
    return ::epoll_wait(epfd_.get(), events_, max, timeout_ms(timeout));
  }
  unique_fd epfd_;
  bool have_pwait2_ = true;
  epoll_event events_[256];
};

}  // namespace codestare::async_utils::detail
#endif  // ASYNC_UTILS_BACKEND_EPOLL
// ---- end src/platform/backend_epoll.hpp ----
// ---- begin src/platform/backend_kqueue.hpp ----
// The Apple/BSD backend: kqueue with EV_ONESHOT filters. Compiled here only against a shim.

#ifdef ASYNC_UTILS_BACKEND_KQUEUE
#include <sys/event.h>
#include <sys/time.h>

namespace codestare::async_utils::detail {

/// Same contract as the epoll backend; read and write are separate one-shot filters.
class kqueue_backend {
 public:
  static constexpr const char* name = "kqueue";

  kqueue_backend() : kq_(::kqueue()) {
    if (!kq_) throw_errno("kqueue");
    make_nonblocking_cloexec(kq_.get());
  }
  void add(int fd) { require_open_fd(fd, "add"); }
  void arm(int fd, unsigned mask) {
    unsigned& armed = armed_at(fd);
    change(fd, EVFILT_READ, io_read, mask, armed);
    change(fd, EVFILT_WRITE, io_write, mask, armed);
  }
  void remove(int fd) noexcept {
    if (static_cast<std::size_t>(fd) < armed_.size()) {
      unsigned& armed = armed_[static_cast<std::size_t>(fd)];
      try {
        change(fd, EVFILT_READ, io_read, 0, armed);
        change(fd, EVFILT_WRITE, io_write, 0, armed);
      } catch (...) {
        armed = 0;
      }
    }
  }
  void watch(int fd) {
    struct kevent ev;
    EV_SET(&ev, static_cast<uintptr_t>(fd), EVFILT_READ, EV_ADD, 0, 0, nullptr);
    if (::kevent(kq_.get(), &ev, 1, nullptr, 0, nullptr) == -1) throw_errno("kevent(watch)");
  }

  template <class F>
  void wait(std::chrono::nanoseconds timeout, F&& on_event) {
    timespec ts{};
    timespec* tsp = nullptr;
    if (timeout.count() >= 0) {
      ts.tv_sec = static_cast<time_t>(timeout.count() / 1000000000);
      ts.tv_nsec = static_cast<long>(timeout.count() % 1000000000);
      tsp = &ts;
    }
    const int max = static_cast<int>(sizeof(events_) / sizeof(events_[0]));
    int n = ::kevent(kq_.get(), nullptr, 0, events_, max, tsp);
    if (n < 0) {
      if (errno == EINTR) return;
      throw_errno("kevent");
    }
    for (int i = 0; i < n; ++i) {
      const struct kevent& ev = events_[i];
      int fd = static_cast<int>(ev.ident);
      unsigned bits = ev.filter == EVFILT_WRITE ? io_write : io_read;
      if (ev.flags & (EV_EOF | EV_ERROR)) bits |= io_error;
      if (static_cast<std::size_t>(fd) < armed_.size()) armed_[static_cast<std::size_t>(fd)] &= ~(bits & (io_read | io_write));
      on_event(fd, bits);
    }
  }

 private:
  unsigned& armed_at(int fd) {
    auto u = static_cast<std::size_t>(fd);
    if (u >= armed_.size()) armed_.resize(u + 1, 0);
    return armed_[u];
  }
  void change(int fd, short filter, unsigned bit, unsigned mask, unsigned& armed) {
    const bool want = (mask & bit) != 0, have = (armed & bit) != 0;
    if (want == have) return;
    struct kevent ev;
    EV_SET(&ev, static_cast<uintptr_t>(fd), filter, want ? (EV_ADD | EV_ONESHOT) : EV_DELETE, 0, 0, nullptr);
    armed ^= bit;
    if (::kevent(kq_.get(), &ev, 1, nullptr, 0, nullptr) == -1 && (want || errno != ENOENT)) {
      armed ^= bit;
      throw_errno("kevent(fd " + std::to_string(fd) + ")");
    }
  }
  unique_fd kq_;
  std::vector<unsigned> armed_;  // fd -> filters armed (one-shot filters clear on delivery)
  struct kevent events_[256];
};

}  // namespace codestare::async_utils::detail
#endif  // ASYNC_UTILS_BACKEND_KQUEUE
// ---- end src/platform/backend_kqueue.hpp ----
// ---- begin src/platform/backend_poll.hpp ----
// The portable backend: poll(2) over a compact array of the armed descriptors.

#ifdef ASYNC_UTILS_BACKEND_POLL
#include <poll.h>

namespace codestare::async_utils::detail {

/// Same contract as the epoll backend (one report per arm); the array holds only armed fds and
/// permanent watches, so each wait costs O(armed), not O(largest fd).
class poll_backend {
 public:
  static constexpr const char* name = "poll";

  void add(int fd) { require_open_fd(fd, "add"); }
  void arm(int fd, unsigned mask) {
    short events = static_cast<short>(((mask & io_read) ? POLLIN : 0) | ((mask & io_write) ? POLLOUT : 0));
    std::size_t i = slot(fd);
    if (i == npos) {
      if (events == 0) return;
      index_at(fd) = fds_.size();
      fds_.push_back({fd, events, 0});
      permanent_.push_back(false);
    } else if (events == 0 && !permanent_[i]) {
      erase(i);
    } else {
      fds_[i].events = events;
    }
  }
  void remove(int fd) noexcept {
    std::size_t i = slot(fd);
    if (i != npos && !permanent_[i]) erase(i);
  }
  void watch(int fd) {
    arm(fd, io_read);
    permanent_[slot(fd)] = true;
  }

  template <class F>
  void wait(std::chrono::nanoseconds timeout, F&& on_event) {
    int n = ::poll(fds_.data(), static_cast<nfds_t>(fds_.size()), timeout_ms(timeout));
    if (n < 0) {
      if (errno == EINTR) return;
      throw_errno("poll");
    }
    reported_.clear();
    for (std::size_t i = 0; i < fds_.size() && n > 0; ++i) {
      const short re = fds_[i].revents;
      if (re == 0) continue;
      --n;
      unsigned bits = 0;
      if (re & POLLIN) bits |= io_read;
      if (re & POLLOUT) bits |= io_write;
      if (re & (POLLERR | POLLHUP | POLLNVAL)) bits |= io_error;
      reported_.push_back({fds_[i].fd, bits});
    }
    // Disarm before dispatching, as a one-shot registration would be.
    for (const auto& r : reported_) remove(r.fd);
    for (const auto& r : reported_) on_event(r.fd, r.bits);
  }

 private:
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);
  std::size_t slot(int fd) const noexcept {
    auto u = static_cast<std::size_t>(fd);
    return u < index_.size() ? index_[u] : npos;
  }
  std::size_t& index_at(int fd) {
    auto u = static_cast<std::size_t>(fd);
    if (u >= index_.size()) index_.resize(u + 1, npos);
    return index_[u];
  }
  void erase(std::size_t i) noexcept {
    index_[static_cast<std::size_t>(fds_[i].fd)] = npos;
    if (i + 1 != fds_.size()) {
      fds_[i] = fds_.back();
      permanent_[i] = permanent_.back();
      index_[static_cast<std::size_t>(fds_[i].fd)] = i;
    }
    fds_.pop_back();
    permanent_.pop_back();
  }
  struct report {
    int fd;
    unsigned bits;
  };
  std::vector<pollfd> fds_;
  std::vector<bool> permanent_;
  std::vector<std::size_t> index_;  // fd -> position in fds_
  std::vector<report> reported_;
};

}  // namespace codestare::async_utils::detail
#endif  // ASYNC_UTILS_BACKEND_POLL
// ---- end src/platform/backend_poll.hpp ----
// ---- begin src/platform/backend.hpp ----
// Picks the I/O backend chosen in config.hpp, and the cross-thread wake-up descriptor.

#if defined(__linux__)
#include <sys/eventfd.h>
#endif

namespace codestare::async_utils::detail {

#if defined(ASYNC_UTILS_BACKEND_EPOLL)
using io_backend = epoll_backend;
#elif defined(ASYNC_UTILS_BACKEND_KQUEUE)
using io_backend = kqueue_backend;
#else
using io_backend = poll_backend;
#endif

/// Wakes a loop blocked in its backend from another thread: an eventfd on Linux, a pipe
/// elsewhere. notify() is async-signal-safe and thread-safe; drain() runs on the loop thread.
class wakeup_fd {
 public:
  wakeup_fd() {
#if defined(__linux__)
    read_.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!read_) throw_errno("eventfd");
#else
    int fds[2];
    if (::pipe(fds) == -1) throw_errno("pipe");
    read_.reset(fds[0]);
    write_.reset(fds[1]);
    make_nonblocking_cloexec(fds[0]);
    make_nonblocking_cloexec(fds[1]);
#endif
  }
  int fd() const noexcept { return read_.get(); }
  void notify() const noexcept {
    const std::uint64_t one = 1;
    const int target = write_ ? write_.get() : read_.get();
    // EAGAIN means a wake-up is already pending, which is all we need.
    [[maybe_unused]] auto n = ::write(target, &one, write_ ? 1 : sizeof one);
  }
  void drain() const noexcept {
    char buf[64];
    while (::read(read_.get(), buf, sizeof buf) > 0) {
    }
  }

 private:
  unique_fd read_, write_;
};

}  // namespace codestare::async_utils::detail
// ---- end src/platform/backend.hpp ----

// Runtime: the event loop, futures, coroutines, tasks and the asyncio helpers.
// ---- begin src/runtime/test_support.hpp ----
// Helpers for the embedded tests only: bounded runs, descriptor and thread counts, log capture.

#ifdef ASYNC_UTILS_TESTS
#include <dirent.h>
#include <sstream>

namespace codestare::async_utils {
template <class T>
class coroutine;
}
namespace codestare::async_utils::testing {

/// Entries in a /proc/self directory (descriptors, threads), -1 where /proc is missing.
inline int count_entries(const char* path) {
  DIR* dir = ::opendir(path);
  if (!dir) return -1;
  int n = 0;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n - 1;  // the descriptor opendir itself holds (harmless for the task count: compared, not read)
}
inline int open_fds() { return count_entries("/proc/self/fd"); }
inline int threads() { return count_entries("/proc/self/task") + 1; }

/// run(body) under wait_for(limit), so a bug fails a test instead of hanging the suite.
/// Declared here for the tests of every later part; defined in run.hpp, after run().
void run_bounded(coroutine<void> body, std::chrono::milliseconds limit = std::chrono::milliseconds(10000));

/// Captures the library log for the lifetime of the object.
class log_capture {
 public:
  log_capture() {
    previous_ = set_log_handler([this](log_level, std::string_view message) {
      text_ += std::string(message);
      text_ += '\n';
    });
  }
  ~log_capture() { set_log_handler(std::move(previous_)); }
  const std::string& text() const { return text_; }

 private:
  std::string text_;
  log_handler previous_;
};

}  // namespace codestare::async_utils::testing
#endif
// ---- end src/runtime/test_support.hpp ----
// ---- begin src/runtime/intrusive_list.hpp ----
// An intrusive doubly linked FIFO: waiters live in the awaiting coroutine frame, never on the heap.


namespace codestare::async_utils::detail {

/// A link that unlinks itself when destroyed, so a frame destroyed while waiting (a cancelled
/// task, a loop closed with work pending) never leaves a dangling node behind in some queue.
class list_node {
 public:
  list_node() noexcept = default;
  // Copies and moves start unlinked: membership belongs to one object, not to its value.
  list_node(const list_node&) noexcept {}
  list_node& operator=(const list_node&) noexcept { return *this; }
  ~list_node() { unlink(); }

  bool linked() const noexcept { return next_ != nullptr; }
  void unlink() noexcept {
    if (next_ != nullptr) {
      prev_->next_ = next_;
      next_->prev_ = prev_;
      next_ = prev_ = nullptr;
    }
  }

 private:
  template <class T>
  friend class intrusive_list;
  list_node* prev_ = nullptr;
  list_node* next_ = nullptr;
};

/// FIFO of T (which derives from list_node). Non-owning; not copyable.
template <class T>
class intrusive_list {
 public:
  intrusive_list() noexcept { head_.prev_ = head_.next_ = &head_; }
  intrusive_list(const intrusive_list&) = delete;
  intrusive_list& operator=(const intrusive_list&) = delete;
  ~intrusive_list() {
    // Orphan what is still linked so that the nodes' destructors do not touch this list.
    while (!empty()) pop_front();
    head_.prev_ = head_.next_ = nullptr;
  }

  bool empty() const noexcept { return head_.next_ == &head_; }
  T& front() noexcept { return *static_cast<T*>(head_.next_); }
  T& back() noexcept { return *static_cast<T*>(head_.prev_); }

  void push_back(T& item) noexcept {
    list_node& node = item;
    node.unlink();
    node.prev_ = head_.prev_;
    node.next_ = &head_;
    head_.prev_->next_ = &node;
    head_.prev_ = &node;
  }
  T* pop_front() noexcept {
    if (empty()) return nullptr;
    T* item = &front();
    static_cast<list_node*>(item)->unlink();
    return item;
  }
  std::size_t size() const noexcept {
    std::size_t n = 0;
    for (const list_node* node = head_.next_; node != &head_; node = node->next_) ++n;
    return n;
  }
  /// Calls fn(T&) for each item; fn may unlink the item it is given (and only that one).
  template <class F>
  void for_each(F&& fn) {
    for (list_node* node = head_.next_; node != &head_;) {
      list_node* next = node->next_;
      fn(*static_cast<T*>(node));
      node = next;
    }
  }

 private:
  list_node head_;
};

}  // namespace codestare::async_utils::detail

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("intrusive_list") {
  TEST_CASE("FIFO order, unlink on destruction, orphaning on list destruction") {
    using namespace codestare::async_utils::detail;
    struct item : list_node {
      int value = 0;
    };
    intrusive_list<item> list;
    item a, b, c;
    a.value = 1;
    b.value = 2;
    c.value = 3;
    list.push_back(a);
    list.push_back(b);
    list.push_back(c);
    CHECK(list.size() == 3);
    {
      item d;
      list.push_back(d);
      CHECK(list.size() == 4);
    }  // d unlinks itself
    CHECK(list.size() == 3);
    b.unlink();
    CHECK(list.pop_front()->value == 1);
    CHECK(list.pop_front()->value == 3);
    CHECK(list.pop_front() == nullptr);
    item copy = a;  // copies start unlinked
    CHECK_FALSE(copy.linked());
    auto* orphan = new intrusive_list<item>;
    orphan->push_back(a);
    delete orphan;
    CHECK_FALSE(a.linked());
  }
}
#endif
// ---- end src/runtime/intrusive_list.hpp ----
// ---- begin src/runtime/job_queue.hpp ----
// The loop's ready queue: a ring buffer of two-word jobs, so scheduling never allocates once warm.


namespace codestare::async_utils::detail {

/// A unit of ready work: fn(arg, true) runs it, fn(arg, false) discards it (releasing what arg
/// holds) when the loop closes before running it.
struct job {
  void (*fn)(void* arg, bool run);
  void* arg;
};

class job_queue {
 public:
  bool empty() const noexcept { return head_ == tail_; }
  std::size_t size() const noexcept { return tail_ - head_; }

  void push(job j) {
    if (size() == buffer_.size()) grow();
    buffer_[tail_++ & (buffer_.size() - 1)] = j;
  }
  job pop() noexcept { return buffer_[head_++ & (buffer_.size() - 1)]; }

  /// Appends every job of `other` (emptied), keeping order.
  void splice(job_queue& other) {
    while (!other.empty()) push(other.pop());
  }

 private:
  void grow() {
    std::vector<job> bigger(buffer_.empty() ? 64 : buffer_.size() * 2);
    std::size_t n = size();
    for (std::size_t i = 0; i < n; ++i) bigger[i] = pop();
    buffer_ = std::move(bigger);
    head_ = 0;
    tail_ = n;
  }
  std::vector<job> buffer_;  // size is zero or a power of two
  std::size_t head_ = 0;     // monotonic; masked on access
  std::size_t tail_ = 0;
};

}  // namespace codestare::async_utils::detail

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("job_queue") {
  TEST_CASE("FIFO across growth and wrap-around") {
    using namespace codestare::async_utils::detail;
    job_queue q;
    std::vector<std::size_t> seen;
    auto fn = +[](void* arg, bool) { (void)arg; };
    std::size_t next_in = 0, next_out = 0;
    for (int round = 0; round < 50; ++round) {
      for (int i = 0; i < 37; ++i) q.push({fn, reinterpret_cast<void*>(next_in++)});
      for (int i = 0; i < 30; ++i) CHECK(reinterpret_cast<std::size_t>(q.pop().arg) == next_out++);
    }
    while (!q.empty()) CHECK(reinterpret_cast<std::size_t>(q.pop().arg) == next_out++);
    CHECK(next_in == next_out);
  }
}
#endif
// ---- end src/runtime/job_queue.hpp ----
// ---- begin src/runtime/timer_heap.hpp ----
// Timers in a binary min-heap whose nodes know their position, so cancelling removes at once.


namespace codestare::async_utils::detail {

using clock = std::chrono::steady_clock;

/// A timer lives in whoever waits (a sleeping frame, a call_later handle); the heap only points.
struct timer_node {
  clock::time_point when{};
  std::uint64_t seq = 0;  // ties on `when` fire in scheduling order, as asyncio's heap does
  std::size_t index = npos;
  void (*fire)(timer_node*, bool run) = nullptr;  // run=false: the loop closed first
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);
  bool scheduled() const noexcept { return index != npos; }
};

class timer_heap {
 public:
  bool empty() const noexcept { return heap_.empty(); }
  std::size_t size() const noexcept { return heap_.size(); }
  timer_node& top() noexcept { return *heap_.front(); }

  void push(timer_node& node) {
    node.seq = next_seq_++;
    node.index = heap_.size();
    heap_.push_back(&node);
    sift_up(node.index);
  }
  /// Removes a scheduled node in O(log n); cancelled timers never pile up.
  void remove(timer_node& node) noexcept {
    std::size_t i = node.index;
    if (i == timer_node::npos) return;
    node.index = timer_node::npos;
    timer_node* last = heap_.back();
    heap_.pop_back();
    if (last == &node) return;
    heap_[i] = last;
    last->index = i;
    sift_down(i);
    sift_up(last->index);
  }
  timer_node& pop() noexcept {
    timer_node& node = top();
    remove(node);
    return node;
  }

 private:
  static bool before(const timer_node* a, const timer_node* b) noexcept {
    return a->when < b->when || (a->when == b->when && a->seq < b->seq);
  }
  void place(std::size_t i, timer_node* node) noexcept {
    heap_[i] = node;
    node->index = i;
  }
  void sift_up(std::size_t i) noexcept {
    timer_node* node = heap_[i];
    while (i > 0) {
      std::size_t parent = (i - 1) / 2;
      if (!before(node, heap_[parent])) break;
      place(i, heap_[parent]);
      i = parent;
    }
    place(i, node);
  }
  void sift_down(std::size_t i) noexcept {
    timer_node* node = heap_[i];
    const std::size_t n = heap_.size();
    for (;;) {
      std::size_t child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && before(heap_[child + 1], heap_[child])) ++child;
      if (!before(heap_[child], node)) break;
      place(i, heap_[child]);
      i = child;
    }
    place(i, node);
  }
  std::vector<timer_node*> heap_;
  std::uint64_t next_seq_ = 0;
};

}  // namespace codestare::async_utils::detail

#ifdef ASYNC_UTILS_TESTS
#include <random>
TEST_SUITE("timer_heap") {
  TEST_CASE("pops in deadline order, ties in insertion order, removal anywhere") {
    using namespace codestare::async_utils::detail;
    std::mt19937 rng(7);
    std::vector<timer_node> nodes(500);
    timer_heap heap;
    const auto base = clock::now();
    for (auto& n : nodes) {
      n.when = base + std::chrono::milliseconds(rng() % 50);
      heap.push(n);
    }
    for (std::size_t i = 0; i < nodes.size(); i += 3) heap.remove(nodes[i]);
    heap.remove(nodes[0]);  // removing twice is harmless
    CHECK(heap.size() == nodes.size() - (nodes.size() + 2) / 3);
    const timer_node* prev = nullptr;
    while (!heap.empty()) {
      timer_node& n = heap.pop();
      CHECK_FALSE(n.scheduled());
      if (prev) CHECK((prev->when < n.when || (prev->when == n.when && prev->seq < n.seq)));
      prev = &n;
    }
  }
}
#endif
// ---- end src/runtime/timer_heap.hpp ----
// ---- begin src/runtime/future_core.hpp ----
// The untyped state behind future<T> and task<T>: status, waiters, done callbacks, cancellation.


namespace codestare::async_utils {

class event_loop;
/// Identifies a done callback for remove_done_callback (std::function cannot be compared).
using callback_id = std::uint64_t;

namespace detail {

enum class future_status : std::uint8_t { pending, finished, cancelled };

/// Waits for a future to finish (an awaiting task, gather, run_until_complete). Notified
/// synchronously when it finishes, after being unlinked; notify only schedules, never runs user code.
struct completion_waiter : list_node {
  void (*notify)(completion_waiter*) = nullptr;
};

/// What a suspended task currently waits on. task.cancel() calls cancel(), which withdraws the
/// wait and schedules the task so that its await throws cancelled_error; false means the wait
/// can no longer be withdrawn (as asyncio's `_fut_waiter.cancel()` returning False).
struct cancel_hook {
  bool (*cancel)(cancel_hook*) = nullptr;
};

/// One object serves asyncio's Future and Task: a task is a future that also drives a coroutine.
/// Reference counted by handles (loop thread only); a task holds one extra reference while it runs.
class future_core : public list_node {
 public:
  future_core(event_loop* loop, bool is_task) noexcept : loop_(loop), is_task_(is_task) {}
  future_core(const future_core&) = delete;
  future_core& operator=(const future_core&) = delete;
  virtual ~future_core() = default;

  void add_ref() noexcept { ++refs_; }
  void release() noexcept;
  std::uint32_t use_count() const noexcept { return refs_; }

  event_loop* loop() const noexcept { return loop_; }
  bool done() const noexcept { return status_ != future_status::pending; }
  bool cancelled() const noexcept { return status_ == future_status::cancelled; }
  bool is_task() const noexcept { return is_task_; }
  bool has_error() const noexcept { return status_ == future_status::finished && error_ != nullptr; }

  /// Throws what result() must throw (invalid_state_error, cancelled_error, the stored
  /// exception); returns normally when a value is there. Marks the outcome as retrieved.
  void check_result();
  /// asyncio's exception(): the stored exception or null; throws when pending or cancelled.
  std::exception_ptr exception();
  void set_exception(std::exception_ptr error);
  /// Future: cancels now. Task: withdraws the current wait or cancels at the next suspension.
  bool cancel(std::string message);
  callback_id add_done_callback(std::function<void(future_core&)> fn);
  std::size_t remove_done_callback(callback_id id) noexcept;
  void add_waiter(completion_waiter& waiter) noexcept { waiters_.push_back(waiter); }
  const std::string& cancel_message() const noexcept { return cancel_message_; }

  // ---- task part -------------------------------------------------------------------------
  std::string name() const;
  void set_name(std::string name) { name_ = std::move(name); }
  /// asyncio's cancelling(): the number of cancel() calls so far.
  unsigned cancel_requests() const noexcept { return cancel_requests_; }
  /// Called by an awaitable about to suspend the running task at `where`.
  void suspend_on(cancel_hook* hook, std::coroutine_handle<> where);
  /// Schedules the next step (the awaited thing is ready or was withdrawn).
  void wake();
  /// Called by awaitables on resumption: throws cancelled_error if their wait was withdrawn or a
  /// cancel() arrived after the wake-up (consuming it, as one asyncio __step would).
  void throw_if_cancelled(bool withdrawn = false);
  /// Runs the task until its next suspension (loop thread).
  void step();
  /// Loop closing with this task pending: destroys the coroutine, ends the task cancelled.
  void abandon() noexcept;

 protected:
  /// Task: moves the outcome out of the finished coroutine into this state.
  virtual void harvest() noexcept {}
  /// Task: destroys the coroutine frame (finished or not).
  virtual void destroy_frame() noexcept {}
  virtual bool frame_done() const noexcept { return true; }
  void start(std::coroutine_handle<> top, std::string name);
  void finish(future_status status) noexcept;

  event_loop* loop_;
  std::exception_ptr error_;
  bool retrieved_ = false;  // someone looked at the outcome: no "never retrieved" report

 private:
  friend class codestare::async_utils::event_loop;
  struct done_callback {
    callback_id id;
    std::function<void(future_core&)> fn;
  };
  static void run_step(void* self, bool run) noexcept;
  void complete() noexcept;

  std::uint32_t refs_ = 1;
  future_status status_ = future_status::pending;
  bool is_task_;
  bool started_ = false;
  bool scheduled_ = false;
  bool must_cancel_ = false;
  unsigned cancel_requests_ = 0;
  callback_id next_callback_id_ = 0;
  intrusive_list<completion_waiter> waiters_;
  std::vector<done_callback> callbacks_;
  std::string cancel_message_;
  // Task part.
  std::string name_;
  std::uint64_t number_ = 0;
  std::coroutine_handle<> resume_at_;
  cancel_hook* waiting_on_ = nullptr;
};

/// The running task of the running loop, or an exception naming `what` that needs one.
future_core& current_task_core(const char* what);

}  // namespace detail
}  // namespace codestare::async_utils
// ---- end src/runtime/future_core.hpp ----
// ---- begin src/runtime/any_task.hpp ----
// any_task, the untyped task handle (what current_task() and all_tasks() return), and the
// exception_context given to the loop's exception handler.


namespace codestare::async_utils {

/// A handle to a task of any result type (asyncio.Task as seen by all_tasks()).
/// Copyable; use it on its loop's thread only.
class any_task {
 public:
  any_task() noexcept = default;
  explicit any_task(detail::future_core* core) noexcept : core_(core) {
    if (core_) core_->add_ref();
  }
  any_task(const any_task& other) noexcept : any_task(other.core_) {}
  any_task(any_task&& other) noexcept : core_(std::exchange(other.core_, nullptr)) {}
  any_task& operator=(any_task other) noexcept {
    std::swap(core_, other.core_);
    return *this;
  }
  ~any_task() {
    if (core_) core_->release();
  }

  explicit operator bool() const noexcept { return core_ != nullptr; }
  std::string name() const { return core().name(); }
  void set_name(std::string name) { core().set_name(std::move(name)); }
  bool done() const { return core().done(); }
  bool cancelled() const { return core().cancelled(); }
  /// Requests cancellation (asyncio's Task.cancel); false when the task is already done.
  bool cancel(std::string message = {}) { return core().cancel(std::move(message)); }
  /// asyncio's cancelling(): how many cancellation requests the task has received.
  unsigned cancelling() const { return core().cancel_requests(); }
  /// The exception the task ended with (null if it returned); throws while it is pending
  /// (invalid_state_error) or when it was cancelled (cancelled_error).
  std::exception_ptr exception() const { return core().exception(); }
  /// Runs fn(task) on the loop, via call_soon, once the task is done.
  callback_id add_done_callback(std::function<void(any_task)> fn) {
    return core().add_done_callback([fn = std::move(fn)](detail::future_core& c) { fn(any_task(&c)); });
  }
  std::size_t remove_done_callback(callback_id id) { return core().remove_done_callback(id); }

  friend bool operator==(const any_task& a, const any_task& b) noexcept { return a.core_ == b.core_; }
  friend std::ostream& operator<<(std::ostream& os, const any_task& t) {
    if (!t) return os << "<task none>";
    os << "<task " << t.name();
    if (t.cancelled()) os << " cancelled";
    else if (t.done()) os << " done";
    else os << " pending";
    return os << '>';
  }
  detail::future_core* core_ptr() const noexcept { return core_; }

 private:
  detail::future_core& core() const {
    if (!core_) throw invalid_state_error("empty task handle");
    return *core_;
  }
  detail::future_core* core_ = nullptr;
};

/// What the loop's exception handler receives (asyncio's context dict).
struct exception_context {
  std::string message;
  std::exception_ptr exception;
  std::optional<any_task> task;
  /// The sentinel task of the task_nursery whose child failed, if any.
  std::optional<any_task> sentinel;
};

/// A readable one-line description of an exception_ptr (the what() of std::exception).
inline std::string describe(const std::exception_ptr& error) {
  if (!error) return "no exception";
  try {
    std::rethrow_exception(error);
  } catch (const cancelled_error& e) {
    return std::string("cancelled_error: ") + e.what();
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown exception";
  }
}

}  // namespace codestare::async_utils
// ---- end src/runtime/any_task.hpp ----
// ---- begin src/runtime/handle.hpp ----
// handle: what call_soon, call_later and call_at return (asyncio's Handle and TimerHandle).


namespace codestare::async_utils {
namespace detail {

/// A scheduled callback. Shared by the loop (while queued or timed) and the user's handle, so
/// the count is atomic: call_soon_threadsafe hands handles to other threads.
struct handle_state : timer_node {
  explicit handle_state(event_loop* l, std::function<void()> f) : loop(l), fn(std::move(f)) {}
  void add_ref() noexcept { refs.fetch_add(1, std::memory_order_relaxed); }
  void release() noexcept {
    if (refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }
  /// A job that runs the callback unless cancelled, then drops the job's reference.
  static void run_job(void* self, bool run) noexcept;
  detail::job as_job() noexcept {
    add_ref();
    return {&run_job, this};
  }

  std::atomic<std::uint32_t> refs{1};
  std::atomic<bool> cancelled{false};
  /// A timer still in the loop's heap. Atomic, unlike the heap position: handle::cancel() reads
  /// it from any thread (and only then may touch the loop, which is alive while it holds).
  std::atomic<bool> in_heap{false};
  event_loop* loop;
  std::function<void()> fn;
};

}  // namespace detail

/// asyncio.Handle / TimerHandle: cancel() stops a callback that has not run yet.
class handle {
 public:
  handle() noexcept = default;
  explicit handle(detail::handle_state* state) noexcept : state_(state) {
    if (state_) state_->add_ref();
  }
  handle(const handle& other) noexcept : handle(other.state_) {}
  handle& operator=(handle other) noexcept {
    std::swap(state_, other.state_);
    return *this;
  }
  ~handle() {
    if (state_) state_->release();
  }
  /// Safe from any thread; a timer cancelled on its loop's thread leaves the timer heap at once.
  void cancel() noexcept;
  bool cancelled() const noexcept { return state_ && state_->cancelled.load(std::memory_order_acquire); }
  /// For timers: the loop time at which the callback is due.
  detail::clock::time_point when() const noexcept { return state_ ? state_->when : detail::clock::time_point{}; }
  explicit operator bool() const noexcept { return state_ != nullptr; }

 private:
  detail::handle_state* state_ = nullptr;
};

/// asyncio's name for the handle call_later / call_at return; the same type here.
using timer_handle = handle;

}  // namespace codestare::async_utils
// ---- end src/runtime/handle.hpp ----
// ---- begin src/runtime/event_loop.hpp ----
// event_loop: asyncio's loop. Ready jobs, timers, descriptors, cross-thread posts, the
// exception handler; one loop runs per thread at a time.


namespace codestare::async_utils {

template <class T>
class coroutine;
template <class T>
class task;
template <class T>
class future;

namespace detail {

/// A task waiting for readiness of a descriptor (wait_readable, sock_recv, ...). ready() gets
/// the reported bits and says whether the wait is over (it may do the I/O itself and keep
/// waiting after EAGAIN); it runs on the loop thread and only schedules.
struct io_waiter : list_node {
  bool (*ready)(io_waiter*, unsigned bits) noexcept = nullptr;
};

/// Everything the loop knows about one descriptor.
struct fd_watch {
  intrusive_list<io_waiter> readers, writers;
  handle_state* reader = nullptr;  // add_reader callback (persistent), owned reference
  handle_state* writer = nullptr;
  void (*internal)(void*) = nullptr;  // permanent watch of the loop's own parts (wake-up, signals)
  void* internal_context = nullptr;
  unsigned armed = 0;  // bits the backend is armed for
  bool known = false;  // added to the backend
  bool dirty = false;  // listed for re-arming before the next wait
  unsigned wanted() const noexcept {
    return ((reader || !readers.empty()) ? io_read : 0u) | ((writer || !writers.empty()) ? io_write : 0u);
  }
};

struct signal_registry;  // signals.hpp
struct executor_slot;    // executor.hpp
template <class T>
using erased_ptr = std::unique_ptr<T, void (*)(T*)>;

inline thread_local event_loop* running_loop = nullptr;

}  // namespace detail

/// asyncio's event loop. Create one per thread (or let run() do it); all methods but
/// call_soon_threadsafe (and handle::cancel) belong to the loop's thread.
class event_loop {
 public:
  using clock = detail::clock;
  using time_point = clock::time_point;
  using duration = clock::duration;
  using exception_handler = std::function<void(event_loop&, const exception_context&)>;

  event_loop();
  ~event_loop();
  event_loop(const event_loop&) = delete;
  event_loop& operator=(const event_loop&) = delete;

  /// The loop running on this thread; std::runtime_error("no running event loop") otherwise.
  static event_loop& current();

  /// Runs until `aw` (any awaitable, task or future) is done; returns its result or rethrows.
  template <class A>
  auto run_until_complete(A&& aw);
  /// Runs until stop() is called.
  void run_forever();
  /// Makes run_forever() return after the current iteration.
  void stop() noexcept { stopping_ = true; }
  bool is_running() const noexcept { return running_; }
  /// The loop's thread: the one running it, or else the one that ran or created it last.
  bool on_loop_thread() const noexcept {
    return detail::running_loop == this || (!running_ && owner_.load() == std::this_thread::get_id());
  }
  /// Cancels nothing: ends pending tasks (destroying their coroutines), drops queued callbacks,
  /// removes signal handlers, shuts the executor down. Throws if the loop is running.
  void close();
  bool is_closed() const noexcept { return closed_; }
  /// The loop's monotonic clock.
  time_point time() const noexcept { return clock::now(); }

  handle call_soon(std::function<void()> fn);
  /// The only method safe from any thread; wakes the loop if it sleeps.
  handle call_soon_threadsafe(std::function<void()> fn);
  handle call_later(duration delay, std::function<void()> fn);
  handle call_at(time_point when, std::function<void()> fn);

  /// Wraps `aw` in a task that starts on a later iteration (asyncio's create_task).
  template <class A>
  auto create_task(A&& aw, std::string name = {});
  template <class T = void>
  future<T> create_future();

  /// Calls fn on the loop each time fd is readable, until remove_reader(fd); replaces an
  /// earlier reader callback. Throws std::system_error for a bad descriptor.
  void add_reader(int fd, std::function<void()> fn);
  bool remove_reader(int fd);
  void add_writer(int fd, std::function<void()> fn);
  bool remove_writer(int fd);

  // Awaitable I/O on non-blocking descriptors (io.hpp; the same as the free functions there).
  auto sock_recv(int fd, std::size_t max_bytes);
  auto sock_recv_into(int fd, std::span<char> buffer);
  auto sock_sendall(int fd, std::string_view data);
  auto sock_accept(int fd);
  auto sock_connect(int fd, const sockaddr* address, socklen_t length);
  auto wait_readable(int fd);
  auto wait_writable(int fd);

  // Signals (signals.hpp): the callback runs on the loop thread, never in signal context.
  void add_signal_handler(int sig, std::function<void()> fn);
  bool remove_signal_handler(int sig);

  /// Waits for the default executor's jobs and joins its threads (executor.hpp).
  void shutdown_default_executor_now() { executor_.reset(); }

  void set_exception_handler(exception_handler handler) { handler_ = std::move(handler); }
  const exception_handler& get_exception_handler() const noexcept { return handler_; }
  /// Logs the context through the library logger.
  void default_exception_handler(const exception_context& context);
  /// Calls the handler set (or the default one); never throws.
  void call_exception_handler(const exception_context& context) noexcept;

  // ---- Internal interface for the library's own awaitables and primitives ----------------
  /// Queues a job for this or the next iteration (loop thread).
  void schedule(detail::job j) { ready_.push(j); }
  /// Queues a job from any thread and wakes the loop; false if the loop is closed.
  bool post(detail::job j);
  detail::future_core* running_task() const noexcept { return current_; }
  void add_timer(detail::timer_node& node, time_point when) {
    node.when = when;
    timers_.push(node);
  }
  void remove_timer(detail::timer_node& node) noexcept { timers_.remove(node); }
  /// Waits for readiness of fd; wake-ups go through waiter.ready.
  void add_io_waiter(int fd, unsigned bit, detail::io_waiter& waiter);
  /// Permanent read watch run synchronously on the loop thread (signal descriptors).
  void watch_internal(int fd, void (*fn)(void*), void* context);
  void unwatch_internal(int fd) noexcept;
  std::uint64_t next_task_number() noexcept { return ++task_counter_; }
  void register_core(detail::future_core& core) { (core.is_task() ? tasks_ : others_).push_back(core); }
  void retire_core(detail::future_core& core) { others_.push_back(core); }
  template <class F>
  void for_each_task(F&& fn) {
    tasks_.for_each(fn);
  }
  detail::erased_ptr<detail::signal_registry>& signal_slot() noexcept { return signals_; }
  detail::erased_ptr<detail::executor_slot>& executor_slot() noexcept { return executor_; }
  void check_open() const;

 private:
  friend class detail::future_core;
  void run_once();
  void take_posted();
  void rearm();
  void dispatch_io(int fd, unsigned bits) noexcept;
  detail::fd_watch& watch_of(int fd);
  void set_callback(int fd, bool reader, std::function<void()> fn);
  bool clear_callback(int fd, bool reader);
  void mark_dirty(int fd, detail::fd_watch& w);
  void forget_arming(detail::fd_watch& w) noexcept;

  detail::io_backend backend_;
  detail::wakeup_fd wakeup_;
  detail::job_queue ready_;
  detail::timer_heap timers_;
  std::vector<std::unique_ptr<detail::fd_watch>> fds_;  // indexed by descriptor
  std::vector<int> dirty_;
  std::size_t polled_ = 0;  // armed descriptors plus internal watches other than the wake-up

  std::mutex posted_mutex_;
  detail::job_queue posted_;
  std::atomic<bool> posted_pending_{false};
  std::atomic<bool> sleeping_{false};
  std::atomic<bool> accepting_posts_{true};

  detail::intrusive_list<detail::future_core> tasks_;   // pending tasks, for all_tasks()
  detail::intrusive_list<detail::future_core> others_;  // futures and finished tasks with handles
  detail::future_core* current_ = nullptr;
  std::uint64_t task_counter_ = 0;
  exception_handler handler_;
  detail::erased_ptr<detail::signal_registry> signals_{nullptr, nullptr};
  detail::erased_ptr<detail::executor_slot> executor_{nullptr, nullptr};
  std::atomic<bool> running_{false};
  std::atomic<std::thread::id> owner_{std::this_thread::get_id()};
  bool stopping_ = false;
  bool closed_ = false;
};

// ---- event_loop ------------------------------------------------------------------------------

inline event_loop::event_loop() {
  watch_internal(wakeup_.fd(), [](void* self) { static_cast<event_loop*>(self)->wakeup_.drain(); }, this);
  --polled_;  // cross-thread posts are seen through posted_pending_ without polling
}

inline event_loop::~event_loop() {
  // Destroying a running loop (from one of its own callbacks) cannot be made safe.
  if (running_) std::terminate();
  close();
}

inline event_loop& event_loop::current() {
  if (!detail::running_loop) throw std::runtime_error("no running event loop");
  return *detail::running_loop;
}

inline void event_loop::check_open() const {
  if (closed_) throw std::runtime_error("event loop is closed");
}

inline void event_loop::run_forever() {
  check_open();
  if (running_) throw std::runtime_error("this event loop is already running");
  if (detail::running_loop) throw std::runtime_error("another event loop is running on this thread");
  owner_ = std::this_thread::get_id();
  running_ = true;
  detail::running_loop = this;
  struct reset {
    event_loop& loop;
    ~reset() {
      loop.stopping_ = false;
      loop.running_ = false;
      detail::running_loop = nullptr;
    }
  } guard{*this};
  for (;;) {
    run_once();
    if (stopping_) break;
  }
}

// One iteration, as asyncio's _run_once: poll (without blocking when work is ready), move due
// timers to the ready queue, then run exactly the jobs that were ready at that point.
inline void event_loop::run_once() {
  take_posted();
  rearm();
  std::chrono::nanoseconds timeout{-1};
  if (!ready_.empty() || stopping_) {
    timeout = std::chrono::nanoseconds{0};
  } else if (!timers_.empty()) {
    timeout = std::max(std::chrono::nanoseconds{0}, timers_.top().when - clock::now());
  }
  // A busy loop with no descriptor to watch skips the syscall entirely.
  if (timeout.count() != 0 || polled_ > 0) {
    if (timeout.count() != 0) {
      sleeping_.store(true);
      if (posted_pending_.load()) timeout = std::chrono::nanoseconds{0};
    }
    backend_.wait(timeout, [this](int fd, unsigned bits) { dispatch_io(fd, bits); });
    sleeping_.store(false, std::memory_order_relaxed);
    take_posted();
  }
  if (!timers_.empty()) {
    const auto now = clock::now();
    while (!timers_.empty() && timers_.top().when <= now) {
      detail::timer_node& node = timers_.pop();
      node.fire(&node, true);
    }
  }
  for (std::size_t n = ready_.size(); n > 0; --n) {
    detail::job j = ready_.pop();
    j.fn(j.arg, true);
  }
}

inline void event_loop::take_posted() {
  if (!posted_pending_.load(std::memory_order_acquire)) return;
  std::lock_guard guard(posted_mutex_);
  posted_pending_.store(false, std::memory_order_relaxed);
  ready_.splice(posted_);
}

inline bool event_loop::post(detail::job j) {
  // All of it under the lock: once the job is queued the loop may run it, finish and be
  // destroyed, so nothing of the loop may be touched after the unlock (the wake-up used to be
  // sent after it). The loop takes posted jobs, and close() stops taking posts, under this lock.
  std::lock_guard guard(posted_mutex_);
  if (!accepting_posts_.load(std::memory_order_relaxed)) return false;
  posted_.push(j);
  const bool first = !posted_pending_.exchange(true);
  // Pairs with run_once: it sets sleeping_ then reads posted_pending_; we did the reverse.
  if (first && sleeping_.load()) wakeup_.notify();
  return true;
}

inline detail::fd_watch& event_loop::watch_of(int fd) {
  if (fd < 0) detail::throw_errno(EBADF, "bad file descriptor " + std::to_string(fd));
  auto u = static_cast<std::size_t>(fd);
  if (u >= fds_.size()) fds_.resize(u + 1);
  if (!fds_[u]) fds_[u] = std::make_unique<detail::fd_watch>();
  detail::fd_watch& w = *fds_[u];
  if (!w.known && !w.internal) {
    backend_.add(fd);
    w.known = true;
  }
  return w;
}

inline void event_loop::mark_dirty(int fd, detail::fd_watch& w) {
  if (!w.dirty) {
    w.dirty = true;
    dirty_.push_back(fd);
  }
}

inline void event_loop::add_io_waiter(int fd, unsigned bit, detail::io_waiter& waiter) {
  check_open();
  detail::fd_watch& w = watch_of(fd);
  auto& list = bit == detail::io_read ? w.readers : w.writers;
  const bool wanted_before = (w.wanted() & bit) != 0;
  list.push_back(waiter);
  // Armed for nobody (its last waiter was cancelled): the descriptor may have been closed since
  // and its number reused, and the kernel then forgot the arming. Arm it anew.
  if (!wanted_before) forget_arming(w);
  if (!(w.armed & bit)) mark_dirty(fd, w);
}

inline void event_loop::forget_arming(detail::fd_watch& w) noexcept {
  polled_ -= (w.armed != 0);
  w.armed = 0;
}

inline void event_loop::rearm() {
  // Arming is deferred to here, so a wait that begins and ends within one iteration costs nothing.
  std::vector<int> failed;
  for (std::size_t i = 0; i < dirty_.size(); ++i) {
    const int fd = dirty_[i];
    detail::fd_watch& w = *fds_[static_cast<std::size_t>(fd)];
    w.dirty = false;
    const unsigned want = w.wanted();
    if (want == w.armed) continue;
    try {
      backend_.arm(fd, want);
    } catch (const std::system_error&) {
      polled_ -= (w.armed != 0);
      w.armed = 0;
      failed.push_back(fd);
      continue;
    }
    polled_ += (want != 0);
    polled_ -= (w.armed != 0);
    w.armed = want;
  }
  dirty_.clear();
  // A descriptor closed under us: wake its waiters so they retry and see the error, and run its
  // callbacks. Only now: what still wants the descriptor marks it again for the next iteration
  // (dispatching inside the loop above re-listed it there, and a reader callback spun forever).
  for (int fd : failed) dispatch_io(fd, detail::io_error | detail::io_read | detail::io_write);
}

inline void event_loop::dispatch_io(int fd, unsigned bits) noexcept {
  detail::fd_watch& w = *fds_[static_cast<std::size_t>(fd)];
  if (w.internal) {
    w.internal(w.internal_context);
    return;
  }
  polled_ -= (w.armed != 0);
  w.armed = 0;  // a report disarms (one-shot)
  auto wake = [bits](detail::intrusive_list<detail::io_waiter>& list) {
    list.for_each([bits](detail::io_waiter& x) {
      if (x.ready(&x, bits)) x.unlink();
    });
  };
  if (bits & (detail::io_read | detail::io_error)) {
    wake(w.readers);
    if (w.reader) schedule(w.reader->as_job());
  }
  if (bits & (detail::io_write | detail::io_error)) {
    wake(w.writers);
    if (w.writer) schedule(w.writer->as_job());
  }
  if (w.wanted()) mark_dirty(fd, w);
}

inline void event_loop::watch_internal(int fd, void (*fn)(void*), void* context) {
  auto u = static_cast<std::size_t>(fd);
  if (u >= fds_.size()) fds_.resize(u + 1);
  if (!fds_[u]) fds_[u] = std::make_unique<detail::fd_watch>();
  backend_.watch(fd);
  fds_[u]->internal = fn;
  fds_[u]->internal_context = context;
  ++polled_;
}

inline void event_loop::unwatch_internal(int fd) noexcept {
  auto u = static_cast<std::size_t>(fd);
  if (u >= fds_.size() || !fds_[u] || !fds_[u]->internal) return;
  backend_.remove(fd);
  fds_[u].reset();
  --polled_;
}

inline void event_loop::set_callback(int fd, bool reader, std::function<void()> fn) {
  check_open();
  if (!fn) throw std::invalid_argument(reader ? "add_reader: empty callback" : "add_writer: empty callback");
  detail::fd_watch& w = watch_of(fd);
  backend_.add(fd);  // validates even a number seen before: it may have been closed since
  forget_arming(w);  // and if it was, the kernel forgot how it was armed
  detail::handle_state*& slot = reader ? w.reader : w.writer;
  auto* state = new detail::handle_state(this, std::move(fn));
  if (slot) {
    slot->cancelled = true;
    slot->release();
  }
  slot = state;
  mark_dirty(fd, w);
}

inline bool event_loop::clear_callback(int fd, bool reader) {
  auto u = static_cast<std::size_t>(fd);
  if (fd < 0 || u >= fds_.size() || !fds_[u]) return false;
  detail::fd_watch& w = *fds_[u];
  detail::handle_state*& slot = reader ? w.reader : w.writer;
  if (!slot) return false;
  slot->cancelled = true;
  slot->release();
  slot = nullptr;
  mark_dirty(fd, w);
  return true;
}

inline void event_loop::add_reader(int fd, std::function<void()> fn) { set_callback(fd, true, std::move(fn)); }
inline bool event_loop::remove_reader(int fd) { return clear_callback(fd, true); }
inline void event_loop::add_writer(int fd, std::function<void()> fn) { set_callback(fd, false, std::move(fn)); }
inline bool event_loop::remove_writer(int fd) { return clear_callback(fd, false); }

inline handle event_loop::call_soon(std::function<void()> fn) {
  check_open();
  if (!fn) throw std::invalid_argument("call_soon: empty callback");
  auto* state = new detail::handle_state(this, std::move(fn));
  handle h(state);
  schedule({&detail::handle_state::run_job, state});  // the job takes the creation reference
  return h;
}

inline handle event_loop::call_soon_threadsafe(std::function<void()> fn) {
  if (!fn) throw std::invalid_argument("call_soon_threadsafe: empty callback");
  auto* state = new detail::handle_state(this, std::move(fn));
  handle h(state);
  if (!post({&detail::handle_state::run_job, state})) {
    state->release();
    throw std::runtime_error("event loop is closed");
  }
  return h;
}

inline handle event_loop::call_later(duration delay, std::function<void()> fn) {
  return call_at(time() + delay, std::move(fn));
}

inline handle event_loop::call_at(time_point when, std::function<void()> fn) {
  check_open();
  if (!fn) throw std::invalid_argument("call_at: empty callback");
  auto* state = new detail::handle_state(this, std::move(fn));
  handle h(state);
  state->fire = [](detail::timer_node* node, bool run) {
    auto* s = static_cast<detail::handle_state*>(node);
    s->in_heap = false;
    if (run) s->loop->schedule({&detail::handle_state::run_job, s});  // heap's reference moves on
    else s->release();
  };
  state->in_heap = true;
  add_timer(*state, when);  // the heap takes the creation reference
  return h;
}

inline void handle::cancel() noexcept {
  if (!state_ || state_->cancelled.exchange(true)) return;
  // On the loop's own thread a timer leaves the heap now; elsewhere it is skipped when due.
  // (Another thread must not touch the heap, not even read a node's position in it, running
  // loop or not: it used to remove timers of a loop that was not running yet, racing with it.)
  if (!state_->in_heap.load()) return;
  event_loop* loop = state_->loop;
  if (loop->on_loop_thread()) {
    state_->in_heap = false;
    loop->remove_timer(*state_);
    state_->release();
  }
}

inline void detail::handle_state::run_job(void* self, bool run) noexcept {
  auto* state = static_cast<handle_state*>(self);
  if (run && !state->cancelled.load(std::memory_order_acquire)) {
    try {
      state->fn();
    } catch (...) {
      state->loop->call_exception_handler({"Exception in callback", std::current_exception(), {}, {}});
    }
  }
  state->release();
}

inline void event_loop::default_exception_handler(const exception_context& context) {
  std::string text = context.message.empty() ? "Unhandled exception in event loop" : context.message;
  if (context.task && *context.task) text += " (task " + context.task->name() + ")";
  if (context.exception) text += ": " + describe(context.exception);
  log(log_level::error, text);
}

inline void event_loop::call_exception_handler(const exception_context& context) noexcept {
  try {
    if (handler_) {
      handler_(*this, context);
      return;
    }
  } catch (...) {
    try {
      log(log_level::error, "Unhandled error in exception handler: " + describe(std::current_exception()));
    } catch (...) {
    }
  }
  try {
    default_exception_handler(context);
  } catch (...) {
  }
}

inline void event_loop::close() {
  if (running_) throw std::runtime_error("cannot close a running event loop");
  if (closed_) return;
  closed_ = true;
  // Pending tasks end cancelled; destroying their coroutines unlinks every wait they had.
  while (!tasks_.empty()) {
    detail::future_core& core = tasks_.front();
    log(log_level::warning, "Task was destroyed but it is pending: " + core.name());
    core.abandon();
  }
  signals_.reset();
  executor_.reset();  // joins its threads; their last posts are discarded below
  {
    std::lock_guard guard(posted_mutex_);
    accepting_posts_ = false;
    ready_.splice(posted_);
  }
  while (!ready_.empty()) {
    detail::job j = ready_.pop();
    j.fn(j.arg, false);
  }
  while (!timers_.empty()) {
    detail::timer_node& node = timers_.pop();
    node.fire(&node, false);
  }
  for (auto& w : fds_) {
    if (!w) continue;
    for (auto* slot : {&w->reader, &w->writer}) {
      if (*slot) {
        (*slot)->cancelled = true;
        (*slot)->release();
        *slot = nullptr;
      }
    }
  }
  fds_.clear();
  dirty_.clear();
  // Handles that outlive the loop must not reach back into it.
  while (detail::future_core* core = others_.pop_front()) core->loop_ = nullptr;
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("event_loop") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("call_soon runs FIFO on a later iteration; a cancelled handle never runs") {
    event_loop loop;
    std::string seen;
    loop.call_soon([&] { seen += "a"; });
    auto h = loop.call_soon([&] { seen += "x"; });
    loop.call_soon([&] {
      seen += "b";
      loop.call_soon([&] {  // next iteration, after c
        seen += "d";
        loop.stop();
      });
    });
    loop.call_soon([&] { seen += "c"; });
    h.cancel();
    CHECK(h.cancelled());
    CHECK(seen.empty());
    // Stopping from d, not from a 5 ms timer: under Valgrind the first iteration can take longer
    // than that, and the timer then stopped the loop before d ran (a flaky test).
    auto guard = loop.call_later(10s, [&] { loop.stop(); });
    loop.run_forever();
    CHECK(seen == "abcd");
    CHECK_THROWS_AS(loop.call_soon(nullptr), std::invalid_argument);
  }

  TEST_CASE("call_later and call_at fire in deadline order; cancelled timers leave the heap") {
    event_loop loop;
    std::vector<int> order;
    const auto now = loop.time();
    loop.call_at(now + 30ms, [&] { order.push_back(3); });
    loop.call_later(10ms, [&] { order.push_back(1); });
    auto h = loop.call_later(20ms, [&] { order.push_back(99); });
    loop.call_later(20ms, [&] { order.push_back(2); });
    loop.call_later(40ms, [&] { loop.stop(); });
    CHECK(h.when() >= now + 20ms);
    h.cancel();
    for (int i = 0; i < 100000; ++i) loop.call_later(1h, [] {}).cancel();  // no pile-up
    loop.run_forever();
    CHECK(order == std::vector<int>{1, 2, 3});
    CHECK(loop.time() >= now + 40ms);
  }

  TEST_CASE("stop() before run_forever runs one iteration; close() is final") {
    event_loop loop;
    int runs = 0;
    loop.call_soon([&] { ++runs; });
    loop.stop();
    loop.run_forever();
    CHECK(runs == 1);
    CHECK_FALSE(loop.is_running());
    loop.close();
    CHECK(loop.is_closed());
    loop.close();  // idempotent
    CHECK_THROWS_WITH_AS(loop.call_soon([] {}), "event loop is closed", std::runtime_error);
    CHECK_THROWS_AS(loop.run_forever(), std::runtime_error);
    CHECK_THROWS_AS(loop.call_soon_threadsafe([] {}), std::runtime_error);
  }

  TEST_CASE("an exception in a callback goes to the exception handler, the loop goes on") {
    event_loop loop;
    std::string seen;
    loop.set_exception_handler([&](event_loop&, const exception_context& c) { seen += c.message + ": " + describe(c.exception); });
    CHECK(static_cast<bool>(loop.get_exception_handler()));
    loop.call_soon([] { throw std::runtime_error("oops"); });
    loop.call_soon([&] { loop.stop(); });
    loop.run_forever();
    CHECK(seen == "Exception in callback: oops");
    testing::log_capture log;
    loop.set_exception_handler([](event_loop&, const exception_context&) { throw std::logic_error("handler broke"); });
    loop.call_exception_handler({"ctx", nullptr, std::nullopt, std::nullopt});
    CHECK(log.text().find("handler broke") != std::string::npos);
    CHECK(log.text().find("ctx") != std::string::npos);  // then the default handler
  }

  TEST_CASE("a reader on a descriptor closed before it was armed: its callback runs, the loop goes on") {
    // Regression: arming failed, the loop dispatched the error at once, the callback (still
    // registered) listed the descriptor for arming again in the same pass: rearm() never ended.
    event_loop loop;
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    int calls = 0;
    bool stopped = false;
    loop.add_reader(fds[0], [&] {
      if (++calls < 3) return;  // told again each iteration until removed
      loop.remove_reader(fds[0]);
      loop.call_soon([&] {  // and the loop goes on
        stopped = true;
        loop.stop();
      });
    });
    ::close(fds[0]);
    auto guard = loop.call_later(10s, [&] { loop.stop(); });
    loop.run_forever();
    CHECK(stopped);
    CHECK(calls == 3);
    ::close(fds[1]);
  }

  TEST_CASE("timer handles cancelled from another thread never run, and leave the heap to the loop") {
    // Regression: cancel() from another thread removed timers from the heap when the loop was
    // not running yet, and read heap positions while it ran: data races (TSan), heap corruption.
    event_loop loop;
    std::vector<handle> timers;
    int fired = 0, ticks = 0;
    for (int i = 0; i < 2000; ++i) timers.push_back(loop.call_later(1s + std::chrono::microseconds(i), [&] { ++fired; }));
    std::atomic<bool> done{false};
    std::thread canceller([&] {
      for (auto& h : timers) h.cancel();  // the loop may not even be running yet
      done = true;
      loop.call_soon_threadsafe([] {});
    });
    std::function<void()> tick = [&] {  // keeps the heap busy on the loop thread meanwhile
      ++ticks;
      if (done) loop.stop();
      else loop.call_later(std::chrono::microseconds(ticks % 7), tick);
    };
    loop.call_soon(tick);
    auto guard = loop.call_later(30s, [&] { loop.stop(); });
    loop.run_forever();
    canceller.join();
    for (auto& h : timers) CHECK(h.cancelled());
    loop.call_later(0s, [] {}).cancel();  // on the loop's (not running) thread: leaves at once
    CHECK(fired == 0);
    loop.close();
    CHECK(fired == 0);
    for (auto& h : timers) h.cancel();  // the loop is gone: still safe
  }

  TEST_CASE("a thread whose post lets the loop finish touches nothing of it afterwards") {
    // Regression: post() sent the wake-up after releasing its lock; by then the loop could have
    // run the job, stopped and been destroyed (a use after free). The window is small: this
    // repeats the pattern for the sanitizer builds to catch.
    for (int i = 0; i < 1000; ++i) {
      std::thread poster;
      {
        auto loop = std::make_unique<event_loop>();
        event_loop* l = loop.get();
        auto tick = l->call_later(std::chrono::microseconds(i % 3), [] {});  // wakes the loop too
        poster = std::thread([l] { l->call_soon_threadsafe([l] { l->stop(); }); });
        l->run_forever();
      }  // destroyed here, while the poster may still be inside call_soon_threadsafe
      poster.join();
    }
  }

  TEST_CASE("call_soon_threadsafe: 4 threads x 100,000 calls each run exactly once") {
    event_loop loop;
    constexpr int per_thread = 100000;
    std::vector<int> counts(4, 0);
    int total = 0;
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < per_thread; ++i) loop.call_soon_threadsafe([&, t] {
            ++counts[static_cast<std::size_t>(t)];
            if (++total == 4 * per_thread) loop.stop();
          });
      });
    }
    auto guard = loop.call_later(30s, [&] { loop.stop(); });  // bound: fail, never hang
    loop.run_forever();
    for (auto& th : threads) th.join();
    CHECK(total == 4 * per_thread);
    for (int c : counts) CHECK(c == per_thread);
  }

  TEST_CASE("add_reader / add_writer callbacks, removal, and bad descriptors") {
    event_loop loop;
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    int reads = 0;
    loop.add_reader(fds[0], [&] {
      char c;
      CHECK(::read(fds[0], &c, 1) == 1);
      if (++reads == 3) loop.stop();
    });
    loop.add_writer(fds[1], [&] {
      CHECK(::write(fds[1], "xyz", 3) == 3);
      CHECK(loop.remove_writer(fds[1]));
    });
    auto guard = loop.call_later(10s, [&] { loop.stop(); });
    loop.run_forever();
    CHECK(reads == 3);
    CHECK(loop.remove_reader(fds[0]));
    CHECK_FALSE(loop.remove_reader(fds[0]));
    CHECK_FALSE(loop.remove_writer(12345));
    ::close(fds[0]);
    ::close(fds[1]);
    CHECK_THROWS_AS(loop.add_reader(-1, [] {}), std::system_error);
    CHECK_THROWS_AS(loop.add_reader(fds[0], [] {}), std::system_error);  // closed now
    CHECK_THROWS_AS(loop.add_reader(0, nullptr), std::invalid_argument);
  }

}
#endif
// ---- end src/runtime/event_loop.hpp ----
// ---- begin src/runtime/task_steps.hpp ----
// How futures finish and tasks run: the loop-facing half of future_core (step, suspend, wake,
// cancel, finish), written after event_loop because it schedules on it.


namespace codestare::async_utils::detail {

inline future_core& current_task_core(const char* what) {
  event_loop* loop = running_loop;
  if (!loop || !loop->running_task())
    throw std::runtime_error(std::string(what) + " must be awaited inside a task of a running event loop");
  return *loop->running_task();
}

inline void future_core::release() noexcept {
  if (--refs_ != 0) return;
  if (status_ == future_status::finished && error_ && !retrieved_) {
    retrieved_ = true;
    refs_ = 1;  // a handle for the report; the handler may even keep it
    {
      exception_context context{is_task_ ? "Task exception was never retrieved" : "Future exception was never retrieved",
                                error_, std::nullopt, std::nullopt};
      if (is_task_) context.task = any_task(this);
      if (loop_) {
        loop_->call_exception_handler(context);
      } else {
        try {
          log(log_level::error, context.message + ": " + describe(error_));
        } catch (...) {
        }
      }
    }
    if (--refs_ != 0) return;
  }
  delete this;
}

inline void future_core::check_result() {
  switch (status_) {
    case future_status::pending: throw invalid_state_error("result is not set yet");
    case future_status::cancelled: retrieved_ = true; throw cancelled_error(cancel_message_);
    case future_status::finished:
      retrieved_ = true;
      if (error_) std::rethrow_exception(error_);
  }
}

inline std::exception_ptr future_core::exception() {
  if (status_ == future_status::pending) throw invalid_state_error("exception is not set yet");
  if (status_ == future_status::cancelled) throw cancelled_error(cancel_message_);
  retrieved_ = true;
  return error_;
}

inline void future_core::set_exception(std::exception_ptr error) {
  if (is_task_) throw std::logic_error("a task's outcome is set by its coroutine, not by set_exception");
  if (done()) throw invalid_state_error("future is already done");
  if (!error) throw std::invalid_argument("set_exception: null exception_ptr");
  error_ = std::move(error);
  finish(future_status::finished);
}

inline bool future_core::cancel(std::string message) {
  if (done()) return false;
  ++cancel_requests_;
  cancel_message_ = std::move(message);
  if (!is_task_) {
    finish(future_status::cancelled);
    return true;
  }
  // asyncio: withdraw the current wait if possible; it stays registered, since an awaited task
  // may swallow this cancellation and need another one later.
  if (waiting_on_ && waiting_on_->cancel(waiting_on_)) return true;
  must_cancel_ = true;
  return true;
}

/// A scheduled done callback: holds a reference to its future until it has run.
struct done_callback_job {
  future_core* core;
  std::function<void(future_core&)> fn;
};

inline callback_id future_core::add_done_callback(std::function<void(future_core&)> fn) {
  if (!fn) throw std::invalid_argument("add_done_callback: empty callback");
  callbacks_.push_back({++next_callback_id_, std::move(fn)});
  callback_id id = next_callback_id_;
  if (done()) finish(status_);  // schedules it, as asyncio does with call_soon
  return id;
}

inline std::size_t future_core::remove_done_callback(callback_id id) noexcept {
  std::size_t before = callbacks_.size();
  std::erase_if(callbacks_, [id](const done_callback& c) { return c.id == id; });
  return before - callbacks_.size();
}

inline void future_core::finish(future_status status) noexcept {
  const bool first = status_ == future_status::pending;
  status_ = status;
  if (first) {
    if (loop_) loop_->retire_core(*this);  // leaves the pending-task list
    while (completion_waiter* w = waiters_.pop_front()) w->notify(w);
  }
  if (callbacks_.empty()) return;
  std::vector<done_callback> callbacks;
  callbacks.swap(callbacks_);
  if (!loop_ || loop_->is_closed()) return;
  for (auto& c : callbacks) {
    add_ref();
    auto* job = new (std::nothrow) done_callback_job{this, std::move(c.fn)};
    if (!job) {
      release();
      continue;
    }
    loop_->schedule({[](void* arg, bool run) noexcept {
                       auto* j = static_cast<done_callback_job*>(arg);
                       if (run) {
                         try {
                           j->fn(*j->core);
                         } catch (...) {
                           if (j->core->loop_)
                             j->core->loop_->call_exception_handler(
                                 {"Exception in done callback", std::current_exception(), std::nullopt, std::nullopt});
                         }
                       }
                       j->core->release();
                       delete j;
                     },
                     job});
  }
}

inline std::string future_core::name() const {
  if (!name_.empty() || !is_task_) return name_;
  return "Task-" + std::to_string(number_);
}

inline void future_core::start(std::coroutine_handle<> top, std::string name) {
  number_ = loop_->next_task_number();
  name_ = std::move(name);
  resume_at_ = top;
  loop_->register_core(*this);
  scheduled_ = true;
  loop_->schedule({&run_step, this});  // never inline: the task starts on a later iteration
}

inline void future_core::suspend_on(cancel_hook* hook, std::coroutine_handle<> where) {
  resume_at_ = where;
  waiting_on_ = hook;
  // A cancel() that came while running reaches the new wait at once (asyncio's __step).
  if (must_cancel_ && hook && hook->cancel(hook)) must_cancel_ = false;
}

inline void future_core::wake() {
  waiting_on_ = nullptr;
  if (scheduled_) {
    // Two wake-ups for one suspension would resume a coroutine twice; refuse loudly.
    log(log_level::error, "internal error: task " + name() + " woken twice");
    return;
  }
  if (!loop_ || done()) return;
  scheduled_ = true;
  loop_->schedule({&run_step, this});
}

inline void future_core::throw_if_cancelled(bool withdrawn) {
  if (withdrawn || must_cancel_) {
    must_cancel_ = false;
    throw cancelled_error(cancel_message_);
  }
}

inline void future_core::run_step(void* self, bool run) noexcept {
  if (run) static_cast<future_core*>(self)->step();
}

inline void future_core::step() {
  scheduled_ = false;
  if (!started_) {
    started_ = true;
    if (must_cancel_) {  // cancelled before it started: the body never runs
      must_cancel_ = false;
      destroy_frame();
      finish(future_status::cancelled);
      release();
      return;
    }
  }
  future_core* previous = loop_->current_;
  loop_->current_ = this;
  resume_at_.resume();
  loop_->current_ = previous;
  if (frame_done()) complete();
}

inline void future_core::complete() noexcept {
  harvest();
  destroy_frame();
  future_status status = future_status::finished;
  if (error_) {
    try {
      std::rethrow_exception(error_);
    } catch (const cancelled_error& e) {
      status = future_status::cancelled;
      cancel_message_ = e.message();
      error_ = nullptr;
    } catch (...) {
    }
  } else if (must_cancel_) {
    status = future_status::cancelled;  // cancel() arrived right before the coroutine returned
  }
  must_cancel_ = false;
  finish(status);
  release();  // the running reference
}

inline void future_core::abandon() noexcept {
  waiting_on_ = nullptr;
  must_cancel_ = false;
  destroy_frame();
  finish(future_status::cancelled);
  release();
}

}  // namespace codestare::async_utils::detail
// ---- end src/runtime/task_steps.hpp ----
// ---- begin src/runtime/awaitable.hpp ----
// What counts as an awaitable, and what co_await on it yields (used by create_task and friends).


namespace codestare::async_utils::detail {

template <class A>
concept has_member_co_await = requires(A&& a) { std::forward<A>(a).operator co_await(); };
template <class A>
concept has_free_co_await = requires(A&& a) { operator co_await(std::forward<A>(a)); };
template <class A>
concept is_awaiter = requires(A& a, std::coroutine_handle<> h) {
  { a.await_ready() } -> std::convertible_to<bool>;
  a.await_suspend(h);
  a.await_resume();
};

/// The awaiter co_await would use for `a` (member or free operator co_await, or `a` itself).
template <class A>
decltype(auto) get_awaiter(A&& a) {
  if constexpr (has_member_co_await<A>) return std::forward<A>(a).operator co_await();
  else if constexpr (has_free_co_await<A>) return operator co_await(std::forward<A>(a));
  else return std::forward<A>(a);
}

}  // namespace codestare::async_utils::detail

namespace codestare::async_utils {

/// Anything `co_await` accepts in our coroutines.
template <class A>
concept awaitable = requires(A&& a) {
  { detail::get_awaiter(std::forward<A>(a)) };
} && detail::is_awaiter<std::remove_reference_t<decltype(detail::get_awaiter(std::declval<A>()))>>;

/// The type `co_await std::declval<A>()` yields.
template <class A>
using await_result_t = decltype(std::declval<std::remove_reference_t<decltype(detail::get_awaiter(std::declval<A>()))>&>().await_resume());

}  // namespace codestare::async_utils
// ---- end src/runtime/awaitable.hpp ----
// ---- begin src/runtime/future.hpp ----
// future<T>: asyncio.Future, a copyable handle to a result slot bound to a loop.


namespace codestare::async_utils {
namespace detail {

/// future_core plus the typed value. Tasks derive from it too, so a task is a future.
template <class T>
class future_state : public future_core {
 public:
  using future_core::future_core;
  template <class... Args>
  void set_value(Args&&... args) {
    if (is_task()) throw std::logic_error("a task's result is set by its coroutine, not by set_result");
    if (done()) throw invalid_state_error("future is already done");
    if constexpr (!std::is_void_v<T>) value_.emplace(std::forward<Args>(args)...);
    finish(future_status::finished);
  }
  /// result(): the value, or what check_result() throws.
  std::add_lvalue_reference_t<T> value() {
    check_result();
    if constexpr (!std::is_void_v<T>) return *value_;
  }

 protected:
  struct empty {};
  [[no_unique_address]] std::conditional_t<std::is_void_v<T>, empty, std::optional<std::conditional_t<std::is_void_v<T>, int, T>>> value_;
};

/// co_await on a future or task: waits on it from the running task. Cancelling the waiting task
/// cancels the awaited future (asyncio's propagation) unless `shielded`.
template <class T, bool Move, bool Shielded = false>
struct future_awaiter : completion_waiter, cancel_hook {
  future_state<T>* state;
  future_core* task = nullptr;
  bool withdrawn = false;

  explicit future_awaiter(future_state<T>* s) noexcept : state(s) {}
  bool await_ready() const noexcept { return state->done(); }
  void await_suspend(std::coroutine_handle<> h) {
    task = &current_task_core("co_await on a future");
    if (task == state) throw std::runtime_error("a task cannot await itself");
    notify = [](completion_waiter* w) { static_cast<future_awaiter*>(w)->task->wake(); };
    cancel = [](cancel_hook* c) {
      auto* self = static_cast<future_awaiter*>(c);
      if constexpr (Shielded) {
        // shield(): only the waiting task is cancelled, the awaited one runs on.
        self->completion_waiter::unlink();
        self->withdrawn = true;
        self->task->wake();
        return true;
      } else {
        return self->state->cancel(self->task->cancel_message());
      }
    };
    state->add_waiter(*this);
    task->suspend_on(this, h);
  }
  T await_resume() {
    completion_waiter::unlink();
    if (task) task->throw_if_cancelled(withdrawn);
    if constexpr (std::is_void_v<T>) state->value();
    else if constexpr (!std::is_copy_constructible_v<T>) return std::move(state->value());
    // An rvalue await may take the value only when no other handle can still read it.
    else if constexpr (Move) return state->use_count() == 1 ? T(std::move(state->value())) : T(state->value());
    else return state->value();
  }
};

}  // namespace detail

/// asyncio.Future. Copies share one slot. Use on the loop's thread (call_soon_threadsafe to
/// reach it from another). Done callbacks run via call_soon, never inline.
template <class T = void>
class future {
 public:
  using value_type = T;
  using state_type = detail::future_state<T>;

  future() noexcept = default;
  explicit future(state_type* state, bool adopt = false) noexcept : state_(state) {
    if (state_ && !adopt) state_->add_ref();
  }
  future(const future& other) noexcept : future(other.state_) {}
  future(future&& other) noexcept : state_(std::exchange(other.state_, nullptr)) {}
  future& operator=(future other) noexcept {
    std::swap(state_, other.state_);
    return *this;
  }
  ~future() {
    if (state_) state_->release();
  }

  explicit operator bool() const noexcept { return state_ != nullptr; }
  bool done() const { return state().done(); }
  bool cancelled() const { return state().cancelled(); }
  /// The value; throws invalid_state_error while pending, cancelled_error if cancelled, or the
  /// stored exception.
  decltype(auto) result() const { return state().value(); }
  std::exception_ptr exception() const { return state().exception(); }
  template <class... Args>
  void set_result(Args&&... args) {
    state().set_value(std::forward<Args>(args)...);
  }
  void set_exception(std::exception_ptr error) { state().set_exception(std::move(error)); }
  bool cancel(std::string message = {}) { return state().cancel(std::move(message)); }
  /// fn(future) runs on the loop via call_soon once this is done (at once if it already is).
  callback_id add_done_callback(std::function<void(future)> fn) {
    if (!fn) throw std::invalid_argument("add_done_callback: empty callback");
    return state().add_done_callback([fn = std::move(fn)](detail::future_core& c) { fn(future(static_cast<state_type*>(&c))); });
  }
  std::size_t remove_done_callback(callback_id id) { return state().remove_done_callback(id); }
  event_loop& get_loop() const {
    if (!state().loop()) throw std::runtime_error("event loop is closed");
    return *state().loop();
  }

  auto operator co_await() const& noexcept { return detail::future_awaiter<T, false>(state_ptr()); }
  auto operator co_await() && noexcept { return detail::future_awaiter<T, true>(state_ptr()); }

  state_type* state_ptr() const {
    if (!state_) throw invalid_state_error("empty future handle");
    return state_;
  }

 private:
  state_type& state() const { return *state_ptr(); }
  state_type* state_ = nullptr;
};

template <class T>
future<T> event_loop::create_future() {
  check_open();
  auto* state = new detail::future_state<T>(this, false);
  register_core(*state);
  return future<T>(state, true);
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("future") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("futures: results, exceptions, cancellation, misuse") {
    event_loop loop;
    auto f = loop.create_future<std::string>();
    CHECK_FALSE(f.done());
    CHECK_THROWS_AS(f.result(), invalid_state_error);
    CHECK_THROWS_AS(f.exception(), invalid_state_error);
    f.set_result("v");
    CHECK(f.result() == "v");
    CHECK(f.exception() == nullptr);
    CHECK_THROWS_AS(f.set_result("again"), invalid_state_error);
    CHECK_FALSE(f.cancel());
    auto g = loop.create_future<int>();
    CHECK_THROWS_AS(g.set_exception(nullptr), std::invalid_argument);
    g.set_exception(std::make_exception_ptr(std::out_of_range("r")));
    CHECK_THROWS_AS(g.result(), std::out_of_range);
    auto h = loop.create_future<void>();
    CHECK(h.cancel("why"));
    CHECK(h.cancelled());
    CHECK_THROWS_WITH_AS(h.result(), "why", cancelled_error);
    future<int> empty;
    CHECK_THROWS_AS(empty.done(), invalid_state_error);
    CHECK(&f.get_loop() == &loop);
  }
  TEST_CASE("a loop blocked with nothing to do wakes for a post from another thread") {
    event_loop loop;
    auto fut = loop.create_future<int>();
    std::thread poster([&] {
      std::this_thread::sleep_for(20ms);
      loop.call_soon_threadsafe([&] { fut.set_result(9); });
    });
    auto guard = loop.call_later(30s, [&] { fut.cancel("not woken"); });
    fut.add_done_callback([&](future<int>) { loop.stop(); });
    loop.run_forever();
    CHECK(fut.result() == 9);
    poster.join();
  }

}
#endif
// ---- end src/runtime/future.hpp ----
// ---- begin src/runtime/coroutine.hpp ----
// coroutine<T>: what an `async def` returns. Lazy, move-only, awaited once or run by a task.


namespace codestare::async_utils {
namespace detail {

/// Shared by every coroutine promise. Awaiting a child starts it inline and, if it finishes
/// without suspending, continues the parent by returning from await_suspend: no new stack frame
/// per await, so a million ready awaits in a loop cannot overflow the stack even where the
/// compiler does not turn symmetric transfer into a tail call (g++ at -O0 or with sanitizers).
struct promise_base {
  std::coroutine_handle<> continuation;
  bool started_inline = false;  // the parent's await_suspend is still on the stack below us
  std::exception_ptr error;

  std::suspend_always initial_suspend() noexcept { return {}; }
  struct final_awaiter {
    bool await_ready() const noexcept { return false; }
    template <class P>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<P> h) const noexcept {
      promise_base& p = h.promise();
      if (p.started_inline || !p.continuation) return std::noop_coroutine();
      return p.continuation;
    }
    void await_resume() const noexcept {}
  };
  final_awaiter final_suspend() const noexcept { return {}; }
  void unhandled_exception() noexcept { error = std::current_exception(); }
};

template <class T>
struct promise_value : promise_base {
  std::optional<T> value;
  template <class U = T>
    requires std::is_convertible_v<U&&, T>
  void return_value(U&& v) {
    value.emplace(std::forward<U>(v));
  }
  T take() {
    if (error) std::rethrow_exception(error);
    return std::move(*value);
  }
};
template <>
struct promise_value<void> : promise_base {
  void return_void() const noexcept {}
  void take() const {
    if (error) std::rethrow_exception(error);
  }
};

}  // namespace detail

/// asyncio's coroutine object. Starts when awaited or given to create_task; `co_await` yields
/// its T or rethrows. Awaiting it a second time throws invalid_state_error. Destroying an
/// unstarted one frees its frame.
template <class T = void>
class [[nodiscard]] coroutine {
  static_assert(!std::is_reference_v<T>, "coroutine<T&> is not supported: return a pointer or std::reference_wrapper");

 public:
  using value_type = T;
  struct promise_type : detail::promise_value<T> {
    coroutine get_return_object() noexcept { return coroutine(std::coroutine_handle<promise_type>::from_promise(*this)); }
  };
  using handle_type = std::coroutine_handle<promise_type>;

  coroutine() noexcept = default;
  explicit coroutine(handle_type h) noexcept : handle_(h) {}
  coroutine(coroutine&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
  coroutine& operator=(coroutine&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, {});
    }
    return *this;
  }
  ~coroutine() { reset(); }

  /// False once awaited, handed to a task, or moved from.
  bool valid() const noexcept { return static_cast<bool>(handle_); }
  /// True when it ran to its end (an unstarted or consumed coroutine is not done).
  bool done() const noexcept { return handle_ && handle_.done(); }
  /// Destroys the frame, started or not (Python's coroutine.close()).
  void reset() noexcept {
    if (handle_) std::exchange(handle_, {}).destroy();
  }
  /// Hands the frame over (to a task); the coroutine becomes invalid.
  handle_type release() noexcept { return std::exchange(handle_, {}); }

  struct awaiter {
    handle_type h;
    bool await_ready() const noexcept { return !h; }
    bool await_suspend(std::coroutine_handle<> parent) {
      auto& p = h.promise();
      p.continuation = parent;
      p.started_inline = true;
      h.resume();
      p.started_inline = false;
      return !h.done();  // finished already: continue the parent right here
    }
    T await_resume() {
      if (!h) throw invalid_state_error("coroutine was already awaited or scheduled");
      return h.promise().take();
    }
    ~awaiter() {
      if (h) h.destroy();
    }
  };
  awaiter operator co_await() && noexcept { return awaiter{release()}; }
  awaiter operator co_await() & noexcept { return awaiter{release()}; }

 private:
  handle_type handle_;
};

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("coroutine") {
  using namespace codestare::async_utils;

  TEST_CASE("a million sequential awaits of ready coroutines do not grow the stack") {
    auto one = []() -> coroutine<int> { co_return 1; };
    auto many = [&]() -> coroutine<long> {
      long sum = 0;
      for (int i = 0; i < 1000000; ++i) sum += co_await one();
      co_return sum;
    };
    testing::run_bounded([&]() -> coroutine<void> { CHECK(co_await many() == 1000000); }(), std::chrono::seconds(60));
  }

  TEST_CASE("results, exceptions, and awaiting a consumed coroutine") {
    auto value = []() -> coroutine<std::string> { co_return "x"; };
    auto fails = []() -> coroutine<int> {
      throw std::invalid_argument("bad");
      co_return 0;
    };
    auto body = [&]() -> coroutine<void> {
      CHECK(co_await value() == "x");
      CHECK_THROWS_AS(co_await fails(), std::invalid_argument);
      auto c = value();
      CHECK(c.valid());
      CHECK(co_await c == "x");
      CHECK_FALSE(c.valid());
      CHECK_THROWS_AS(co_await c, invalid_state_error);
    };
    testing::run_bounded(body());
  }

  TEST_CASE("destroying an unstarted coroutine frees its frame and arguments") {
    static int alive = 0;
    struct tracked {
      tracked() { ++alive; }
      tracked(const tracked&) { ++alive; }
      ~tracked() { --alive; }
    };
    auto make = [](tracked) -> coroutine<void> { co_return; };
    {
      auto c = make(tracked{});
      CHECK(alive == 1);  // the frame's copy of the argument
      CHECK_FALSE(c.done());
    }
    CHECK(alive == 0);
    auto c = make(tracked{});
    c.reset();
    CHECK(alive == 0);
    CHECK_FALSE(c.valid());
  }
}
#endif
// ---- end src/runtime/coroutine.hpp ----
// ---- begin src/runtime/sleep.hpp ----
// sleep(duration): asyncio.sleep. sleep(0s) yields to the loop once without a timer.


namespace codestare::async_utils {
namespace detail {

struct sleep_awaiter : cancel_hook, timer_node {
  clock::duration delay;
  future_core* task = nullptr;
  bool withdrawn = false;

  explicit sleep_awaiter(clock::duration d) noexcept : delay(d) {}
  sleep_awaiter(const sleep_awaiter&) = delete;
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) {
    task = &current_task_core("sleep()");
    if (delay <= clock::duration::zero()) {  // a bare yield: nothing to withdraw
      task->suspend_on(nullptr, h);
      task->wake();
      return;
    }
    fire = [](timer_node* node, bool run) {
      if (run) static_cast<sleep_awaiter*>(node)->task->wake();
    };
    cancel = [](cancel_hook* c) {
      auto* self = static_cast<sleep_awaiter*>(c);
      self->task->loop()->remove_timer(*self);
      self->withdrawn = true;
      self->task->wake();
      return true;
    };
    task->loop()->add_timer(*this, clock::now() + delay);
    task->suspend_on(this, h);
  }
  void await_resume() { task->throw_if_cancelled(withdrawn); }
  ~sleep_awaiter() {
    if (scheduled() && task && task->loop()) task->loop()->remove_timer(*this);
  }
};

/// What sleep() returns: a movable value; the awaiter (holding the timer) lives in the frame.
struct sleep_for {
  clock::duration delay;
  sleep_awaiter operator co_await() const noexcept { return sleep_awaiter(delay); }
};

}  // namespace detail

/// Suspends the running task for `delay` (asyncio.sleep); cancellable.
template <class Rep, class Period>
detail::sleep_for sleep(std::chrono::duration<Rep, Period> delay) {
  return {std::chrono::duration_cast<detail::clock::duration>(delay)};
}

}  // namespace codestare::async_utils
// ---- end src/runtime/sleep.hpp ----
// ---- begin src/runtime/completion.hpp ----
// wait_done(fut): waits until a future or task is done, without touching its outcome; and the
// completion awaiter behind it, wait_for and run().

namespace codestare::async_utils {
namespace detail {

/// Waits until `core` is done, with an optional deadline. Cancelling the waiting task cancels
/// the awaited one (unless shielded); the deadline does the same and records that it expired.
struct completion_awaiter : completion_waiter, cancel_hook, timer_node {
  future_core* core;
  future_core* task = nullptr;
  bool propagate_cancel;
  bool has_deadline = false;
  bool expired = false;
  bool withdrawn = false;
  clock::duration timeout{};

  completion_awaiter(future_core* c, bool propagate) noexcept : core(c), propagate_cancel(propagate) {}
  completion_awaiter(const completion_awaiter&) = delete;
  bool await_ready() const noexcept { return core->done(); }
  void await_suspend(std::coroutine_handle<> h) {
    task = &current_task_core("waiting on a task");
    if (task == core) throw std::runtime_error("a task cannot await itself");
    notify = [](completion_waiter* w) { static_cast<completion_awaiter*>(w)->task->wake(); };
    cancel = [](cancel_hook* c) {
      auto* self = static_cast<completion_awaiter*>(c);
      if (self->propagate_cancel) return self->core->cancel(self->task->cancel_message());
      self->completion_waiter::unlink();
      self->withdrawn = true;
      self->task->wake();
      return true;
    };
    if (has_deadline) {
      fire = [](timer_node* node, bool run) {
        auto* self = static_cast<completion_awaiter*>(node);
        if (!run) return;
        self->expired = true;
        self->core->cancel({});  // its completion wakes us, once the cancellation has landed
      };
      task->loop()->add_timer(*this, clock::now() + timeout);
    }
    core->add_waiter(*this);
    task->suspend_on(this, h);
  }
  void await_resume() {
    completion_waiter::unlink();
    if (scheduled()) task->loop()->remove_timer(*this);
    if (task) task->throw_if_cancelled(withdrawn);
  }
  ~completion_awaiter() {
    if (scheduled() && task && task->loop()) task->loop()->remove_timer(*this);
  }
};

struct done_waiter {
  future_core* core;
  auto operator co_await() const noexcept { return completion_awaiter(core, false); }
};

}  // namespace detail

/// Waits until a task or future is done, whatever its outcome, without retrieving it and
/// without cancelling it when the waiter is cancelled.
inline detail::done_waiter wait_done(const any_task& t) { return {t.core_ptr()}; }
template <class T>
detail::done_waiter wait_done(const future<T>& f) {
  return {f.state_ptr()};
}

}  // namespace codestare::async_utils
// ---- end src/runtime/completion.hpp ----
// ---- begin src/runtime/task.hpp ----
// task<T>: asyncio.Task, a future driving a coroutine; create_task, current_task, all_tasks.


namespace codestare::async_utils {
namespace detail {

/// A task's state: the future part plus the coroutine it drives (freed as soon as it ends).
template <class T>
class task_state final : public future_state<T> {
 public:
  task_state(event_loop* loop, typename coroutine<T>::handle_type frame, std::string name)
      : future_state<T>(loop, true), frame_(frame) {
    this->start(frame, std::move(name));
  }
  ~task_state() override { destroy_frame(); }

 protected:
  void harvest() noexcept override {
    auto& p = frame_.promise();
    if (p.error) {
      this->error_ = p.error;
      return;
    }
    if constexpr (!std::is_void_v<T>) {
      try {
        this->value_.emplace(std::move(*p.value));
      } catch (...) {
        this->error_ = std::current_exception();
      }
    }
  }
  void destroy_frame() noexcept override {
    if (frame_) std::exchange(frame_, {}).destroy();
  }
  bool frame_done() const noexcept override { return !frame_ || frame_.done(); }

 private:
  typename coroutine<T>::handle_type frame_;
};

template <class R, class A>
coroutine<R> await_in_coroutine(A aw) {
  if constexpr (std::is_void_v<R>) co_await std::move(aw);
  else co_return co_await std::move(aw);
}

template <class A>
struct is_coroutine : std::false_type {};
template <class T>
struct is_coroutine<coroutine<T>> : std::true_type {};

/// A coroutine<R> that runs `aw`: the coroutine itself, or one that awaits any other awaitable
/// (an lvalue is awaited by reference, so a coroutine_wrapper stays with its creator).
template <class A>
auto as_coroutine(A&& aw) {
  using R = await_result_t<A>;
  if constexpr (is_coroutine<std::remove_cvref_t<A>>::value && std::is_rvalue_reference_v<A&&>) return std::move(aw);
  else return await_in_coroutine<R, A>(std::forward<A>(aw));
}

/// Result of a finished future for a single consumer: moved out when nobody else can read it.
template <class T>
T take_result(future_state<T>& state) {
  if constexpr (std::is_void_v<T>) state.value();
  else if constexpr (!std::is_copy_constructible_v<T>) return std::move(state.value());
  else return state.use_count() == 1 ? T(std::move(state.value())) : T(state.value());
}

}  // namespace detail

/// asyncio.Task: a future<T> whose result is set by the coroutine it drives. Copyable handle;
/// the task keeps running when every handle is gone. Loop thread only.
template <class T = void>
class task : public future<T> {
 public:
  using future<T>::future;
  task(const future<T>&) = delete;  // a plain future is not a task

  std::string name() const { return this->state_ptr()->name(); }
  void set_name(std::string name) { this->state_ptr()->set_name(std::move(name)); }
  /// asyncio's cancelling(): how many cancel() calls the task has received.
  unsigned cancelling() const { return this->state_ptr()->cancel_requests(); }
  /// Only the coroutine sets a task's outcome (asyncio raises RuntimeError for these).
  template <class... Args>
  void set_result(Args&&...) = delete;
  void set_exception(std::exception_ptr) = delete;
  operator any_task() const { return any_task(this->state_ptr()); }
};

template <class A>
auto event_loop::create_task(A&& aw, std::string name) {
  static_assert(awaitable<A>, "create_task needs a coroutine or another awaitable");
  check_open();
  using R = await_result_t<A>;
  coroutine<R> coro = detail::as_coroutine(std::forward<A>(aw));
  if (!coro.valid()) throw invalid_state_error("coroutine was already awaited or scheduled");
  auto* state = new detail::task_state<R>(this, coro.release(), std::move(name));
  return task<R>(state);  // the new state's own reference is the "running" one
}

namespace detail {
template <class A>
struct is_future_handle : std::false_type {};
template <class T>
struct is_future_handle<future<T>> : std::true_type {};
template <class T>
struct is_future_handle<task<T>> : std::true_type {};
}  // namespace detail

template <class A>
auto event_loop::run_until_complete(A&& aw) {
  auto fut = [&] {
    if constexpr (detail::is_future_handle<std::remove_cvref_t<A>>::value) return aw;
    else return create_task(std::forward<A>(aw));
  }();
  auto* state = fut.state_ptr();
  struct stopper : detail::completion_waiter {
    event_loop* loop;
  } waiter;
  waiter.loop = this;
  waiter.notify = [](detail::completion_waiter* w) { static_cast<stopper*>(w)->loop->stop(); };
  if (!state->done()) {
    state->add_waiter(waiter);
    run_forever();
  }
  if (!state->done()) throw std::runtime_error("event loop stopped before the future completed");
  return detail::take_result(*state);
}

/// Schedules `aw` on the running loop (asyncio.create_task).
template <class A>
auto create_task(A&& aw, std::string name = {}) {
  return event_loop::current().create_task(std::forward<A>(aw), std::move(name));
}

/// The task running now, if any (asyncio.current_task).
inline std::optional<any_task> current_task() {
  event_loop* loop = detail::running_loop;
  if (!loop || !loop->running_task()) return std::nullopt;
  return any_task(loop->running_task());
}

/// The running loop's tasks that are not done yet (asyncio.all_tasks).
inline std::vector<any_task> all_tasks() {
  std::vector<any_task> tasks;
  event_loop::current().for_each_task([&](detail::future_core& core) { tasks.emplace_back(&core); });
  return tasks;
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("task") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("tasks start on a later iteration, never inline, in creation order") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<int> order;
      auto note = [&](int i) -> coroutine<void> {
        order.push_back(i);
        co_return;
      };
      auto a = create_task(note(1));
      auto b = create_task(note(2));
      CHECK(order.empty());
      CHECK_FALSE(a.done());
      co_await sleep(0s);
      CHECK(order == std::vector<int>{1, 2});
      CHECK(a.done());
      CHECK(b.done());
    }());
  }

  TEST_CASE("result, exception and names") {
    testing::run_bounded([]() -> coroutine<void> {
      auto value = []() -> coroutine<int> { co_return 7; };
      auto fails = []() -> coroutine<int> {
        co_await sleep(0s);
        throw std::logic_error("no");
      };
      auto t = create_task(value(), "worker");
      CHECK(t.name() == "worker");
      CHECK_THROWS_AS(t.result(), invalid_state_error);
      CHECK(co_await t == 7);
      CHECK(t.result() == 7);
      auto f = create_task(fails());
      CHECK(f.name().rfind("Task-", 0) == 0);
      f.set_name("renamed");
      CHECK(f.name() == "renamed");
      CHECK_THROWS_AS(co_await f, std::logic_error);
      CHECK(f.exception() != nullptr);
      CHECK_FALSE(f.cancel());  // done already
    }());
  }

  TEST_CASE("cancel while sleeping; the message reaches cancelled_error") {
    testing::run_bounded([]() -> coroutine<void> {
      auto sleeper = []() -> coroutine<void> { co_await sleep(1h); };
      auto t = create_task(sleeper());
      co_await sleep(0s);
      CHECK(t.cancel("enough"));
      CHECK(t.cancelling() == 1);
      try {
        co_await t;
        FAIL("no exception");
      } catch (const cancelled_error& e) {
        CHECK(e.message() == "enough");
      }
      CHECK(t.cancelled());
      CHECK_THROWS_AS(t.result(), cancelled_error);
      CHECK_THROWS_AS(t.exception(), cancelled_error);
    }());
  }

  TEST_CASE("cancel before start: the body never runs") {
    testing::run_bounded([]() -> coroutine<void> {
      bool ran = false;
      auto body = [&]() -> coroutine<void> {
        ran = true;
        co_return;
      };
      auto t = create_task(body());
      CHECK(t.cancel());
      co_await wait_done(t);
      CHECK(t.cancelled());
      CHECK_FALSE(ran);
    }());
  }

  TEST_CASE("cancelling twice, and a coroutine that catches cancelled_error and returns") {
    testing::run_bounded([]() -> coroutine<void> {
      auto stubborn = []() -> coroutine<int> {
        try {
          co_await sleep(1h);
        } catch (const cancelled_error&) {
          co_return 5;
        }
        co_return 0;
      };
      auto t = create_task(stubborn());
      co_await sleep(0s);
      CHECK(t.cancel());
      CHECK(t.cancel());  // still pending: accepted, delivered as the same single cancellation
      CHECK(t.cancelling() == 2);
      CHECK(co_await t == 5);
      CHECK_FALSE(t.cancelled());
    }());
  }

  TEST_CASE("cancel while waiting on a future, and on another task (propagates)") {
    testing::run_bounded([]() -> coroutine<void> {
      auto fut = event_loop::current().create_future<int>();
      auto waiter = [](future<int> f) -> coroutine<int> { co_return co_await f; };
      auto t = create_task(waiter(fut));
      co_await sleep(0s);
      t.cancel();
      co_await wait_done(t);
      CHECK(t.cancelled());
      CHECK(fut.cancelled());  // asyncio: cancelling the awaiting task cancels what it awaits

      auto inner = create_task([]() -> coroutine<void> { co_await sleep(1h); }());
      auto outer = create_task([](task<void> i) -> coroutine<void> { co_await i; }(inner));
      co_await sleep(0s);
      outer.cancel();
      co_await wait_done(outer);
      CHECK(outer.cancelled());
      CHECK(inner.cancelled());
    }());
  }

  TEST_CASE("a task cannot await itself; current_task and all_tasks") {
    testing::run_bounded([]() -> coroutine<void> {
      auto me = current_task();
      REQUIRE(me);
      CHECK_FALSE(me->done());
      auto t = create_task([]() -> coroutine<void> { co_await sleep(1h); }(), "sleeper");
      bool found = false;
      for (auto& x : all_tasks()) found = found || x.name() == "sleeper";
      CHECK(found);
      t.cancel();
      co_await wait_done(t);
      for (auto& x : all_tasks()) CHECK(x.name() != "sleeper");
    }());
    CHECK_FALSE(current_task());
    CHECK_THROWS_AS(all_tasks(), std::runtime_error);
    CHECK_THROWS_WITH_AS(event_loop::current(), "no running event loop", std::runtime_error);
  }

  TEST_CASE("an exception nobody retrieved is reported when the last handle goes") {
    std::vector<std::string> reports;
    event_loop loop;
    loop.set_exception_handler([&](event_loop&, const exception_context& c) {
      reports.push_back(c.message + " / " + (c.task ? c.task->name() : "") + " / " + describe(c.exception));
    });
    {
      auto t = loop.create_task([]() -> coroutine<void> {
        throw std::runtime_error("lost");
        co_return;
      }(), "careless");
      loop.run_until_complete(sleep(1ms));
      CHECK(t.done());
      CHECK(reports.empty());  // a handle is still alive
    }
    REQUIRE(reports.size() == 1);
    CHECK(reports[0] == "Task exception was never retrieved / careless / lost");
    {
      auto t = loop.create_task([]() -> coroutine<void> {
        throw std::runtime_error("seen");
        co_return;
      }());
      loop.run_until_complete(sleep(1ms));
      CHECK_THROWS_AS(t.result(), std::runtime_error);
    }
    CHECK(reports.size() == 1);  // retrieved: not reported
  }

  TEST_CASE("done callbacks run via call_soon, never inline, and can be removed") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> seen;
      auto t = create_task([]() -> coroutine<int> { co_return 3; }());
      t.add_done_callback([&](future<int> f) { seen.push_back("a" + std::to_string(f.result())); });
      auto id = t.add_done_callback([&](future<int>) { seen.push_back("b"); });
      CHECK(t.remove_done_callback(id) == 1);
      CHECK(t.remove_done_callback(id) == 0);
      co_await wait_done(t);
      CHECK(seen.empty());  // scheduled, not yet run
      co_await sleep(0s);
      CHECK(seen == std::vector<std::string>{"a3"});
      any_task(t).add_done_callback([&](any_task x) { seen.push_back(x.name()); });  // done already
      CHECK(seen.size() == 1);
      co_await sleep(0s);
      CHECK(seen.size() == 2);
    }());
  }

  TEST_CASE("closing a loop with a pending task ends it cancelled and frees its coroutine") {
    static int alive = 0;
    struct guard {
      guard() { ++alive; }
      ~guard() { --alive; }
    };
    testing::log_capture log;
    task<void> t;
    {
      event_loop loop;
      t = loop.create_task([]() -> coroutine<void> {
        guard g;
        co_await sleep(1h);
      }());
      loop.run_until_complete(sleep(1ms));
      CHECK(alive == 1);
      loop.close();
      CHECK(alive == 0);
    }
    CHECK(t.cancelled());  // the handle outlives the loop safely
    CHECK(log.text().find("pending") != std::string::npos);
  }
}
#endif
// ---- end src/runtime/task.hpp ----
// ---- begin src/runtime/wait_for.hpp ----
// wait_for(aw, timeout): asyncio.wait_for. On timeout the inner task is cancelled, awaited, and
// timeout_error is thrown.


namespace codestare::async_utils {
namespace detail {

/// A future<R> for any awaitable: futures and tasks as they are, anything else in a new task.
template <class A>
auto ensure_future(A&& aw) {
  if constexpr (is_future_handle<std::remove_cvref_t<A>>::value) return future<typename std::remove_cvref_t<A>::value_type>(aw);
  else return future<await_result_t<A>>(event_loop::current().create_task(std::forward<A>(aw)));
}

template <class R, class A>
coroutine<R> wait_for_impl(A aw, clock::duration timeout) {
  auto fut = ensure_future(std::forward<A>(aw));
  auto* state = fut.state_ptr();
  if (!state->done()) {
    completion_awaiter waiting(state, true);
    waiting.has_deadline = true;
    waiting.timeout = timeout;
    co_await waiting;
    if (waiting.expired && state->cancelled()) throw timeout_error("wait_for: timed out");
  }
  co_return take_result(*state);
}

}  // namespace detail

/// Waits for `aw` at most `timeout` (asyncio.wait_for). On timeout, cancels it, waits for the
/// cancellation to land, and throws timeout_error; if it ignored the cancellation and returned,
/// its value is returned (as asyncio 3.12 does). Cancelling the caller cancels `aw` too.
template <class A, class Rep, class Period>
auto wait_for(A&& aw, std::chrono::duration<Rep, Period> timeout) {
  using R = await_result_t<A>;
  return detail::wait_for_impl<R, A>(std::forward<A>(aw), std::chrono::duration_cast<detail::clock::duration>(timeout));
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("wait_for") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("returns the result in time; on timeout cancels the inner task and throws") {
    testing::run_bounded([]() -> coroutine<void> {
      auto quick = []() -> coroutine<int> {
        co_await sleep(1ms);
        co_return 4;
      };
      CHECK(co_await wait_for(quick(), 5s) == 4);
      bool inner_cancelled = false;
      auto slow = [&]() -> coroutine<int> {
        try {
          co_await sleep(1h);
        } catch (const cancelled_error&) {
          inner_cancelled = true;
          throw;
        }
        co_return 0;
      };
      CHECK_THROWS_AS(co_await wait_for(slow(), 10ms), timeout_error);
      CHECK(inner_cancelled);
      auto t = create_task(slow());
      CHECK_THROWS_AS(co_await wait_for(t, 0s), timeout_error);
      CHECK(t.cancelled());
    }());
  }

  TEST_CASE("an inner task that swallows the cancellation returns its value") {
    testing::run_bounded([]() -> coroutine<void> {
      auto stubborn = []() -> coroutine<int> {
        try {
          co_await sleep(1h);
        } catch (const cancelled_error&) {
        }
        co_return 8;
      };
      CHECK(co_await wait_for(stubborn(), 5ms) == 8);
    }());
  }

  TEST_CASE("cancelling the waiter cancels the inner awaitable") {
    testing::run_bounded([]() -> coroutine<void> {
      auto inner = create_task([]() -> coroutine<void> { co_await sleep(1h); }());
      auto outer = create_task(wait_for(inner, 1h));
      co_await sleep(1ms);
      outer.cancel();
      co_await wait_done(outer);
      CHECK(outer.cancelled());
      CHECK(inner.cancelled());
    }());
  }
}
#endif
// ---- end src/runtime/wait_for.hpp ----
// ---- begin src/runtime/gather.hpp ----
// gather(aws...) and gather(range): asyncio.gather, with the return_exceptions form.


namespace codestare::async_utils {

/// Tag for gather's return_exceptions form: gather(return_exceptions, a, b).
struct return_exceptions_t {
  explicit return_exceptions_t() = default;
};
inline constexpr return_exceptions_t return_exceptions{};

/// A gathered result: void results become std::monostate.
template <class T>
using gathered_t = std::conditional_t<std::is_void_v<T>, std::monostate, T>;
/// A gathered result with return_exceptions: the value or the exception (cancelled_error for
/// a cancelled child).
template <class T>
using outcome = std::variant<gathered_t<T>, std::exception_ptr>;

namespace detail {

/// Waits for children: all of them, or (without return_exceptions) the first failure. Cancelling
/// it cancels every child; it then throws cancelled_error once they are all done (asyncio).
struct gather_awaiter : cancel_hook {
  struct child_waiter : completion_waiter {
    gather_awaiter* owner;
    future_core* child;
  };
  std::span<future_core* const> children;
  bool return_exceptions;
  future_core* task = nullptr;
  future_core* first_failure = nullptr;
  std::size_t remaining = 0;
  bool cancel_requested = false;
  bool woken = false;
  std::vector<child_waiter> waiters;

  gather_awaiter(std::span<future_core* const> c, bool return_exc) noexcept : children(c), return_exceptions(return_exc) {}
  gather_awaiter(const gather_awaiter&) = delete;
  static bool failed(const future_core* c) { return c->cancelled() || c->has_error(); }
  bool await_ready() {
    for (future_core* c : children) {
      if (!c->done()) ++remaining;
      else if (!first_failure && failed(c)) first_failure = c;
    }
    return remaining == 0 || (!return_exceptions && first_failure);
  }
  void await_suspend(std::coroutine_handle<> h) {
    task = &current_task_core("gather()");
    waiters.resize(children.size());
    for (std::size_t i = 0; i < children.size(); ++i) {
      if (children[i]->done()) continue;
      if (children[i] == task) throw std::runtime_error("a task cannot gather itself");
      waiters[i].owner = this;
      waiters[i].child = children[i];
      waiters[i].notify = [](completion_waiter* w) {
        auto* cw = static_cast<child_waiter*>(w);
        gather_awaiter& g = *cw->owner;
        --g.remaining;
        if (!g.first_failure && failed(cw->child)) g.first_failure = cw->child;
        if (!g.woken && (g.remaining == 0 || (!g.return_exceptions && g.first_failure == cw->child))) {
          g.woken = true;
          g.task->wake();
        }
      };
      children[i]->add_waiter(waiters[i]);
    }
    cancel = [](cancel_hook* c) {
      auto* self = static_cast<gather_awaiter*>(c);
      bool any = false;
      for (future_core* child : self->children) any = child->cancel(self->task->cancel_message()) || any;
      if (any) self->cancel_requested = true;
      return any;
    };
    task->suspend_on(this, h);
  }
  void await_resume() {
    for (auto& w : waiters) w.unlink();
    if (task) task->throw_if_cancelled();
    if (cancel_requested && remaining == 0) throw cancelled_error(task->cancel_message());
    if (!return_exceptions && first_failure) first_failure->check_result();
  }
};

template <class T>
gathered_t<T> gathered_value(future<T>& f) {
  if constexpr (std::is_void_v<T>) {
    f.result();
    return {};
  } else {
    return take_result(*f.state_ptr());
  }
}
template <class T>
outcome<T> gathered_outcome(future<T>& f) {
  try {
    return outcome<T>(std::in_place_index<0>, gathered_value(f));
  } catch (...) {
    return outcome<T>(std::in_place_index<1>, std::current_exception());
  }
}

template <bool ReturnExceptions, class... A>
auto gather_impl(A... aws) -> coroutine<std::conditional_t<ReturnExceptions, std::tuple<outcome<await_result_t<A>>...>,
                                                            std::tuple<gathered_t<await_result_t<A>>...>>> {
  // Braced initialisation creates the tasks left to right, in argument order.
  std::tuple<decltype(ensure_future(std::forward<A>(aws)))...> futures{ensure_future(std::forward<A>(aws))...};
  std::array<future_core*, sizeof...(A)> cores = std::apply([](auto&... f) { return std::array<future_core*, sizeof...(A)>{f.state_ptr()...}; }, futures);
  co_await gather_awaiter(cores, ReturnExceptions);
  if constexpr (ReturnExceptions) co_return std::apply([](auto&... f) { return std::tuple{gathered_outcome(f)...}; }, futures);
  else co_return std::apply([](auto&... f) { return std::tuple<gathered_t<await_result_t<A>>...>{gathered_value(f)...}; }, futures);
}

template <bool ReturnExceptions, class Range>
auto gather_range_impl(Range range) {
  using E = decltype(std::move(*std::ranges::begin(range)));
  using T = await_result_t<E>;
  using V = std::conditional_t<ReturnExceptions, outcome<T>, gathered_t<T>>;
  return [](Range r) -> coroutine<std::vector<V>> {
    std::vector<future<T>> futures;
    for (auto&& aw : r) {
      if constexpr (std::is_copy_constructible_v<std::remove_cvref_t<decltype(aw)>>) futures.push_back(ensure_future(aw));
      else futures.push_back(ensure_future(std::move(aw)));
    }
    std::vector<future_core*> cores;
    cores.reserve(futures.size());
    for (auto& f : futures) cores.push_back(f.state_ptr());
    co_await gather_awaiter(cores, ReturnExceptions);
    std::vector<V> results;
    results.reserve(futures.size());
    for (auto& f : futures) {
      if constexpr (ReturnExceptions) results.push_back(gathered_outcome(f));
      else results.push_back(gathered_value(f));
    }
    co_return results;
  }(std::move(range));
}

template <class R>
concept awaitable_range = std::ranges::input_range<R> && !awaitable<R> && awaitable<std::ranges::range_reference_t<R>>;

}  // namespace detail

/// Runs the awaitables concurrently (each in a task) and returns their results as a tuple
/// (void -> std::monostate). The first exception (or child cancellation) is rethrown at once;
/// the other children keep running. Cancelling gather cancels every child.
template <awaitable... A>
  requires(sizeof...(A) > 0)
auto gather(A&&... aws) {
  return detail::gather_impl<false, A...>(std::forward<A>(aws)...);
}
/// As gather(aws...), but every result is an outcome<T>: the value or the exception.
template <awaitable... A>
auto gather(return_exceptions_t, A&&... aws) {
  return detail::gather_impl<true, A...>(std::forward<A>(aws)...);
}
/// gather over a range of awaitables (a vector of coroutines or tasks) -> std::vector.
template <detail::awaitable_range R>
auto gather(R&& range) {
  return detail::gather_range_impl<false>(std::vector(std::make_move_iterator(std::ranges::begin(range)), std::make_move_iterator(std::ranges::end(range))));
}
template <detail::awaitable_range R>
auto gather(return_exceptions_t, R&& range) {
  return detail::gather_range_impl<true>(std::vector(std::make_move_iterator(std::ranges::begin(range)), std::make_move_iterator(std::ranges::end(range))));
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("gather") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  coroutine<int> after(std::chrono::milliseconds d, int v) {
    co_await sleep(d);
    co_return v;
  }
  coroutine<void> fail_after(std::chrono::milliseconds d) {
    co_await sleep(d);
    throw std::runtime_error("child failed");
  }

  TEST_CASE("tuple and vector results in argument order, void as monostate") {
    testing::run_bounded([]() -> coroutine<void> {
      auto [a, b, c] = co_await gather(after(3ms, 1), after(1ms, 2), []() -> coroutine<void> { co_return; }());
      CHECK(a == 1);
      CHECK(b == 2);
      CHECK(c == std::monostate{});
      std::vector<coroutine<int>> many;
      for (int i = 0; i < 50; ++i) many.push_back(after(std::chrono::milliseconds(i % 5), i));
      auto results = co_await gather(std::move(many));
      REQUIRE(results.size() == 50);
      for (int i = 0; i < 50; ++i) CHECK(results[static_cast<std::size_t>(i)] == i);
      auto t = create_task(after(1ms, 5));
      auto [x] = co_await gather(t);  // tasks are awaited as they are
      CHECK(x == 5);
      CHECK((co_await gather(std::vector<coroutine<int>>{})).empty());
    }());
  }

  TEST_CASE("the first failure propagates at once; return_exceptions collects outcomes") {
    testing::run_bounded([]() -> coroutine<void> {
      auto slow = create_task(after(50ms, 1));
      std::string message;
      try {
        co_await gather(slow, fail_after(1ms));
      } catch (const std::runtime_error& e) {
        message = e.what();
      }
      CHECK(message == "child failed");
      CHECK_FALSE(slow.done());  // the others keep running, as in asyncio
      auto [ok, bad] = co_await gather(return_exceptions, after(1ms, 3), fail_after(1ms));
      CHECK(std::get<0>(ok) == 3);
      CHECK_THROWS_AS(std::rethrow_exception(std::get<1>(bad)), std::runtime_error);
      auto cancelled = create_task(after(1h, 0));
      cancelled.cancel();
      std::vector<task<int>> tasks(1, cancelled);  // (g++ 12 rejects an initializer_list inside co_await)
      auto outcomes = co_await gather(return_exceptions, tasks);
      CHECK_THROWS_AS(std::rethrow_exception(std::get<1>(outcomes[0])), cancelled_error);
      co_await slow;
    }());
  }

  TEST_CASE("cancelling gather cancels every child and then raises cancelled_error") {
    testing::run_bounded([]() -> coroutine<void> {
      auto a = create_task(after(1h, 1));
      auto b = create_task(after(1h, 2));
      auto g = create_task(gather(a, b));
      co_await sleep(1ms);
      g.cancel();
      co_await wait_done(g);
      CHECK(g.cancelled());
      CHECK(a.cancelled());
      CHECK(b.cancelled());
    }());
  }
}
#endif
// ---- end src/runtime/gather.hpp ----
// ---- begin src/runtime/shield.hpp ----
// shield(aw): asyncio.shield. Cancelling the awaiting task does not cancel what it awaits.

namespace codestare::async_utils {
namespace detail {
template <class T>
struct shielded {
  future<T> inner;
  auto operator co_await() const& noexcept { return future_awaiter<T, false, true>(inner.state_ptr()); }
  auto operator co_await() && noexcept { return future_awaiter<T, true, true>(inner.state_ptr()); }
};
}  // namespace detail

/// Runs `aw` in a task (if it is not one) and returns an awaitable of its result that does
/// not propagate cancellation: the awaiting task gets cancelled_error, the inner one runs on.
template <class A>
auto shield(A&& aw) {
  auto fut = detail::ensure_future(std::forward<A>(aw));
  return detail::shielded<typename decltype(fut)::value_type>{std::move(fut)};
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("shield") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("cancellation stops at the shield; the inner task finishes") {
    testing::run_bounded([]() -> coroutine<void> {
      // The inner task waits on a gate, not on a timer: under Valgrind a 5 ms sleep could end
      // before the cancellation is even checked (that made this test flaky).
      auto gate = event_loop::current().create_future<int>();
      auto inner = create_task([](future<int> g) -> coroutine<int> { co_return co_await g; }(gate));
      auto outer = create_task([](task<int> i) -> coroutine<int> { co_return co_await shield(i); }(inner));
      co_await sleep(1ms);
      outer.cancel();
      co_await wait_done(outer);
      CHECK(outer.cancelled());
      CHECK_FALSE(inner.done());
      CHECK_FALSE(gate.cancelled());
      gate.set_result(6);
      CHECK(co_await inner == 6);
      CHECK(co_await shield([]() -> coroutine<int> { co_return 1; }()) == 1);
    }());
  }
}
#endif
// ---- end src/runtime/shield.hpp ----
// ---- begin src/runtime/io.hpp ----
// Awaitable I/O on non-blocking descriptors: wait_readable/writable and asyncio's sock_* calls.
// Each operation is tried first and waits only on EAGAIN; retries run in the loop's dispatch,
// so a spurious wake-up never resumes the task.


namespace codestare::async_utils {
namespace detail {

#ifdef MSG_NOSIGNAL
inline constexpr int send_flags = MSG_DONTWAIT | MSG_NOSIGNAL;  // EPIPE, not SIGPIPE
#else
inline constexpr int send_flags = MSG_DONTWAIT;
#endif

inline bool would_block(int err) noexcept { return err == EAGAIN || err == EWOULDBLOCK; }

inline void require_nonblocking(int fd, const char* what) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags == -1) throw_errno(std::string(what) + ": bad file descriptor " + std::to_string(fd));
  if (!(flags & O_NONBLOCK)) throw std::invalid_argument(std::string(what) + ": the socket must be non-blocking");
}

/// An I/O wait driven by Op: `bool attempt(bool after_event)` does the I/O and says whether the
/// operation is over (result or error kept in the op); `result()` returns it or throws.
template <class Op>
struct io_awaiter : io_waiter, cancel_hook {
  Op op;
  int fd;
  unsigned direction;
  future_core* task = nullptr;
  bool withdrawn = false;

  io_awaiter(Op o, int f, unsigned dir) : op(std::move(o)), fd(f), direction(dir) {}
  io_awaiter(io_awaiter&& other) noexcept : op(std::move(other.op)), fd(other.fd), direction(other.direction) {}
  bool await_ready() { return op.attempt(false); }
  void await_suspend(std::coroutine_handle<> h) {
    task = &current_task_core("I/O on a descriptor");
    ready = [](io_waiter* w, unsigned bits) noexcept {
      auto* self = static_cast<io_awaiter*>(w);
      (void)bits;  // errors and hang-ups are seen by retrying the call itself
      if (!self->op.attempt(true)) return false;
      self->task->wake();
      return true;
    };
    cancel = [](cancel_hook* c) {
      auto* self = static_cast<io_awaiter*>(c);
      self->io_waiter::unlink();
      self->withdrawn = true;
      self->task->wake();
      return true;
    };
    task->loop()->add_io_waiter(fd, direction, *this);
    task->suspend_on(this, h);
  }
  decltype(auto) await_resume() {
    io_waiter::unlink();
    if (task) task->throw_if_cancelled(withdrawn);
    return op.result();
  }
};

/// Shared error handling: keeps errno of a failed call, throws it from result().
struct op_status {
  int error = 0;
  const char* what = "";
  void check() const {
    if (error) throw_errno(error, what);
  }
};

struct readiness_op : op_status {
  bool attempt(bool after_event) noexcept { return after_event; }
  void result() const {}
};

struct recv_into_op : op_status {
  int fd;
  char* data;
  std::size_t size;
  std::size_t received = 0;
  bool attempt(bool) noexcept {
    for (;;) {
      ssize_t n = ::recv(fd, data, size, MSG_DONTWAIT);
      if (n >= 0) {
        received = static_cast<std::size_t>(n);
        return true;
      }
      if (errno == EINTR) continue;
      if (would_block(errno)) return false;
      error = errno;
      what = "sock_recv";
      return true;
    }
  }
  std::size_t result() const {
    check();
    return received;
  }
};

struct recv_op {
  std::string buffer;
  recv_into_op inner;
  recv_op(int fd, std::size_t n) : buffer(n, '\0'), inner{{}, fd, nullptr, n, 0} {}
  recv_op(recv_op&& other) noexcept : buffer(std::move(other.buffer)), inner(other.inner) {}
  bool attempt(bool after_event) noexcept {
    inner.data = buffer.data();  // the op may have moved since it was made
    return inner.attempt(after_event);
  }
  std::string result() {
    buffer.resize(inner.result());
    return std::move(buffer);
  }
};

struct sendall_op : op_status {
  int fd;
  const char* data;
  std::size_t size;
  std::size_t sent = 0;
  bool attempt(bool) noexcept {
    while (sent < size) {
      ssize_t n = ::send(fd, data + sent, size - sent, send_flags);
      if (n >= 0) {
        sent += static_cast<std::size_t>(n);
        continue;
      }
      if (errno == EINTR) continue;
      if (would_block(errno)) return false;
      error = errno;
      what = "sock_sendall";
      return true;
    }
    return true;
  }
  void result() const { check(); }
};

}  // namespace detail

/// What sock_accept returns: the new connection (non-blocking, close-on-exec) and its peer.
struct accepted_socket {
  int fd = -1;
  sockaddr_storage address{};
  socklen_t address_length = 0;
};

namespace detail {

struct accept_op : op_status {
  int fd;
  accepted_socket out;
  bool attempt(bool) noexcept {
    for (;;) {
      out.address_length = sizeof out.address;
      auto* addr = reinterpret_cast<sockaddr*>(&out.address);
#if defined(__linux__) || defined(__FreeBSD__) || defined(__NetBSD__) || defined(__OpenBSD__)
      int conn = ::accept4(fd, addr, &out.address_length, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
      int conn = ::accept(fd, addr, &out.address_length);
      if (conn >= 0) {
        try {
          make_nonblocking_cloexec(conn);
        } catch (...) {
          ::close(conn);
          error = EIO;
          what = "sock_accept";
          return true;
        }
      }
#endif
      if (conn >= 0) {
        out.fd = conn;
        return true;
      }
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (would_block(errno)) return false;
      error = errno;
      what = "sock_accept";
      return true;
    }
  }
  accepted_socket result() const {
    check();
    return out;
  }
};

struct connect_op : op_status {
  int fd;
  sockaddr_storage address;
  socklen_t length;
  bool attempt(bool after_event) noexcept {
    if (after_event) {
      int err = 0;
      socklen_t len = sizeof err;
      if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == -1) err = errno;
      if (err == EINPROGRESS || err == EALREADY) return false;
      error = err;
      what = "sock_connect";
      return true;
    }
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&address), length) == 0) return true;
    if (errno == EINPROGRESS || errno == EINTR) return false;
    error = errno;
    what = "sock_connect";
    return true;
  }
  void result() const { check(); }
};

inline void require_buffer(const void* data, std::size_t size, const char* what) {
  if (!data && size) throw std::invalid_argument(std::string(what) + ": null buffer");
}

}  // namespace detail

/// Waits until fd is readable (or has an error or hang-up to report).
inline auto wait_readable(int fd) { return detail::io_awaiter<detail::readiness_op>({}, fd, detail::io_read); }
/// Waits until fd is writable (or has an error or hang-up to report).
inline auto wait_writable(int fd) { return detail::io_awaiter<detail::readiness_op>({}, fd, detail::io_write); }

/// Receives up to buffer.size() bytes; 0 means the peer closed. Throws std::system_error.
inline auto sock_recv_into(int fd, std::span<char> buffer) {
  detail::require_buffer(buffer.data(), buffer.size(), "sock_recv_into");
  return detail::io_awaiter<detail::recv_into_op>({{}, fd, buffer.data(), buffer.size(), 0}, fd, detail::io_read);
}
inline auto sock_recv_into(int fd, std::span<std::byte> buffer) {
  return sock_recv_into(fd, std::span<char>(reinterpret_cast<char*>(buffer.data()), buffer.size()));
}
/// Receives up to max_bytes; an empty string means the peer closed. Throws std::system_error.
inline auto sock_recv(int fd, std::size_t max_bytes) {
  return detail::io_awaiter<detail::recv_op>(detail::recv_op(fd, max_bytes), fd, detail::io_read);
}
/// Sends all of data (the caller keeps it alive until the await ends). Throws std::system_error
/// (EPIPE when the peer has gone; never SIGPIPE).
inline auto sock_sendall(int fd, std::string_view data) {
  detail::require_buffer(data.data(), data.size(), "sock_sendall");
  return detail::io_awaiter<detail::sendall_op>({{}, fd, data.data(), data.size(), 0}, fd, detail::io_write);
}
inline auto sock_sendall(int fd, std::span<const std::byte> data) {
  return sock_sendall(fd, std::string_view(reinterpret_cast<const char*>(data.data()), data.size()));
}
/// Accepts one connection on a non-blocking listening socket.
inline auto sock_accept(int fd) {
  detail::require_nonblocking(fd, "sock_accept");
  return detail::io_awaiter<detail::accept_op>({{}, fd, {}}, fd, detail::io_read);
}
/// Connects a non-blocking socket to `address`.
inline auto sock_connect(int fd, const sockaddr* address, socklen_t length) {
  detail::require_nonblocking(fd, "sock_connect");
  if (!address || length == 0 || length > sizeof(sockaddr_storage)) throw std::invalid_argument("sock_connect: bad address");
  detail::connect_op op{};
  op.fd = fd;
  std::memcpy(&op.address, address, length);
  op.length = length;
  return detail::io_awaiter<detail::connect_op>(op, fd, detail::io_write);
}

inline auto event_loop::sock_recv(int fd, std::size_t max_bytes) { return async_utils::sock_recv(fd, max_bytes); }
inline auto event_loop::sock_recv_into(int fd, std::span<char> buffer) { return async_utils::sock_recv_into(fd, buffer); }
inline auto event_loop::sock_sendall(int fd, std::string_view data) { return async_utils::sock_sendall(fd, data); }
inline auto event_loop::sock_accept(int fd) { return async_utils::sock_accept(fd); }
inline auto event_loop::sock_connect(int fd, const sockaddr* address, socklen_t length) {
  return async_utils::sock_connect(fd, address, length);
}
inline auto event_loop::wait_readable(int fd) { return async_utils::wait_readable(fd); }
inline auto event_loop::wait_writable(int fd) { return async_utils::wait_writable(fd); }

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <arpa/inet.h>
TEST_SUITE("io") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  struct socket_pair {
    int fd[2] = {-1, -1};
    socket_pair() {
      REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fd) == 0);
      detail::make_nonblocking_cloexec(fd[0]);
      detail::make_nonblocking_cloexec(fd[1]);
    }
    ~socket_pair() {
      for (int f : fd)
        if (f >= 0) ::close(f);
    }
    void close(int i) {
      ::close(fd[i]);
      fd[i] = -1;
    }
  };

  coroutine<void> echo_server(int fd) {
    char buf[4096];
    for (;;) {
      std::size_t n = co_await sock_recv_into(fd, std::span<char>(buf));
      if (n == 0) co_return;
      co_await sock_sendall(fd, std::string_view(buf, n));
    }
  }

  // Sends `rounds` messages of `size` bytes and checks every echoed byte.
  coroutine<void> echo_client(int fd, int rounds, std::size_t size) {
    for (int r = 0; r < rounds; ++r) {
      std::string msg(size, static_cast<char>('a' + r % 26));
      // Send while receiving: a message larger than the socket buffers would deadlock otherwise.
      auto sending = create_task(sock_sendall(fd, msg));
      std::string got;
      while (got.size() < size) {
        std::string part = co_await sock_recv(fd, size - got.size());
        REQUIRE_FALSE(part.empty());
        got += part;
      }
      co_await sending;
      CHECK(got == msg);
    }
  }

  TEST_CASE("echo over a socketpair, small messages and ones larger than the socket buffer") {
    const int fds_before = testing::open_fds();
    {
      socket_pair p;
      testing::run_bounded([&]() -> coroutine<void> {
        auto server = create_task(echo_server(p.fd[1]));
        co_await echo_client(p.fd[0], 200, 64);
        co_await echo_client(p.fd[0], 3, 1 << 20);  // needs partial sends and many waits
        ::shutdown(p.fd[0], SHUT_WR);
        co_await server;
      }());
    }
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("echo over 127.0.0.1 with sock_accept and sock_connect") {
    int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    REQUIRE(listener >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(listener, 16) == 0);
    socklen_t len = sizeof addr;
    REQUIRE(::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
    testing::run_bounded([&]() -> coroutine<void> {
      auto server = create_task([](int l) -> coroutine<void> {
        accepted_socket conn = co_await sock_accept(l);
        CHECK(conn.address.ss_family == AF_INET);
        co_await echo_server(conn.fd);
        ::close(conn.fd);
      }(listener));
      int client = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      co_await sock_connect(client, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
      co_await echo_client(client, 100, 64);
      ::close(client);
      co_await server;
    }());
    ::close(listener);
  }

  TEST_CASE("a peer that closes early: EOF for readers, EPIPE (not SIGPIPE) for writers") {
    socket_pair p;
    testing::run_bounded([&]() -> coroutine<void> {
      auto reader = create_task(sock_recv(p.fd[0], 100));
      co_await sleep(1ms);
      p.close(1);
      CHECK((co_await reader).empty());
      std::string big(1 << 20, 'x');
      try {
        co_await sock_sendall(p.fd[0], big);
        FAIL("sendall to a closed peer succeeded");
      } catch (const std::system_error& e) {
        CHECK(e.code().value() == EPIPE);
      }
    }());
  }

  TEST_CASE("a refused connection, bad descriptors and blocking sockets give clear errors") {
    testing::run_bounded([]() -> coroutine<void> {
      int s = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      addr.sin_port = htons(1);  // nothing listens on port 1
      CHECK_THROWS_AS(co_await sock_connect(s, reinterpret_cast<const sockaddr*>(&addr), sizeof addr), std::system_error);
      ::close(s);
      char buf[8];
      CHECK_THROWS_AS(co_await sock_recv_into(-1, std::span<char>(buf)), std::system_error);
      CHECK_THROWS_AS(co_await sock_sendall(987654, "x"), std::system_error);
      CHECK_THROWS_AS(co_await wait_readable(-1), std::system_error);
      int blocking = ::socket(AF_INET, SOCK_STREAM, 0);
      CHECK_THROWS_AS(sock_accept(blocking), std::invalid_argument);
      CHECK_THROWS_AS(sock_connect(blocking, reinterpret_cast<const sockaddr*>(&addr), sizeof addr), std::invalid_argument);
      ::close(blocking);
    }());
  }

  TEST_CASE("a descriptor number reused after a cancelled wait is armed anew") {
    // Regression (epoll): the loop still took the closed descriptor for armed, so a wait on the
    // new one with the same number was never armed and never woke up.
    testing::run_bounded([]() -> coroutine<void> {
      int number;
      {
        socket_pair old;
        auto t = create_task(sock_recv(old.fd[0], 10));
        co_await sleep(1ms);  // armed by now
        t.cancel();
        co_await wait_done(t);
        number = old.fd[0];
      }  // closed: the kernel forgets the arming
      socket_pair p;
      if (p.fd[0] != number) {  // make sure the number is the same
        REQUIRE(::dup2(p.fd[0], number) == number);
        ::close(p.fd[0]);
        p.fd[0] = number;
      }
      auto reader = create_task(sock_recv(number, 10));
      co_await sleep(1ms);
      CHECK(::write(p.fd[1], "hi", 2) == 2);
      CHECK(co_await wait_for(reader, 5s) == "hi");
      // The same for an add_reader callback.
      auto first = create_task(wait_readable(number));
      co_await sleep(1ms);
      first.cancel();
      co_await wait_done(first);
      event_loop& loop = event_loop::current();
      auto seen = loop.create_future<void>();
      loop.add_reader(number, [&] {
        if (!seen.done()) seen.set_result();
      });
      CHECK(::write(p.fd[1], "x", 1) == 1);
      co_await wait_for(seen, 5s);
      loop.remove_reader(number);
    }());
  }

  TEST_CASE("cancel while waiting on a descriptor; wait_readable and wait_writable") {
    socket_pair p;
    testing::run_bounded([&]() -> coroutine<void> {
      auto t = create_task(sock_recv(p.fd[0], 10));
      co_await sleep(1ms);
      t.cancel();
      co_await wait_done(t);
      CHECK(t.cancelled());
      co_await wait_writable(p.fd[1]);
      CHECK(::write(p.fd[1], "z", 1) == 1);
      co_await wait_readable(p.fd[0]);
      CHECK(co_await sock_recv(p.fd[0], 10) == "z");  // the cancelled read took nothing
    }());
  }
}
#endif
// ---- end src/runtime/io.hpp ----
// ---- begin src/runtime/run.hpp ----
// run(aw): asyncio.run. A fresh loop runs aw, then cancels and awaits what is left, shuts the
// executor down and closes, so nothing outlives the call.

namespace codestare::async_utils {
namespace detail {

/// Cancels every pending task and runs the loop until all are done (rounds repeat for tasks
/// started by cleanup code); failures other than cancellation go to the exception handler.
inline void cancel_all_tasks(event_loop& loop) {
  for (;;) {
    std::vector<any_task> pending;
    loop.for_each_task([&](future_core& core) { pending.emplace_back(&core); });
    if (pending.empty()) return;
    for (auto& t : pending) t.cancel();
    loop.run_until_complete([](std::vector<any_task> tasks) -> coroutine<void> {
      for (auto& t : tasks) co_await wait_done(t);
    }(pending));
    for (auto& t : pending) {
      if (t.cancelled()) continue;
      if (auto error = t.exception())
        loop.call_exception_handler({"unhandled exception during run() shutdown", error, t, std::nullopt});
    }
  }
}

/// Everything run() does after the main coroutine, in asyncio's order.
inline void finish_run(event_loop& loop) noexcept {
  try {
    cancel_all_tasks(loop);
    loop.shutdown_default_executor_now();
  } catch (...) {
    log(log_level::error, "run(): error while shutting down: " + describe(std::current_exception()));
  }
  try {
    loop.close();
  } catch (...) {
  }
}

}  // namespace detail

/// asyncio.run: runs `aw` on a new loop and returns its result (or rethrows). Throws
/// std::runtime_error when a loop is already running on this thread.
template <class A>
auto run(A&& aw) {
  if (detail::running_loop) throw std::runtime_error("run() cannot be called when an event loop is running on this thread");
  event_loop loop;
  using R = await_result_t<A>;
  try {
    if constexpr (std::is_void_v<R>) {
      loop.run_until_complete(std::forward<A>(aw));
      detail::finish_run(loop);
    } else {
      R result = loop.run_until_complete(std::forward<A>(aw));
      detail::finish_run(loop);
      return result;
    }
  } catch (...) {
    detail::finish_run(loop);
    throw;
  }
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
namespace codestare::async_utils::testing {
inline void run_bounded(coroutine<void> body, std::chrono::milliseconds limit) {
  // Every bounded run of the suite also checks that run() leaves nothing behind.
  const int fds_before = open_fds();
  const int threads_before = threads();
  run(wait_for(std::move(body), limit));
  // (Fewer is fine: a body may close a descriptor its test opened before.)
  CHECK_MESSAGE(open_fds() <= fds_before, "run() left a descriptor open");
  CHECK_MESSAGE(threads() <= threads_before, "run() left a thread running");
}
}  // namespace codestare::async_utils::testing

TEST_SUITE("run") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("run returns the result, cancels leftovers, closes, leaks no descriptor") {
    const int fds_before = testing::open_fds();
    static bool leftover_cancelled = false;
    auto leftover = []() -> coroutine<void> {
      try {
        co_await sleep(1h);
      } catch (const cancelled_error&) {
        leftover_cancelled = true;
        throw;
      }
    };
    auto main = [&]() -> coroutine<int> {
      create_task(leftover());
      co_await sleep(0s);
      co_return 42;
    };
    CHECK(run(main()) == 42);
    CHECK(leftover_cancelled);
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("after run(): no extra descriptor, no extra thread, no live task") {
    const int fds_before = testing::open_fds();
    const int threads_before = testing::threads();
    std::vector<any_task> started;
    auto main = [&]() -> coroutine<int> {
      event_loop& loop = event_loop::current();
      // A representative run: a descriptor wait, timers, futures, a task awaiting a task, a
      // thread posting to the loop, a leftover timer, and a task that has to be cancelled.
      int sp[2];
      REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp) == 0);
      auto reader = create_task(sock_recv(sp[0], 16));
      auto fut = loop.create_future<int>();
      auto waiter = create_task([](future<int> f) -> coroutine<int> { co_return co_await f; }(fut));
      auto chained = create_task([](task<int> t) -> coroutine<int> { co_return co_await t + 1; }(waiter));
      auto sleeper = create_task(sleep(1h));
      loop.call_later(1h, [] {});  // still in the timer heap when run() ends
      // (The future is captured by reference: its handles are counted on the loop thread only.)
      std::thread poster([&loop, &fut] { loop.call_soon_threadsafe([&fut] { fut.set_result(41); }); });
      CHECK(co_await chained == 42);
      poster.join();
      CHECK(::write(sp[1], "x", 1) == 1);
      CHECK(co_await reader == "x");
      sleeper.cancel();
      co_await wait_done(sleeper);
      ::close(sp[0]);
      ::close(sp[1]);
      started = {reader, waiter, chained, sleeper};
      // Only the main task itself is left.
      auto tasks = all_tasks();
      REQUIRE(tasks.size() == 1);
      CHECK(tasks[0] == *current_task());
      co_return 7;
    };
    CHECK(run(main()) == 7);
    REQUIRE(started.size() == 4);
    for (auto& t : started) CHECK(t.done());
    CHECK(testing::open_fds() == fds_before);
    CHECK(testing::threads() == threads_before);
  }

  TEST_CASE("run rethrows, and refuses to nest inside a running loop") {
    auto fails = []() -> coroutine<void> {
      co_await sleep(0s);
      throw std::domain_error("failed");
    };
    CHECK_THROWS_AS(run(fails()), std::domain_error);
    auto nested = []() -> coroutine<void> {
      auto inner = []() -> coroutine<void> { co_return; };
      CHECK_THROWS_AS(run(inner()), std::runtime_error);
      co_return;
    };
    run(nested());
  }

  TEST_CASE("a leftover task may await cleanup after being cancelled at shutdown") {
    static int cleanups = 0;
    auto careful = []() -> coroutine<void> {
      try {
        co_await sleep(1h);
      } catch (const cancelled_error&) {
        ++cleanups;
      }
      co_await sleep(1ms);  // cleanup that itself awaits, then a normal return
    };
    auto main = [&]() -> coroutine<void> {
      create_task(careful());
      co_await sleep(0s);
    };
    run(main());
    CHECK(cleanups == 1);
  }
}
#endif
// ---- end src/runtime/run.hpp ----

#endif  // ASYNC_UTILS_HPP_INCLUDED
