// event_loop: asyncio's loop. Ready jobs, timers, descriptors, cross-thread posts, the
// exception handler; one loop runs per thread at a time.
#pragma once

#include "../platform/config.hpp"
#include "../platform/log.hpp"
#include "../platform/posix.hpp"
#include "../platform/backend.hpp"
#include "../platform/thread_pool.hpp"
#include "test_support.hpp"
#include "intrusive_list.hpp"
#include "job_queue.hpp"
#include "timer_heap.hpp"
#include "future_core.hpp"
#include "any_task.hpp"
#include "handle.hpp"

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>
#include <sys/socket.h>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "frame_cache.hpp"

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
  /// The wait did not come from an operation that hit EAGAIN (wait_readable/writable): on an
  /// edge-triggered backend the loop must look at the current readiness before waiting.
  bool level = false;
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
  bool level_check = false;  // edge-triggered backend: look at the readiness again when re-arming
  bool unconfirmed = false;  // edge-triggered backend: waited on without a syscall and no report since
  bool listed = false;       // in the loop's list of descriptors to confirm
  std::uint32_t round = 0;   // the confirmation round in which that wait began
  // What the last operation learnt of the socket's queues (io.hpp, socket_receive/socket_send):
  // io_read when the receive queue was empty after it, io_write when the send buffer was full.
  // The next operation in that direction waits for the backend's next report instead of trying
  // (a try would fail with EAGAIN); a report in that direction clears the bit.
  unsigned drained = 0;
  std::uint8_t socket_kind = 0;  // io.hpp's socket_kinds: unknown, other, TCP, TCP with TCP_INQ
  unsigned wanted() const noexcept {
    return ((reader || !readers.empty()) ? io_read : 0u) | ((writer || !writers.empty()) ? io_write : 0u);
  }
};

// future_core's out-of-line members (task_steps.hpp, which includes this file) are called by
// the loop's definitions, so tests/self_contained.py links this part together with them:
// Links with: runtime/task_steps.hpp

struct signal_registry;  // signals.hpp
struct executor_slot;    // executor.hpp
template <class T>
using erased_ptr = std::unique_ptr<T, void (*)(T*)>;

inline thread_local event_loop* running_loop = nullptr;

/// Backends whose registrations stay and report edges (epoll): waits after EAGAIN cost no syscall.
template <class B>
inline constexpr bool edge_triggered_backend = requires { requires B::edge_triggered; };

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
  bool on_loop_thread() const noexcept;
  /// Cancels nothing: ends pending tasks (destroying their coroutines), drops queued callbacks,
  /// removes signal handlers, shuts the executor down. Throws if the loop is running.
  void close();
  bool is_closed() const noexcept { return closed_; }
  /// The loop's monotonic clock.
  time_point time() const noexcept { return clock::now(); }
  /// The I/O backend this loop runs on: "epoll", "poll", "kqueue" or "io_uring" ("epoll" when
  /// io_uring was selected but the kernel refused it).
  const char* backend_name() const noexcept;

  handle call_soon(std::function<void()> fn);
  /// The only method safe from any thread; wakes the loop if it sleeps.
  handle call_soon_threadsafe(std::function<void()> fn);
  /// Runs fn after `delay` (any std::chrono unit; negative counts as zero). A delay past the
  /// clock's range (hours::max(), duration::max()) never fires and disturbs no other timer.
  template <class Rep, class Period>
  handle call_later(std::chrono::duration<Rep, Period> delay, std::function<void()> fn) {
    return call_at(detail::saturating_deadline(delay), std::move(fn));
  }
  /// Runs fn at loop time `when`; time_point::max() is never.
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

  // Executor (executor.hpp): asyncio's run_in_executor(None, fn, *args) and friends.
  template <class F, class... Args>
    requires(!std::is_base_of_v<executor, std::remove_cvref_t<F>>)
  auto run_in_executor(F fn, Args... args);
  template <class F, class... Args>
  auto run_in_executor(executor& where, F fn, Args... args);
  void set_default_executor(std::shared_ptr<executor> e);
  void set_default_executor(std::size_t max_workers);
  coroutine<void> shutdown_default_executor();
  /// Waits for the default executor's jobs and joins its threads (used by run() and close()).
  void shutdown_default_executor_now();

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
  /// post() for a caller that keeps the loop alive across the call by other means (loop_link
  /// holds the lock that the loop's close() takes): the wake-up is sent after the unlock.
  bool post_held(detail::job j);
  /// Loop thread: a post is on its way (an executor job was submitted); until it arrives the
  /// loop spins briefly before it sleeps, when spinning can pay (detail::may_spin).
  void expect_post() noexcept;
  void expected_post_arrived() noexcept { expected_posts_ -= (expected_posts_ != 0); }
  detail::future_core* running_task() const noexcept { return current_; }
  void add_timer(detail::timer_node& node, time_point when);
  void remove_timer(detail::timer_node& node) noexcept { timers_.remove(node); }
  /// Waits for readiness of fd; wake-ups go through waiter.ready.
  void add_io_waiter(int fd, unsigned bit, detail::io_waiter& waiter);
  /// A waiter left fd's lists without a report (cancelled): the loop looks at fd again.
  void io_waiter_withdrawn(int fd) noexcept;
  /// fd is a descriptor opened just now (sock_accept): a record kept under its number is stale.
  void descriptor_opened(int fd) noexcept;
  /// The loop's record of fd, or null when nothing waits on it (nodes stay put until erased,
  /// which happens only in rearm()). The sock_* operations keep what they learn in it.
  detail::fd_watch* io_record(int fd) noexcept;
  /// Permanent read watch run synchronously on the loop thread (signal descriptors).
  void watch_internal(int fd, void (*fn)(void*), void* context);
