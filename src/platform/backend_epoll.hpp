// The Linux backend: epoll, each descriptor registered once, edge-triggered, for both directions
// (the loop's backend); and the one-shot variant the io_uring backend falls back to.
#pragma once

#include "config.hpp"
#include "posix.hpp"

#ifdef ASYNC_UTILS_BACKEND_EPOLL
#include <sys/epoll.h>

namespace codestare::async_utils::detail {

/// Edge = true: registrations that stay. add(fd) registers fd once for input and output
/// (EPOLLET), and the kernel reports each new readiness without any further epoll_ctl. The loop
/// tries an operation first and waits only after EAGAIN, so an edge is never missed. arm(fd)
/// asks the kernel to look again (EPOLL_CTL_MOD re-evaluates readiness and reports it if present):
/// the level check a readiness wait or an add_reader callback needs, and the repair of a
/// registration the kernel dropped because the descriptor was closed (ENOENT: added anew).
/// Edge = false: one-shot registrations (EPOLLONESHOT); add(fd) registers fd disarmed, arm(fd,
/// mask) asks for the next readiness in mask, a report disarms; the io_uring backend's fallback.
template <bool Edge>
class basic_epoll_backend {
 public:
  static constexpr const char* name = "epoll";
  /// The loop keeps registrations across waits and re-arms only for level checks (event_loop.hpp).
  static constexpr bool edge_triggered = Edge;

  basic_epoll_backend() : epfd_(::epoll_create1(EPOLL_CLOEXEC)) {
    if (!epfd_) throw_errno("epoll_create1");
  }

  /// First sight of fd: registers it, so a bad descriptor fails here, at the caller. EEXIST is
  /// the same open descriptor registered before (a closed one leaves the epoll set by itself).
  void add(int fd) {
    epoll_event ev = event_for(fd, 0);
    if (::epoll_ctl(epfd_.get(), EPOLL_CTL_ADD, fd, &ev) == -1 && errno != EEXIST)
      throw_errno("epoll_ctl(ADD, fd " + std::to_string(fd) + ")");
  }
  /// Edge: re-evaluates fd's readiness now (a report follows if it is ready); the mask is
  /// ignored, the registration always covers both directions. One-shot: arms fd for one report
  /// of mask (io_read | io_write); 0 disarms.
  void arm(int fd, unsigned mask) {
    epoll_event ev = event_for(fd, mask);
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
  static epoll_event event_for(int fd, unsigned mask) noexcept {
    epoll_event ev{};
    if constexpr (Edge) {
      (void)mask;
      ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    } else {
      ev.events = EPOLLONESHOT | ((mask & io_read) ? EPOLLIN | EPOLLRDHUP : 0u) | ((mask & io_write) ? EPOLLOUT : 0u);
    }
    ev.data.fd = fd;
    return ev;
  }
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

/// The loop's epoll backend (event_loop.hpp keeps its registrations).
using epoll_edge_backend = basic_epoll_backend<true>;
/// One-shot epoll, what the io_uring backend falls back to.
using epoll_backend = basic_epoll_backend<false>;

}  // namespace codestare::async_utils::detail
#endif  // ASYNC_UTILS_BACKEND_EPOLL
