// signal_source: turns POSIX signals into readiness of one descriptor a loop can watch
// (signalfd on Linux/epoll, EVFILT_SIGNAL on kqueue, a self-pipe fed by sigaction elsewhere).
#pragma once

#include "config.hpp"
#include "posix.hpp"

#include <array>
#include <atomic>
#include <csignal>
#include <mutex>
#include <pthread.h>
#include <signal.h>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(ASYNC_UTILS_BACKEND_EPOLL) && defined(__linux__)
#define ASYNC_UTILS_SIGNALS_SIGNALFD
#include <sys/signalfd.h>
#elif defined(ASYNC_UTILS_BACKEND_KQUEUE)
#define ASYNC_UTILS_SIGNALS_KQUEUE
#else
#define ASYNC_UTILS_SIGNALS_PIPE
#endif

namespace codestare::async_utils::detail {

#ifdef NSIG
inline constexpr int signal_limit = NSIG;  // valid numbers are 1 .. signal_limit - 1
#else
inline constexpr int signal_limit = 65;
#endif

/// Throws std::invalid_argument for numbers that are no signal, and for SIGKILL and SIGSTOP,
/// which cannot be caught (Python's signal module raises ValueError for the same).
ASYNC_UTILS_LINK void check_signal_number(int sig);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void check_signal_number(int sig) {
  if (sig < 1 || sig >= signal_limit) throw std::invalid_argument("invalid signal number " + std::to_string(sig));
  if (sig == SIGKILL || sig == SIGSTOP)
    throw std::invalid_argument("signal " + std::to_string(sig) + " cannot be caught (SIGKILL, SIGSTOP)");
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// Process-wide state shared with the async-signal-safe handler: lock-free atomics only.
/// Two loops (in two threads) must not both own one signal: a process-directed signal is
/// delivered to a single thread, so "both get it" cannot be made to work. The first loop to
/// register a signal owns it until it removes it; a second loop gets std::runtime_error.
struct signal_globals {
  struct slot {
    std::atomic<const void*> owner{nullptr};  // the signal_source holding the signal
    std::atomic<int> wake_fd{-1};             // self-pipe: write end of the owner
    std::atomic<bool> pending{false};         // self-pipe: arrived since the last drain
#ifdef ASYNC_UTILS_SIGNALS_SIGNALFD
    std::atomic<pthread_t> thread{};          // signalfd: the owner's thread (forwarding target)
    std::atomic<bool> has_thread{false};
#endif
  };
  std::array<slot, signal_limit> slots;
  std::atomic<int> handlers_running{0};  // handlers between reading a slot and finishing with it
  std::mutex claims;                     // serialises owner changes (never taken in a handler)
};
ASYNC_UTILS_LINK signal_globals& signal_state() noexcept;

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK signal_globals& signal_state() noexcept {
  static signal_globals state;
  return state;
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// The handler every backend installs. Self-pipe: flags the signal and writes one byte (the
/// flag, not the byte, is the truth, so a full pipe loses nothing). signalfd: the signal went to
/// a thread that does not block it (another thread than the loop's); it is re-sent to the loop's
/// thread, where it is blocked and so becomes readable from the signalfd. kqueue: nothing (the
/// filter records the delivery; the handler only stops the default action).
ASYNC_UTILS_LINK void on_signal(int sig) noexcept;

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void on_signal(int sig) noexcept {
  signal_globals& g = signal_state();
  if (sig < 1 || sig >= signal_limit) return;
  const int saved_errno = errno;
  g.handlers_running.fetch_add(1);
  [[maybe_unused]] auto& s = g.slots[static_cast<std::size_t>(sig)];
#if defined(ASYNC_UTILS_SIGNALS_PIPE)
  s.pending.store(true);
  const int fd = s.wake_fd.load();
  if (fd >= 0) {
    const char byte = static_cast<char>(sig);
    [[maybe_unused]] auto n = ::write(fd, &byte, 1);  // EAGAIN: a wake-up is pending anyway
  }
#elif defined(ASYNC_UTILS_SIGNALS_SIGNALFD)
  if (s.has_thread.load()) {
    const pthread_t target = s.thread.load();
    // Never to ourselves: the loop thread blocks the signal, so running here means someone
    // unblocked it there, and re-sending would recurse.
    if (!pthread_equal(target, pthread_self())) ::pthread_kill(target, sig);
  }
#endif
  g.handlers_running.fetch_sub(1);
  errno = saved_errno;
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// One per loop: the signals it handles, the state it must restore, and the descriptor that
/// becomes readable when one of them arrives. Loop thread only; add/remove must be called on
/// the thread that runs the loop (the signal mask is per thread).
class signal_source {
 public:
  signal_source();
  signal_source(const signal_source&) = delete;
  signal_source& operator=(const signal_source&) = delete;
  ~signal_source();

  /// The descriptor to watch for reading.
  int fd() const noexcept { return fd_.get(); }
  bool has(int sig) const noexcept { return find(sig) != nullptr; }

  /// Starts receiving sig. Throws std::invalid_argument (bad number), std::runtime_error
  /// (another loop owns it) or std::system_error, and then leaves everything as it was.
  void add(int sig);

  /// Stops receiving sig; restores the disposition and the thread's mask bit as they were
  /// before add(). Instances that arrived but were not drained yet are discarded.
  void remove(int sig) noexcept;

  /// Reads what arrived; calls on_arrival(sig) at most once per signal (arrivals coalesce).
  template <class F>
  void drain(F&& on_arrival) {
    std::array<bool, signal_limit> seen{};
#if defined(ASYNC_UTILS_SIGNALS_SIGNALFD)
    signalfd_siginfo info[16];
    for (;;) {
      ssize_t n = ::read(fd_.get(), info, sizeof info);
      if (n <= 0) break;
      for (std::size_t i = 0; i < static_cast<std::size_t>(n) / sizeof info[0]; ++i) {
        const auto sig = static_cast<int>(info[i].ssi_signo);
        if (sig > 0 && sig < signal_limit) seen[static_cast<std::size_t>(sig)] = true;
      }
    }
#elif defined(ASYNC_UTILS_SIGNALS_KQUEUE)
    struct kevent events[16];
    const timespec zero{};
    for (;;) {
      int n = ::kevent(fd_.get(), nullptr, 0, events, 16, &zero);
      if (n <= 0) break;
      for (int i = 0; i < n; ++i) {
        const auto sig = static_cast<int>(events[i].ident);
        if (events[i].filter == EVFILT_SIGNAL && sig > 0 && sig < signal_limit) seen[static_cast<std::size_t>(sig)] = true;
      }
    }
#else
    char buf[64];
    while (::read(fd_.get(), buf, sizeof buf) > 0) {
    }
    // Flags are read after the bytes: a signal flagged after this point writes a new byte.
    for (const auto& s : saved_) {
      if (signal_state().slots[static_cast<std::size_t>(s.sig)].pending.exchange(false)) seen[static_cast<std::size_t>(s.sig)] = true;
    }
#endif
    for (int sig = 1; sig < signal_limit; ++sig) {
      if (seen[static_cast<std::size_t>(sig)] && has(sig)) on_arrival(sig);
    }
  }

 private:
  struct saved_state {
    int sig;
    struct sigaction action;  // the disposition before add()
    bool was_blocked;         // signalfd: the loop thread's mask bit before add()
  };

  const saved_state* find(int sig) const noexcept;

  void claim(int sig);
  /// signalfd: a process-directed signal runs on_signal on a thread that does not block it,
  /// which forwards it to the owner's thread. A forward still on its way when uninstall()
  /// restores the old disposition and unblocks the signal would reach that disposition (for
  /// SIG_DFL: the process ends). So forwarding stops first, and the handlers that may have read
  /// the old target finish, before uninstall() drains what arrived.
  void stop_forwarding([[maybe_unused]] int sig) noexcept;
  void unclaim(int sig) noexcept;

  static void set_action(int sig, const struct sigaction* action, struct sigaction* old);
  static struct sigaction forwarding_action() noexcept;

  void install(int sig, saved_state& saved);

  void uninstall(const saved_state& saved) noexcept;

#ifdef ASYNC_UTILS_SIGNALS_SIGNALFD
  sigset_t signalfd_mask() const noexcept {
    sigset_t set;
    sigemptyset(&set);
    for (const auto& s : saved_) sigaddset(&set, s.sig);
    return set;
  }
#endif

  unique_fd fd_;
  unique_fd write_;  // self-pipe only
  std::vector<saved_state> saved_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK signal_source::signal_source() {
#if defined(ASYNC_UTILS_SIGNALS_SIGNALFD)
  sigset_t none;
  sigemptyset(&none);
  fd_.reset(::signalfd(-1, &none, SFD_NONBLOCK | SFD_CLOEXEC));
  if (!fd_) throw_errno("signalfd");
#elif defined(ASYNC_UTILS_SIGNALS_KQUEUE)
  fd_.reset(::kqueue());
  if (!fd_) throw_errno("kqueue(signals)");
  make_nonblocking_cloexec(fd_.get());
#else
  int fds[2];
  if (::pipe(fds) == -1) throw_errno("pipe(signals)");
  fd_.reset(fds[0]);
  write_.reset(fds[1]);
  make_nonblocking_cloexec(fds[0]);
  make_nonblocking_cloexec(fds[1]);
#endif
}

ASYNC_UTILS_LINK signal_source::~signal_source() {
  while (!saved_.empty()) remove(saved_.back().sig);
}

ASYNC_UTILS_LINK void signal_source::add(int sig) {
  check_signal_number(sig);
  if (has(sig)) return;
  saved_.reserve(saved_.size() + 1);  // the only allocation, done before any change
  claim(sig);
  saved_state saved{sig, {}, false};
  try {
    install(sig, saved);
  } catch (...) {
    unclaim(sig);
    throw;
  }
  saved_.push_back(saved);
}

ASYNC_UTILS_LINK void signal_source::remove(int sig) noexcept {
  const saved_state* found = find(sig);
  if (!found) return;
  const saved_state saved = *found;
  std::erase_if(saved_, [sig](const saved_state& s) { return s.sig == sig; });
  stop_forwarding(sig);
  uninstall(saved);
  unclaim(sig);
}

ASYNC_UTILS_LINK const signal_source::saved_state* signal_source::find(int sig) const noexcept {
  for (const auto& s : saved_) {
    if (s.sig == sig) return &s;
  }
  return nullptr;
}

ASYNC_UTILS_LINK void signal_source::claim(int sig) {
  signal_globals& g = signal_state();
  std::lock_guard guard(g.claims);
  auto& slot = g.slots[static_cast<std::size_t>(sig)];
  const void* owner = slot.owner.load();
  if (owner && owner != this)
    throw std::runtime_error("signal " + std::to_string(sig) + " is already handled by another event loop");
  slot.owner.store(this);
}

ASYNC_UTILS_LINK void signal_source::stop_forwarding([[maybe_unused]] int sig) noexcept {
#ifdef ASYNC_UTILS_SIGNALS_SIGNALFD
  signal_globals& g = signal_state();
  g.slots[static_cast<std::size_t>(sig)].has_thread.store(false);
  while (g.handlers_running.load() != 0) std::this_thread::yield();
#endif
}

ASYNC_UTILS_LINK void signal_source::unclaim(int sig) noexcept {
  signal_globals& g = signal_state();
  std::lock_guard guard(g.claims);
  auto& slot = g.slots[static_cast<std::size_t>(sig)];
  slot.wake_fd.store(-1);
#ifdef ASYNC_UTILS_SIGNALS_SIGNALFD
  slot.has_thread.store(false);
#endif
  // A handler on another thread may still hold the old values; wait until it is done, so
  // that it never writes to a closed pipe or signals a thread that is gone.
  while (g.handlers_running.load() != 0) std::this_thread::yield();
  slot.pending.store(false);
  slot.owner.store(nullptr);
}

ASYNC_UTILS_LINK void signal_source::set_action(int sig, const struct sigaction* action, struct sigaction* old) {
  if (::sigaction(sig, action, old) == -1) {
    if (errno == EINVAL) throw std::invalid_argument("signal " + std::to_string(sig) + " cannot be handled");
    throw_errno("sigaction(" + std::to_string(sig) + ")");
  }
}

ASYNC_UTILS_LINK struct sigaction signal_source::forwarding_action() noexcept {
  struct sigaction action{};
  action.sa_handler = &on_signal;
  sigfillset(&action.sa_mask);  // one handler at a time per thread; keeps it simple
  action.sa_flags = SA_RESTART;
  return action;
}

ASYNC_UTILS_LINK void signal_source::install(int sig, saved_state& saved) {
  [[maybe_unused]] auto& slot = signal_state().slots[static_cast<std::size_t>(sig)];
  const struct sigaction action = forwarding_action();
#if defined(ASYNC_UTILS_SIGNALS_SIGNALFD)
  // Block first, then install the forwarding handler: the loop thread never runs it.
  sigset_t one, old;
  sigemptyset(&one);
  sigaddset(&one, sig);
  if (int err = ::pthread_sigmask(SIG_BLOCK, &one, &old)) throw_errno(err, "pthread_sigmask");
  saved.was_blocked = sigismember(&old, sig) == 1;
  try {
    sigset_t wanted = signalfd_mask();
    sigaddset(&wanted, sig);
    if (::signalfd(fd_.get(), &wanted, 0) == -1) throw_errno("signalfd(update)");
    slot.thread.store(pthread_self());
    slot.has_thread.store(true);
    try {
      set_action(sig, &action, &saved.action);
    } catch (...) {
      slot.has_thread.store(false);
      sigset_t back = signalfd_mask();
      ::signalfd(fd_.get(), &back, 0);
      throw;
    }
  } catch (...) {
    if (!saved.was_blocked) ::pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
    throw;
  }
#elif defined(ASYNC_UTILS_SIGNALS_KQUEUE)
  set_action(sig, &action, &saved.action);
  struct kevent ev;
  EV_SET(&ev, static_cast<uintptr_t>(sig), EVFILT_SIGNAL, EV_ADD, 0, 0, nullptr);
  if (::kevent(fd_.get(), &ev, 1, nullptr, 0, nullptr) == -1) {
    const int err = errno;
    ::sigaction(sig, &saved.action, nullptr);
    throw_errno(err, "kevent(EVFILT_SIGNAL)");
  }
#else
  slot.pending.store(false);
  slot.wake_fd.store(write_.get());
  try {
    set_action(sig, &action, &saved.action);
  } catch (...) {
    slot.wake_fd.store(-1);
    throw;
  }
#endif
}

ASYNC_UTILS_LINK void signal_source::uninstall(const saved_state& saved) noexcept {
  const int sig = saved.sig;
#if defined(ASYNC_UTILS_SIGNALS_SIGNALFD)
  sigset_t rest = signalfd_mask();  // saved_ no longer lists sig
  ::signalfd(fd_.get(), &rest, 0);
  ::sigaction(sig, &saved.action, nullptr);
  // Discard instances still pending for this thread or the process, so that unblocking does
  // not hand them to the restored disposition (which may be "terminate").
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, sig);
  const timespec zero{};
  while (::sigtimedwait(&one, nullptr, &zero) == sig) {
  }
  if (!saved.was_blocked) ::pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
#elif defined(ASYNC_UTILS_SIGNALS_KQUEUE)
  struct kevent ev;
  EV_SET(&ev, static_cast<uintptr_t>(sig), EVFILT_SIGNAL, EV_DELETE, 0, 0, nullptr);
  ::kevent(fd_.get(), &ev, 1, nullptr, 0, nullptr);
  ::sigaction(sig, &saved.action, nullptr);
#else
  ::sigaction(sig, &saved.action, nullptr);
#endif
}
#endif  // ASYNC_UTILS_DEFINITIONS

#if ASYNC_UTILS_DEFINITIONS
/// Starts a thread with every signal blocked, so that process-directed signals never land on
/// it (worker threads of the executor). The caller's mask is untouched afterwards. Used by
/// definitions only.
template <class F>
std::thread start_thread_without_signals(F&& fn) {
  sigset_t all, old;
  sigfillset(&all);
  if (int err = ::pthread_sigmask(SIG_SETMASK, &all, &old)) throw_errno(err, "pthread_sigmask");
  struct restore {
    sigset_t mask;
    ~restore() { ::pthread_sigmask(SIG_SETMASK, &mask, nullptr); }
  } guard{old};
  return std::thread(std::forward<F>(fn));
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils::detail
