// Picks the I/O backend chosen in config.hpp, and the cross-thread wake-up descriptor.
#pragma once

#include "config.hpp"
#include "posix.hpp"
#include "backend_epoll.hpp"
#include "backend_io_uring.hpp"
#include "backend_kqueue.hpp"
#include "backend_poll.hpp"

#if defined(__linux__)
#include <sys/eventfd.h>
#endif

namespace codestare::async_utils::detail {

#if defined(ASYNC_UTILS_BACKEND_IO_URING)
using io_backend = io_uring_backend;
#elif defined(ASYNC_UTILS_BACKEND_EPOLL)
using io_backend = epoll_edge_backend;
#elif defined(ASYNC_UTILS_BACKEND_KQUEUE)
using io_backend = kqueue_backend;
#else
using io_backend = poll_backend;
#endif

/// Wakes a loop blocked in its backend from another thread: an eventfd on Linux, a pipe
/// elsewhere. notify() is async-signal-safe and thread-safe; drain() runs on the loop thread.
class wakeup_fd {
 public:
  wakeup_fd();
  int fd() const noexcept { return read_.get(); }
  void notify() const noexcept;
  void drain() const noexcept;

 private:
  unique_fd read_, write_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK wakeup_fd::wakeup_fd() {
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

ASYNC_UTILS_LINK void wakeup_fd::notify() const noexcept {
  const std::uint64_t one = 1;
  const int target = write_ ? write_.get() : read_.get();
  // EAGAIN means a wake-up is already pending, which is all we need.
  [[maybe_unused]] auto n = ::write(target, &one, write_ ? 1 : sizeof one);
}

ASYNC_UTILS_LINK void wakeup_fd::drain() const noexcept {
  char buf[64];
  // An eventfd hands its whole count to one read; a pipe is read until empty.
  while (::read(read_.get(), buf, sizeof buf) > 0 && write_) {
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils::detail
