// The portable backend: poll(2) over a compact array of the armed descriptors.
#pragma once

#include "config.hpp"
#include "posix.hpp"

#ifdef ASYNC_UTILS_BACKEND_POLL
#include <poll.h>
#include <unordered_map>
#include <vector>

namespace codestare::async_utils::detail {

/// Same contract as the epoll backend (one report per arm); the array holds only armed fds and
/// permanent watches, so each wait costs O(armed), not O(largest fd).
class poll_backend {
 public:
  static constexpr const char* name = "poll";

  void add(int fd) { require_open_fd(fd, "add"); }
  void arm(int fd, unsigned mask);
  void remove(int fd) noexcept;
  void watch(int fd);

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
  std::size_t slot(int fd) const noexcept;
  void erase(std::size_t i) noexcept;
  struct report {
    int fd;
    unsigned bits;
  };
  std::vector<pollfd> fds_;
  std::vector<bool> permanent_;
  std::unordered_map<int, std::size_t> index_;  // fd -> position in fds_ (no table as large as the fd)
  std::vector<report> reported_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void poll_backend::arm(int fd, unsigned mask) {
  short events = static_cast<short>(((mask & io_read) ? POLLIN : 0) | ((mask & io_write) ? POLLOUT : 0));
  std::size_t i = slot(fd);
  if (i == npos) {
    if (events == 0) return;
    fds_.push_back({fd, events, 0});
    try {
      permanent_.push_back(false);
      index_[fd] = fds_.size() - 1;
    } catch (...) {
      fds_.pop_back();
      if (permanent_.size() > fds_.size()) permanent_.pop_back();
      throw;
    }
  } else if (events == 0 && !permanent_[i]) {
    erase(i);
  } else {
    fds_[i].events = events;
  }
}

ASYNC_UTILS_LINK void poll_backend::remove(int fd) noexcept {
  std::size_t i = slot(fd);
  if (i != npos && !permanent_[i]) erase(i);
}

ASYNC_UTILS_LINK void poll_backend::watch(int fd) {
  arm(fd, io_read);
  permanent_[slot(fd)] = true;
}

ASYNC_UTILS_LINK std::size_t poll_backend::slot(int fd) const noexcept {
  auto it = index_.find(fd);
  return it != index_.end() ? it->second : npos;
}

ASYNC_UTILS_LINK void poll_backend::erase(std::size_t i) noexcept {
  index_.erase(fds_[i].fd);
  if (i + 1 != fds_.size()) {
    fds_[i] = fds_.back();
    permanent_[i] = permanent_.back();
    index_[fds_[i].fd] = i;  // present already: no allocation
  }
  fds_.pop_back();
  permanent_.pop_back();
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils::detail
#endif  // ASYNC_UTILS_BACKEND_POLL
