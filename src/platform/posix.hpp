// Small POSIX helpers shared by the backends: errno to exceptions, an owning fd, readiness bits.
#pragma once

#include "config.hpp"

#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>
#include <fcntl.h>
#include <sched.h>
#include <string>
#include <system_error>
#include <thread>
#include <unistd.h>
#include <utility>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

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

/// Whether waiting by spinning can pay off: the process may run on more than one CPU. Under
/// `taskset -c 0` a spinning thread only keeps the thread it waits for off the CPU.
inline bool may_spin() noexcept {
  static const bool many = [] {
#if defined(ASYNC_UTILS_NO_SPIN)
    return false;
#endif
#if defined(__linux__) && defined(CPU_COUNT)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (::sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set) > 1;
#endif
    return std::thread::hardware_concurrency() > 1;
  }();
  return many;
}

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

/// Spins until done() or until `limit` has passed; returns done()'s last answer.
template <class Done>
bool spin_until(Done done, std::chrono::nanoseconds limit) noexcept {
  const auto start = std::chrono::steady_clock::now();
  for (unsigned i = 1;; ++i) {
    if (done()) return true;
    cpu_relax();
    if (i % 32 == 0 && std::chrono::steady_clock::now() - start > limit) return done();
  }
}

/// Spin-then-park that learns: a spin that ends without done() makes the next ones be skipped
/// (1, 2, 4, ... up to 64 of them), a spin that succeeds resets that. On a machine where the
/// thread waited for cannot run meanwhile (other load on every CPU), waits go straight to
/// sleeping after a few failures instead of burning a time slice each.
class adaptive_spin {
 public:
  template <class Done>
  bool wait(Done done, std::chrono::nanoseconds limit) noexcept {
    if (!may_spin()) return done();
    if (skip_ > 0) {
      --skip_;
      return done();
    }
    if (spin_until(done, limit)) {
      penalty_ = 1;
      return true;
    }
    skip_ = penalty_;
    if (penalty_ < 64) penalty_ *= 2;
    return false;
  }

 private:
  unsigned skip_ = 0;
  unsigned penalty_ = 1;
};

/// A 32-bit word a thread sleeps on (park) until another changes it and wakes it (unpark): the
/// Linux futex system call, std::atomic wait/notify elsewhere. The word is the whole protocol:
/// a parker passes the value it saw, and sleeps only while the word still holds it; whoever
/// changes the word first and then unparks cannot be missed. Wake-ups may be spurious.
using park_word = std::atomic<std::uint32_t>;
static_assert(sizeof(park_word) == sizeof(std::uint32_t) && park_word::is_always_lock_free);

#if defined(__linux__)
/// Whether park() honours a timeout (the loop then sleeps on its word when it has nothing to poll).
inline constexpr bool timed_park = true;

/// Sleeps while word == seen, at most `timeout` (negative: no limit).
inline void park(const park_word& word, std::uint32_t seen, std::chrono::nanoseconds timeout = std::chrono::nanoseconds{-1}) noexcept {
  timespec ts{};
  timespec* limit = nullptr;
  if (timeout.count() >= 0) {
    const auto secs = std::chrono::duration_cast<std::chrono::seconds>(timeout);
    ts.tv_sec = secs.count() > INT_MAX ? INT_MAX : static_cast<std::time_t>(secs.count());
    ts.tv_nsec = static_cast<long>((timeout - secs).count());
    limit = &ts;
  }
  // The futex call only reads the word, atomically with going to sleep.
  ::syscall(SYS_futex, const_cast<park_word*>(&word), FUTEX_WAIT_PRIVATE, seen, limit, nullptr, 0);
}

/// Wakes up to `count` threads parked on word (after the caller changed it).
inline void unpark(park_word& word, int count) noexcept {
  ::syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
}
#else
inline constexpr bool timed_park = false;

/// Sleeps while word == seen (no timeout on this system: the loop does not use it timed).
inline void park(const park_word& word, std::uint32_t seen) noexcept { word.wait(seen, std::memory_order_acquire); }

inline void unpark(park_word& word, int count) noexcept {
  if (count == 1) word.notify_one();
  else word.notify_all();
}
#endif

/// Throws std::system_error(EBADF) unless fd is an open descriptor.
ASYNC_UTILS_LINK void require_open_fd(int fd, const char* what);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void require_open_fd(int fd, const char* what) {
  if (fd < 0 || ::fcntl(fd, F_GETFD) == -1) throw_errno(EBADF, std::string(what) + ": bad file descriptor " + std::to_string(fd));
}
#endif  // ASYNC_UTILS_DEFINITIONS

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
  /// Gives the descriptor up without closing it.
  int release() noexcept { return std::exchange(fd_, -1); }
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

/// Sets O_NONBLOCK and FD_CLOEXEC, the state every descriptor the loop owns must be in.
ASYNC_UTILS_LINK void make_nonblocking_cloexec(int fd);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void make_nonblocking_cloexec(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags == -1 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) == -1) throw_errno("fcntl(O_NONBLOCK)");
  flags = ::fcntl(fd, F_GETFD);
  if (flags == -1 || ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC) == -1) throw_errno("fcntl(FD_CLOEXEC)");
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// Milliseconds for poll-style calls: rounded up, so a timer is never woken early and spun on.
inline int timeout_ms(std::chrono::nanoseconds timeout) noexcept {
  if (timeout.count() < 0) return -1;
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(timeout).count();
  return ms > 0x7fffffff ? 0x7fffffff : static_cast<int>(ms);
}

}  // namespace codestare::async_utils::detail