#ifdef ASYNC_UTILS_BACKEND_IO_URING
  /// The io_uring backend when it runs as such (completion-based I/O), null after a fallback.
  detail::io_uring_backend* uring() noexcept { return backend_.completions() ? &backend_ : nullptr; }
#endif
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
  void forget_if_idle(std::unordered_map<int, detail::fd_watch>::iterator it) noexcept;
  bool backend_busy() const noexcept;
  void confirm_registrations();
  /// Wakes the loop out of the sleep a poster saw it in (state: a value of sleeping_).
  void wake(std::uint32_t state) noexcept;
  void park_for(std::chrono::nanoseconds timeout) noexcept;
  static constexpr bool edge_ = detail::edge_triggered_backend<detail::io_backend>;
  /// How long a wait taken on trust (no syscall) may go before the loop checks the registration.
  static constexpr std::chrono::milliseconds confirm_after_{50};

  detail::io_backend backend_;
  detail::wakeup_fd wakeup_;
  detail::job_queue ready_;
  detail::timer_heap timers_;
  // Keyed by descriptor: storage follows the descriptors in use, not the largest number (a
  // table indexed by descriptor grew to 785 MB for add_reader(100000000)). Nodes never move.
  std::unordered_map<int, detail::fd_watch> fds_;
  std::vector<int> dirty_;
  // Edge-triggered backend: descriptors waited on without a syscall, trusting the registration
  // made before. If the descriptor was closed and its number reused in between, the kernel
  // dropped that registration; the loop re-arms at confirm_at_ those with no report since.
  std::vector<int> unconfirmed_;
  time_point confirm_at_{};
  std::uint32_t confirm_round_ = 0;
  std::size_t polled_ = 0;  // armed descriptors plus internal watches other than the wake-up

  std::mutex posted_mutex_;
  detail::job_queue posted_;
  std::atomic<bool> posted_pending_{false};
  // Where the loop sleeps, so that a poster wakes it only when it sleeps, and the right way.
  static constexpr std::uint32_t awake = 0;
  static constexpr std::uint32_t polling = 1;  // in the backend's wait: the wake-up descriptor
  static constexpr std::uint32_t parked = 2;   // parked on this word (nothing to poll)
  detail::park_word sleeping_{awake};
  std::atomic<bool> accepting_posts_{true};
  std::size_t expected_posts_ = 0;
  time_point expected_since_{};
  /// How long after the last expect_post() the loop spins for a post before it sleeps.
  static constexpr std::chrono::microseconds expect_spin_{30};
  detail::adaptive_spin post_spin_;

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

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK bool event_loop::on_loop_thread() const noexcept {
  return detail::running_loop == this || (!running_ && owner_.load() == std::this_thread::get_id());
}

ASYNC_UTILS_LINK const char* event_loop::backend_name() const noexcept {
#ifdef ASYNC_UTILS_BACKEND_IO_URING
  return backend_.active_name();
#else
  return detail::io_backend::name;
#endif
}

ASYNC_UTILS_LINK void event_loop::expect_post() noexcept {
  ++expected_posts_;
  expected_since_ = clock::now();
}

ASYNC_UTILS_LINK void event_loop::add_timer(detail::timer_node& node, time_point when) {
  node.when = when;
  timers_.push(node);
}

ASYNC_UTILS_LINK detail::fd_watch* event_loop::io_record(int fd) noexcept {
  auto it = fds_.find(fd);
  return it == fds_.end() ? nullptr : &it->second;
}

ASYNC_UTILS_LINK bool event_loop::backend_busy() const noexcept {
#ifdef ASYNC_UTILS_BACKEND_IO_URING
  return backend_.busy();
#else
  return false;
#endif
}
#endif  // ASYNC_UTILS_DEFINITIONS

// ---- event_loop ------------------------------------------------------------------------------

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK event_loop::event_loop() {
  watch_internal(wakeup_.fd(), [](void* self) { static_cast<event_loop*>(self)->wakeup_.drain(); }, this);
  --polled_;  // cross-thread posts are seen through posted_pending_ without polling
}

ASYNC_UTILS_LINK event_loop::~event_loop() {
  // Destroying a running loop (from one of its own callbacks) cannot be made safe.
  if (running_) std::terminate();
  close();
}
#endif  // ASYNC_UTILS_DEFINITIONS

inline event_loop& event_loop::current() {
  if (!detail::running_loop) throw std::runtime_error("no running event loop");
  return *detail::running_loop;
}

