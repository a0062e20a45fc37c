// The Apple/BSD backend: kqueue with EV_ONESHOT filters. Compiled here only against a shim.
#pragma once

#include "config.hpp"
#include "posix.hpp"

#ifdef ASYNC_UTILS_BACKEND_KQUEUE
#include <sys/event.h>
#include <sys/time.h>
#include <sys/types.h>
#include <unordered_map>
#include <vector>

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
    unsigned armed = armed_of(fd);
    try {
      change(fd, EVFILT_READ, io_read, mask, armed);
      change(fd, EVFILT_WRITE, io_write, mask, armed);
    } catch (...) {
      set_armed(fd, armed);
      throw;
    }
    set_armed(fd, armed);
  }
  void remove(int fd) noexcept {
    unsigned armed = armed_of(fd);
    try {
      change(fd, EVFILT_READ, io_read, 0, armed);
      change(fd, EVFILT_WRITE, io_write, 0, armed);
    } catch (...) {
      armed = 0;
    }
    set_armed(fd, armed);
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
      set_armed(fd, armed_of(fd) & ~(bits & (io_read | io_write)));
      on_event(fd, bits);
    }
  }

 private:
  unsigned armed_of(int fd) const noexcept {
    auto it = armed_.find(fd);
    return it != armed_.end() ? it->second : 0u;
  }
  /// Only armed descriptors have an entry, so the map stays as small as the set of waits.
  void set_armed(int fd, unsigned armed) noexcept {
    if (armed) {
      try {
        armed_[fd] = armed;
      } catch (...) {  // out of memory: the filter stays armed in the kernel, one report ends it
      }
    } else {
      armed_.erase(fd);
    }
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
  std::unordered_map<int, unsigned> armed_;  // fd -> filters armed (one-shot filters clear on delivery)
  struct kevent events_[256];
};

}  // namespace codestare::async_utils::detail
#endif  // ASYNC_UTILS_BACKEND_KQUEUE
