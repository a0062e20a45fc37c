// The Linux backend: epoll with one-shot arming, so a closed and reused descriptor cannot hang.
#pragma once

#include "config.hpp"
#include "posix.hpp"

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