inline void event_loop::check_open() const {
  if (closed_) throw std::runtime_error("event loop is closed");
}

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void event_loop::run_forever() {
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
ASYNC_UTILS_LINK void event_loop::run_once() {
  take_posted();
  if (edge_ && !unconfirmed_.empty() && clock::now() >= confirm_at_) confirm_registrations();
  rearm();
  std::chrono::nanoseconds timeout{-1};
  if (!ready_.empty() || stopping_) {
    timeout = std::chrono::nanoseconds{0};
  } else if (!timers_.empty() && timers_.top_when() != detail::never) {
    // Only timers that never fire left: wait without a timeout, as with no timer at all.
    timeout = detail::time_until(timers_.top_when(), clock::now());
  }
  if (edge_ && !unconfirmed_.empty() && timeout.count() != 0) {
    const auto until_check = detail::time_until(confirm_at_, clock::now());
    if (timeout.count() < 0 || until_check < timeout) timeout = until_check;
  }
  if (timeout.count() != 0 && expected_posts_ != 0 && detail::may_spin()) {
    // An executor job submitted a moment ago is likely done within microseconds: wait for its
    // post by spinning rather than sleeping (no wake-up to send, none to take). Only for a while
    // after the submission, so that a long job does not make every iteration spin.
    auto window = detail::time_until(expected_since_ + expect_spin_, clock::now());
    if (timeout.count() > 0 && timeout < window) window = timeout;
    if (window.count() > 0 && post_spin_.wait([this] { return posted_pending_.load(std::memory_order_relaxed); }, window))
      timeout = std::chrono::nanoseconds{0};
  }
  // A busy loop with no descriptor to watch (and no request in flight) skips the syscall entirely.
  if (detail::timed_park && timeout.count() != 0 && polled_ == 0 && !backend_busy()) {
    // Nothing to poll, only posts (executor completions, call_soon_threadsafe) or a timer to
    // wait for: sleep on a futex word. Waking it is one system call, where the wake-up
    // descriptor costs three (the poster's write, the loop's wait and its draining read).
    sleeping_.store(parked);
    if (!posted_pending_.load()) park_for(timeout);
    sleeping_.store(awake, std::memory_order_relaxed);
    take_posted();
  } else if (timeout.count() != 0 || polled_ > 0 || backend_busy()) {
    if (timeout.count() != 0) {
      sleeping_.store(polling);
      if (posted_pending_.load()) timeout = std::chrono::nanoseconds{0};
    }
    backend_.wait(timeout, [this](int fd, unsigned bits) { dispatch_io(fd, bits); });
    sleeping_.store(awake, std::memory_order_relaxed);
    take_posted();
  }
  // asyncio appends the due timers' callbacks behind the jobs already ready: those jobs run
  // first, so a deadline that passed meanwhile cannot overtake a step queued before it (a new
  // task's first step, say). Due means due when the poll returned.
  const bool timers = !timers_.empty();
  const auto now = timers ? clock::now() : clock::time_point{};
  for (std::size_t n = ready_.size(); n > 0; --n) {
    detail::job j = ready_.pop();
    j.fn(j.arg, true);
  }
  if (timers) {
    while (!timers_.empty() && timers_.top_when() <= now) {
      detail::timer_node& node = timers_.pop();
      node.fire(&node, true);
    }
  }
}

ASYNC_UTILS_LINK void event_loop::take_posted() {
  if (!posted_pending_.load(std::memory_order_acquire)) return;
  std::lock_guard guard(posted_mutex_);
  posted_pending_.store(false, std::memory_order_relaxed);
  ready_.splice(posted_);
}

ASYNC_UTILS_LINK bool event_loop::post(detail::job j) {
  // All of it under the lock: once the job is queued the loop may run it, finish and be
  // destroyed, so nothing of the loop may be touched after the unlock (the wake-up used to be
  // sent after it). The loop takes posted jobs, and close() stops taking posts, under this lock.
  std::lock_guard guard(posted_mutex_);
  if (!accepting_posts_.load(std::memory_order_relaxed)) return false;
  posted_.push(j);
  const bool first = !posted_pending_.exchange(true);
  // Pairs with run_once: it sets sleeping_ then reads posted_pending_; we did the reverse.
  if (first) wake(sleeping_.load());
  return true;
}

ASYNC_UTILS_LINK void event_loop::wake(std::uint32_t state) noexcept {
  if (state == polling) {
    wakeup_.notify();
  } else if (state == parked) {
    // Changing the word makes a loop that has not parked yet return at once. Only from
    // parked: post_held() looked at the state before its unlock, and by now the loop may sleep
    // in the backend (clearing that state would make the next poster skip its wake-up); a
    // later park that this ends is a spurious wake-up, which the loop tolerates.
    std::uint32_t expected = parked;
    if (sleeping_.compare_exchange_strong(expected, awake)) detail::unpark(sleeping_, 1);
  }
}

ASYNC_UTILS_LINK void event_loop::park_for(std::chrono::nanoseconds timeout) noexcept {
#if defined(__linux__)
  detail::park(sleeping_, parked, timeout);
#else
  (void)timeout;  // not reached: timed_park is false
#endif
}

ASYNC_UTILS_LINK void event_loop::confirm_registrations() {
  // Only waits that began before the previous round and saw no report since are checked: a
  // descriptor in steady use is never re-armed, a forgotten registration is found within two
  // rounds. Re-arming re-registers a descriptor the kernel dropped (epoll_backend::arm).
  std::size_t keep = 0;
  for (int fd : unconfirmed_) {
    auto it = fds_.find(fd);
    if (it == fds_.end() || !it->second.listed) continue;
    detail::fd_watch& w = it->second;
    if (w.unconfirmed && w.wanted() && w.round == confirm_round_) {
      unconfirmed_[keep++] = fd;  // began in this round: looked at in the next one
      continue;
    }
    w.listed = false;
    if (std::exchange(w.unconfirmed, false) && w.wanted()) {
      w.level_check = true;
      mark_dirty(fd, w);
    }
  }
  unconfirmed_.resize(keep);
  ++confirm_round_;
  if (keep) confirm_at_ = clock::now() + confirm_after_;
}

ASYNC_UTILS_LINK bool event_loop::post_held(detail::job j) {
  std::uint32_t state = awake;
  {
    std::lock_guard guard(posted_mutex_);
    if (!accepting_posts_.load(std::memory_order_relaxed)) return false;
    posted_.push(j);
    if (!posted_pending_.exchange(true)) state = sleeping_.load();  // as in post()
  }
  wake(state);
  return true;
}

ASYNC_UTILS_LINK detail::fd_watch& event_loop::watch_of(int fd) {
  if (auto it = fds_.find(fd); it != fds_.end()) {
    detail::fd_watch& w = it->second;
    if (!w.known && !w.internal) {
      backend_.add(fd);
      w.known = true;
    }
    return w;
  }
  // First sight: the descriptor is checked (EBADF for a negative, closed or huge number)
  // before anything is stored for it.
  detail::require_open_fd(fd, "event loop");
  backend_.add(fd);
  detail::fd_watch& w = fds_.try_emplace(fd).first->second;
  w.known = true;
  return w;
}

ASYNC_UTILS_LINK void event_loop::mark_dirty(int fd, detail::fd_watch& w) {
  if (!w.dirty) {
    w.dirty = true;
    dirty_.push_back(fd);
  }
}

ASYNC_UTILS_LINK void event_loop::add_io_waiter(int fd, unsigned bit, detail::io_waiter& waiter) {
  check_open();
  if constexpr (edge_) {
    // The registration stays: after EAGAIN the next edge is reported without any syscall. A wait
    // that needs the current level (wait_readable/writable) re-arms. A registration known from
    // before is trusted now and checked within confirm_after_ (its number may have been reused).
    auto it = fds_.find(fd);
    const bool known = it != fds_.end();
    detail::fd_watch& w = known && it->second.known ? it->second : watch_of(fd);
    if (known && !waiter.level && !w.unconfirmed) {
      if (!w.listed) {
        if (unconfirmed_.empty()) confirm_at_ = clock::now() + confirm_after_;
        unconfirmed_.push_back(fd);
        w.listed = true;
      }
      w.unconfirmed = true;
      w.round = confirm_round_;
    }
    (bit == detail::io_read ? w.readers : w.writers).push_back(waiter);
    if (!waiter.level) w.drained |= bit;  // it waits after EAGAIN: a second waiter need not try
    if (waiter.level) w.level_check = true;
    if (waiter.level || !(w.armed & bit)) mark_dirty(fd, w);
    return;
  }
  detail::fd_watch& w = watch_of(fd);
  auto& list = bit == detail::io_read ? w.readers : w.writers;
  const bool wanted_before = (w.wanted() & bit) != 0;
  list.push_back(waiter);
  if (!waiter.level) w.drained |= bit;  // it waits after EAGAIN: a second waiter need not try
  // Armed for nobody (its last waiter was cancelled): the descriptor may have been closed since
  // and its number reused, and the kernel then forgot the arming. Arm it anew.
  if (!wanted_before) forget_arming(w);
  if (!(w.armed & bit)) mark_dirty(fd, w);
}

ASYNC_UTILS_LINK void event_loop::io_waiter_withdrawn(int fd) noexcept {
  if constexpr (edge_) {
    // Without this the record would stay (and count as polled) until the descriptor is used again.
    auto it = fds_.find(fd);
    if (it == fds_.end()) return;
    try {
      mark_dirty(fd, it->second);
    } catch (const std::bad_alloc&) {  // only a late clean-up is lost
    }
  } else {
    (void)fd;
  }
}

ASYNC_UTILS_LINK void event_loop::descriptor_opened(int fd) noexcept {
  auto found = fds_.find(fd);
  if (found != fds_.end()) {  // nothing learnt about the old descriptor holds for the new one
    found->second.drained = 0;
    found->second.socket_kind = 0;
  }
  if constexpr (edge_) {
    auto it = found;
    if (it == fds_.end()) return;
    it->second.level_check = true;  // re-arming registers the new descriptor
    try {
      mark_dirty(fd, it->second);
    } catch (const std::bad_alloc&) {  // the confirmation sweep catches it later
    }
  } else {
    (void)fd;
  }
}

ASYNC_UTILS_LINK void event_loop::forget_arming(detail::fd_watch& w) noexcept {
  polled_ -= (w.armed != 0);
  w.armed = 0;
}

ASYNC_UTILS_LINK void event_loop::rearm() {
  // Arming is deferred to here, so a wait that begins and ends within one iteration costs nothing.
  std::vector<int> failed;
  for (std::size_t i = 0; i < dirty_.size(); ++i) {
    const int fd = dirty_[i];
    auto it = fds_.find(fd);
    if (it == fds_.end()) continue;
    detail::fd_watch& w = it->second;
    w.dirty = false;
    const unsigned want = w.wanted();
    const bool check = std::exchange(w.level_check, false) && want != 0;
    if (want == w.armed && !check) {
      forget_if_idle(it);
      continue;
    }
    try {
      // Edge-triggered: registered already (watch_of); a syscall only for a level check.
      if (!edge_ || check) backend_.arm(fd, want);
    } catch (const std::system_error&) {
      polled_ -= (w.armed != 0);
      w.armed = 0;
      failed.push_back(fd);
      continue;
    }
    polled_ += (want != 0);
    polled_ -= (w.armed != 0);
    w.armed = want;
    forget_if_idle(it);
  }
  dirty_.clear();
  // A descriptor closed under us: wake its waiters so they retry and see the error, and run its
  // callbacks. Only now: what still wants the descriptor marks it again for the next iteration
  // (dispatching inside the loop above re-listed it there, and a reader callback spun forever).
  for (int fd : failed) dispatch_io(fd, detail::io_error | detail::io_read | detail::io_write);
}

ASYNC_UTILS_LINK void event_loop::forget_if_idle(std::unordered_map<int, detail::fd_watch>::iterator it) noexcept {
  // Nothing wants the descriptor and nothing is armed: its record goes (the epoll registration
  // left behind is disarmed; adding the descriptor again tolerates it).
  const detail::fd_watch& w = it->second;
  if (!w.internal && !w.armed && !w.dirty && !w.wanted()) fds_.erase(it);
}

ASYNC_UTILS_LINK void event_loop::dispatch_io(int fd, unsigned bits) noexcept {
  auto it = fds_.find(fd);
  if (it == fds_.end()) return;
  detail::fd_watch& w = it->second;
  if (w.internal) {
    w.internal(w.internal_context);
    return;
  }
  if constexpr (!edge_) {
    polled_ -= (w.armed != 0);
    w.armed = 0;  // a report disarms (one-shot)
  } else {
    w.unconfirmed = false;  // a report: the registration is alive
  }
  // A report in a direction: what a short read or send said about it is over (before the
  // waiters run: their retry may learn it anew, and a second waiter then waits for the next).
  if (bits & (detail::io_read | detail::io_error)) w.drained &= ~detail::io_read;
  if (bits & (detail::io_write | detail::io_error)) w.drained &= ~detail::io_write;
  auto wake = [bits](detail::intrusive_list<detail::io_waiter>& list) {
    list.for_each([bits](detail::io_waiter& x) {
      if (x.ready(&x, bits)) x.unlink();
    });
  };
  bool callback = false;
  if (bits & (detail::io_read | detail::io_error)) {
    wake(w.readers);
    if (w.reader) schedule(w.reader->as_job());
    callback = callback || w.reader;
  }
  if (bits & (detail::io_write | detail::io_error)) {
    wake(w.writers);
    if (w.writer) schedule(w.writer->as_job());
    callback = callback || w.writer;
  }
  if constexpr (edge_) {
    // Callbacks are level-triggered (asyncio's add_reader): told again while the level lasts.
    if (callback) w.level_check = true;
    if (callback || w.wanted() != w.armed) mark_dirty(fd, w);
  } else {
    if (w.wanted()) mark_dirty(fd, w);
  }
}

ASYNC_UTILS_LINK void event_loop::watch_internal(int fd, void (*fn)(void*), void* context) {
  backend_.watch(fd);
  detail::fd_watch& w = fds_.try_emplace(fd).first->second;
  w.internal = fn;
  w.internal_context = context;
  ++polled_;
}

ASYNC_UTILS_LINK void event_loop::unwatch_internal(int fd) noexcept {
  auto it = fds_.find(fd);
  if (it == fds_.end() || !it->second.internal) return;
  backend_.remove(fd);
  fds_.erase(it);
  --polled_;
}

ASYNC_UTILS_LINK void event_loop::set_callback(int fd, bool reader, std::function<void()> fn) {
  check_open();
  if (!fn) throw std::invalid_argument(reader ? "add_reader: empty callback" : "add_writer: empty callback");
  detail::fd_watch& w = watch_of(fd);
  backend_.add(fd);  // validates even a number seen before: it may have been closed since
  forget_arming(w);  // and if it was, the kernel forgot how it was armed
  w.level_check = true;
  detail::handle_state*& slot = reader ? w.reader : w.writer;
  auto* state = new detail::handle_state(this, std::move(fn));
  if (slot) {
    slot->cancelled = true;
    slot->release();
  }
  slot = state;
  mark_dirty(fd, w);
}

ASYNC_UTILS_LINK bool event_loop::clear_callback(int fd, bool reader) {
  auto it = fds_.find(fd);
  if (it == fds_.end()) return false;
  detail::fd_watch& w = it->second;
  detail::handle_state*& slot = reader ? w.reader : w.writer;
  if (!slot) return false;
  slot->cancelled = true;
  slot->release();
  slot = nullptr;
  mark_dirty(fd, w);
#ifdef ASYNC_UTILS_BACKEND_IO_URING
  // An io_uring poll request holds a reference to the file: without a disarm in the kernel now,
  // a caller that closes the descriptor next would not close it (a listener went on accepting).
  if (w.armed && !w.wanted()) {
    backend_.arm(fd, 0);
    backend_.submit_queued();
    forget_arming(w);
  }
#endif
  return true;
}

ASYNC_UTILS_LINK void event_loop::add_reader(int fd, std::function<void()> fn) { set_callback(fd, true, std::move(fn)); }
ASYNC_UTILS_LINK bool event_loop::remove_reader(int fd) { return clear_callback(fd, true); }
ASYNC_UTILS_LINK void event_loop::add_writer(int fd, std::function<void()> fn) { set_callback(fd, false, std::move(fn)); }
ASYNC_UTILS_LINK bool event_loop::remove_writer(int fd) { return clear_callback(fd, false); }

ASYNC_UTILS_LINK handle event_loop::call_soon(std::function<void()> fn) {
  check_open();
  if (!fn) throw std::invalid_argument("call_soon: empty callback");
  auto* state = new detail::handle_state(this, std::move(fn));
  handle h(state);
  schedule({&detail::handle_state::run_job, state});  // the job takes the creation reference
  return h;
}

ASYNC_UTILS_LINK handle event_loop::call_soon_threadsafe(std::function<void()> fn) {
  if (!fn) throw std::invalid_argument("call_soon_threadsafe: empty callback");
  auto* state = new detail::handle_state(this, std::move(fn));
  handle h(state);
  if (!post({&detail::handle_state::run_job, state})) {
    state->release();
    throw std::runtime_error("event loop is closed");
  }
  return h;
}

ASYNC_UTILS_LINK handle event_loop::call_at(time_point when, std::function<void()> fn) {
  check_open();
  if (!fn) throw std::invalid_argument("call_at: empty callback");
  auto* state = new detail::handle_state(this, std::move(fn));
  handle h(state);
  state->fire = [](detail::timer_node* node, bool run) {
    auto* s = static_cast<detail::handle_state*>(node);
    s->in_heap = false;
    // The callback runs now, in the iteration its deadline came due (the heap's reference goes
    // with the job, which drops it).
    detail::handle_state::run_job(s, run);
  };
  state->in_heap = true;
  add_timer(*state, when);  // the heap takes the creation reference
  return h;
}

ASYNC_UTILS_LINK void handle::cancel() noexcept {
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

ASYNC_UTILS_LINK void detail::handle_state::run_job(void* self, bool run) noexcept {
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

ASYNC_UTILS_LINK void event_loop::default_exception_handler(const exception_context& context) {
  std::string text = context.message.empty() ? "Unhandled exception in event loop" : context.message;
  if (context.task && *context.task) text += " (task " + context.task->name() + ")";
  if (context.exception) text += ": " + describe(context.exception);
  log(log_level::error, text);
}

ASYNC_UTILS_LINK void event_loop::call_exception_handler(const exception_context& context) noexcept {
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

ASYNC_UTILS_LINK void event_loop::close() {
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
  for (auto& [fd, w] : fds_) {
    for (auto* slot : {&w.reader, &w.writer}) {
      if (*slot) {
        (*slot)->cancelled = true;
        (*slot)->release();
        *slot = nullptr;
      }
    }
  }
  fds_.clear();
  dirty_.clear();
  unconfirmed_.clear();
  // Handles that outlive the loop must not reach back into it.
  while (detail::future_core* core = others_.pop_front()) core->loop_ = nullptr;
  detail::frame_cache_trim();  // the frames this thread recycled go back to the system
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <cerrno>
#include <climits>
#include <cstdio>
#include <netinet/in.h>
#include <sys/resource.h>
#include <thread>
namespace codestare::async_utils::testing {

/// The largest descriptor number a test may use, up to 1,000,000: raises the soft
/// RLIMIT_NOFILE as far as the hard one allows, for the object's lifetime.
class huge_fd_number {
 public:
  huge_fd_number() {
    ::getrlimit(RLIMIT_NOFILE, &saved_);
    rlim_t want = 1000001;
    if (saved_.rlim_max != RLIM_INFINITY && saved_.rlim_max < want) want = saved_.rlim_max;
    if (saved_.rlim_cur != RLIM_INFINITY && saved_.rlim_cur < want) {
      rlimit raised = saved_;
      raised.rlim_cur = want;
      if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) restore_ = true;
      else want = saved_.rlim_cur;
    }
    number_ = static_cast<int>(want - 1);
  }
  ~huge_fd_number() {
    if (restore_) ::setrlimit(RLIMIT_NOFILE, &saved_);
  }
  huge_fd_number(const huge_fd_number&) = delete;
  huge_fd_number& operator=(const huge_fd_number&) = delete;
  int number() const noexcept { return number_; }
  /// Moves fd to the huge number (dup2, then closes fd); -1 if that fails.
  int move(int fd) const noexcept {
    if (::dup2(fd, number_) != number_) return -1;
    ::close(fd);
    return number_;
  }

 private:
  rlimit saved_{};
  bool restore_ = false;
  int number_ = 0;
};

/// The process's peak resident size in KiB.
inline long peak_rss_kib() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss;
}

/// The errno of the std::system_error fn throws; 0 if it throws nothing, -1 for another exception.
template <class F>
int error_of(F&& fn) {
  try {
    fn();
  } catch (const std::system_error& e) {
    return e.code().value();
  } catch (...) {
    return -1;
  }
  return 0;
}

}  // namespace codestare::async_utils::testing

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

  TEST_CASE("an iteration runs the jobs ready before it, then the timers that came due (asyncio)") {
    // A callback blocks until two deadlines have passed, then queues two jobs: the next
    // iteration runs those jobs first, then the due timers in deadline order; what a timer
    // schedules runs on the iteration after, behind what the ready jobs scheduled.
    event_loop loop;
    std::string seen;
    loop.call_soon([&] {
      loop.call_later(1ms, [&] {
        seen += "T1 ";
        loop.call_soon([&] { seen += "from-T1 "; });
      });
      loop.call_later(2ms, [&] { seen += "T2 "; });
      std::this_thread::sleep_for(20ms);  // both deadlines pass while this job blocks
      loop.call_soon([&] {
        seen += "a ";
        loop.call_soon([&] { seen += "from-a "; });
      });
      loop.call_soon([&] { seen += "b "; });
    });
    loop.call_later(100ms, [&] { loop.stop(); });
    loop.run_forever();
    CHECK(seen == "a b T1 T2 from-a from-T1 ");
  }

  TEST_CASE("call_later with a huge delay never fires, freezes nothing, and other timers run") {
    // Regression: time() + duration::max() overflowed; hours::max() wrapped in the conversion.
    event_loop loop;
    int never_fired = 0;
    std::vector<int> order;
    std::vector<handle> nevers;
    nevers.push_back(loop.call_later(event_loop::duration::max(), [&] { ++never_fired; }));
    nevers.push_back(loop.call_later(std::chrono::hours::max(), [&] { ++never_fired; }));
    nevers.push_back(loop.call_later(std::chrono::seconds::max(), [&] { ++never_fired; }));
    nevers.push_back(loop.call_later(std::chrono::duration<double>(1e300), [&] { ++never_fired; }));
    nevers.push_back(loop.call_at(event_loop::time_point::max(), [&] { ++never_fired; }));
    for (auto& h : nevers) CHECK(h.when() == event_loop::time_point::max());
    loop.call_later(2ms, [&] { order.push_back(2); });
    loop.call_later(-5s, [&] { order.push_back(0); });  // negative: as 0, asyncio's rule
    loop.call_later(std::chrono::hours::min(), [&] { order.push_back(1); });
    loop.call_later(4ms, [&] {
      order.push_back(3);
      loop.stop();
    });
    loop.run_forever();
    CHECK(order == std::vector<int>{0, 1, 2, 3});
    CHECK(never_fired == 0);
    // Only never-timers left, and a cross-thread post: the loop must sleep without a timeout
    // computed from them, and still wake for the post.
    std::thread poster([&] {
      std::this_thread::sleep_for(2ms);
      loop.call_soon_threadsafe([&] { loop.stop(); });
    });
    loop.run_forever();
    poster.join();
    CHECK(never_fired == 0);
    nevers[0].cancel();
    CHECK(nevers[0].cancelled());
    loop.close();
    CHECK(never_fired == 0);
  }

  TEST_CASE("backend_name() names the backend the loop runs on (printed for the test runner)") {
    event_loop loop;
    const std::string name = loop.backend_name();
#if defined(ASYNC_UTILS_BACKEND_IO_URING)
    CHECK((name == "io_uring" || name == "epoll"));  // epoll: the kernel refused io_uring
    {
      detail::io_uring_forced_errno = EPERM;  // a refused io_uring: this loop falls back
      testing::log_capture quiet;
      event_loop fallback;
      detail::io_uring_forced_errno = 0;
      CHECK(std::string(fallback.backend_name()) == "epoll");
    }
#elif defined(ASYNC_UTILS_BACKEND_EPOLL)
    CHECK(name == "epoll");
#elif defined(ASYNC_UTILS_BACKEND_KQUEUE)
    CHECK(name == "kqueue");
#else
    CHECK(name == "poll");
#endif
    // tests/run_tests.sh reads this line to say which backend each run used.
    std::printf("[async_utils] backend: %s\n", name.c_str());
    std::fflush(stdout);
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

  TEST_CASE("a post from another thread wakes the loop asleep on its word (nothing to poll) or in the backend (a reader)") {
    for (const bool with_reader : {false, true}) {
      event_loop loop;
      int fds[2] = {-1, -1};
      REQUIRE(::pipe(fds) == 0);
      if (with_reader) loop.add_reader(fds[0], [] {});
      constexpr int rounds = 2000;
      std::atomic<int> acked{0};
      std::atomic<bool> gave_up{false};
      int runs = 0;
      // One post at a time, each sent once the loop ran the previous one: most find it asleep.
      std::thread poster([&] {
        for (int i = 0; i < rounds && !gave_up; ++i) {
          loop.call_soon_threadsafe([&] {
            acked.store(++runs);
            if (runs == rounds) loop.stop();
          });
          while (acked.load() != i + 1 && !gave_up) std::this_thread::yield();
        }
      });
      auto guard = loop.call_later(30s, [&] {  // bound: fail, never hang
        gave_up = true;
        loop.stop();
      });
      auto early = loop.call_later(1ms, [] {});  // a timed sleep among them
      loop.run_forever();
      gave_up = true;
      poster.join();
      CHECK(runs == rounds);
      if (with_reader) loop.remove_reader(fds[0]);
      ::close(fds[0]);
      ::close(fds[1]);
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

  // A listener watched by a reader callback, removed and closed: it must refuse connections at
  // once (io_uring's poll request held the file open until the next iteration, and it accepted).
  TEST_CASE("remove_reader then close: the descriptor is really closed") {
    event_loop loop;
    const int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(listener >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(listener, 8) == 0);
    REQUIRE(::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
    loop.add_reader(listener, [] {});
    loop.call_soon([&] { loop.call_soon([&] { loop.stop(); }); });
    loop.run_forever();  // two iterations: the reader is armed in the kernel
    CHECK(loop.remove_reader(listener));
    ::close(listener);
    const int client = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(client >= 0);
    CHECK(::connect(client, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == -1);
    CHECK(errno == ECONNREFUSED);
    ::close(client);
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

  TEST_CASE("add_reader / add_writer: negative, closed and huge descriptors get EBADF at once") {
    // Regression: add_reader(100000000) grew a per-descriptor table to 785 MB before failing,
    // add_reader(INT_MAX) threw bad_alloc.
    event_loop loop;
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    ::close(fds[1]);
    const int closed = fds[1];
    const long rss_before = testing::peak_rss_kib();
    for (int fd : {-1, -100, INT_MIN, closed, 100000000, INT_MAX - 1, INT_MAX}) {
      CHECK_MESSAGE(testing::error_of([&] { loop.add_reader(fd, [] {}); }) == EBADF, "fd " << fd);
      CHECK_MESSAGE(testing::error_of([&] { loop.add_writer(fd, [] {}); }) == EBADF, "fd " << fd);
      CHECK_FALSE(loop.remove_reader(fd));
      CHECK_FALSE(loop.remove_writer(fd));
    }
    CHECK(testing::peak_rss_kib() - rss_before < 64 * 1024);  // no table sized by the number
    // The loop is unharmed: the good descriptor still works.
    bool read = false;
    loop.add_reader(fds[0], [&] {
      read = true;
      loop.stop();
    });
    auto guard = loop.call_later(10s, [&] { loop.stop(); });
    loop.run_forever();  // the write end is closed: readable (EOF) at once
    CHECK(read);
    CHECK(loop.remove_reader(fds[0]));
    ::close(fds[0]);
  }

  TEST_CASE("a valid descriptor with a huge number (dup2 to 1000000 where the limit allows) works") {
    testing::huge_fd_number huge;
    MESSAGE("descriptor number " << huge.number());
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    const int rfd = huge.move(fds[0]);
    REQUIRE(rfd == huge.number());
    const long rss_before = testing::peak_rss_kib();
    {
      event_loop loop;
      int calls = 0;
      loop.add_reader(rfd, [&] {
        char c;
        CHECK(::read(rfd, &c, 1) == 1);
        if (++calls == 2) loop.stop();
      });
      loop.add_writer(fds[1], [&] {
        CHECK(::write(fds[1], "ab", 2) == 2);
        loop.remove_writer(fds[1]);
      });
      auto guard = loop.call_later(10s, [&] { loop.stop(); });
      loop.run_forever();
      CHECK(calls == 2);
      CHECK(loop.remove_reader(rfd));
      // Added and removed over and over: nothing accumulates.
      for (int i = 0; i < 1000; ++i) {
        loop.add_writer(fds[1], [] {});
        loop.remove_writer(fds[1]);
      }
    }
    CHECK(testing::peak_rss_kib() - rss_before < 16 * 1024);
    ::close(rfd);
    ::close(fds[1]);
  }

}
#endif
