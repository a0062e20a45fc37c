// The io_uring backend: readiness through poll requests on a ring driven by raw system calls,
// with one io_uring_enter per loop iteration that both submits and waits. Epoll if refused.
#pragma once

#include "config.hpp"
#include "posix.hpp"
#include "log.hpp"
#include "backend_epoll.hpp"

#ifdef ASYNC_UTILS_BACKEND_IO_URING
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <linux/io_uring.h>
#include <optional>
#include <poll.h>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unordered_map>
#include <vector>

namespace codestare::async_utils::detail {

/// Tests set an errno here to make the next io_uring_setup "fail" with it (the fallback path).
inline std::atomic<int> io_uring_forced_errno{0};

/// A completion-based request (recv, send, accept, connect submitted as such): lives in its
/// awaiter, which must keep it (and the memory the request names) until the backend is done
/// with it: forget() before the awaiter goes guarantees that.
struct uring_op {
  enum class state : unsigned char { idle, in_flight, completed };
  /// Runs on the loop thread, from wait(), once the completion is there (res set, op idle).
  void (*complete)(uring_op*) noexcept = nullptr;
  uring_op* prev = nullptr;  // in-flight list
  uring_op* next = nullptr;
  int res = 0;
  state st = state::idle;
  bool cancel_sent = false;  // an IORING_OP_ASYNC_CANCEL for this request went out
};

/// Same contract as the epoll backend: arm(fd, mask) submits one one-shot poll request, a
/// report disarms it. Permanent watches are multishot polls (re-submitted if the kernel ends
/// them). A request's user_data carries the fd and a generation, so the completion of a
/// request that was replaced or removed meanwhile is recognised and dropped.
class io_uring_backend {
 public:
  static constexpr const char* name = "io_uring";

  io_uring_backend();
  ~io_uring_backend();
  io_uring_backend(const io_uring_backend&) = delete;
  io_uring_backend& operator=(const io_uring_backend&) = delete;

  /// "io_uring", or "epoll" when this loop fell back.
  const char* active_name() const noexcept { return fallback_ ? epoll_backend::name : name; }
  /// Whether operations may be submitted as such (false after a fallback to epoll).
  bool completions() const noexcept { return !fallback_; }
  /// Whether wait() must run even when the loop has nothing to poll: requests in flight, queued
  /// or completed but not yet dispatched.
  bool busy() const noexcept { return !fallback_ && (in_flight_ != nullptr || unsubmitted() != 0 || !completed_.empty()); }
  /// Hands what is queued to the kernel now, without waiting for anything: a disarm that must
  /// land before the caller closes the descriptor. Whatever the kernel does not take now goes
  /// with the next iteration's enter.
  void submit_queued() noexcept;


  /// Queues `op` as a request that fill(sqe) describes; submitted with the next wait().
  template <class F>
  void submit(uring_op& op, F&& fill) {
    io_uring_sqe& sqe = next_sqe();
    fill(sqe);
    sqe.user_data = reinterpret_cast<std::uintptr_t>(&op) | 1u;  // odd: a request, not a poll
    publish();
    op.st = uring_op::state::in_flight;
    op.cancel_sent = false;
    op.prev = nullptr;
    op.next = in_flight_;
    if (in_flight_) in_flight_->prev = &op;
    in_flight_ = &op;
  }
  /// Asks the kernel to cancel `op` (IORING_OP_ASYNC_CANCEL); its completion still comes
  /// (-ECANCELED, or the result if it won the race) and is dispatched as usual.
  void cancel(uring_op& op);
  /// The awaiter of `op` is going away: afterwards the kernel holds nothing of it. A request in
  /// flight is cancelled and its completion awaited here (socket requests cancel at once; the
  /// wait is bounded). True when a completion was taken that op.complete never saw (`res`).
  bool forget(uring_op& op) noexcept;

  /// Bytes a recv received for a waiter that was cancelled or destroyed: the next recv on the
  /// same socket gets them first. Keyed by descriptor and checked against the socket's identity,
  /// so a closed descriptor whose number was reused does not see them.
  void stash(int fd, const char* data, std::size_t n) noexcept;
  /// Moves up to `size` stashed bytes of fd into data; -1 when there are none.
  long take_stash(int fd, char* data, std::size_t size) noexcept;

  void add(int fd);
  void arm(int fd, unsigned mask);
  void remove(int fd) noexcept;
  void watch(int fd);

  /// Submits what arm() queued and waits up to `timeout` (negative: forever), in one call.
  template <class F>
  void wait(std::chrono::nanoseconds timeout, F&& on_event) {
    if (fallback_) return fallback_->wait(timeout, std::forward<F>(on_event));
    enter(reported_.empty() && completed_.empty() ? timeout : std::chrono::nanoseconds{0});
    reap();
    dispatching_.swap(reported_);
    reported_.clear();
    for (const auto& r : dispatching_) on_event(r.fd, r.bits);
    if (!completed_.empty()) {
      dispatching_ops_.swap(completed_);
      completed_.clear();
      for (uring_op* op : dispatching_ops_) {
        if (op->st != uring_op::state::completed) continue;  // forgotten meanwhile
        op->st = uring_op::state::idle;
        op->complete(op);  // may submit it again, or destroy other awaiters (forget)
      }
      dispatching_ops_.clear();
    }
    // Permanent watches the kernel ended (no IORING_CQE_F_MORE) go back on the ring.
    for (int fd : resubmit_) {
      auto it = slots_.find(fd);
      if (it != slots_.end() && it->second.permanent && it->second.mask == 0)
        submit_poll(fd, it->second, io_read, true);
    }
    resubmit_.clear();
  }

 private:
  struct slot {
    unsigned mask = 0;  // armed bits; 0: no request in flight
    std::uint32_t gen = 0;
    bool permanent = false;
  };
  struct report {
    int fd;
    unsigned bits;
  };
  struct stashed {
    std::string bytes;
    dev_t dev = 0;
    ino_t ino = 0;
  };
  // user_data: a request's address with the low bit set (requests are aligned); a poll's
  // (generation << 33) | (fd << 1); 0 for the cancellations, whose completions say nothing.
  static constexpr std::uint64_t cancel_tag = 0;
  static std::uint64_t user_data(int fd, std::uint32_t gen) noexcept;
  std::uint32_t next_generation() noexcept;
  void unlink(uring_op& op) noexcept;

  static int sys_setup(unsigned entries, io_uring_params* p) noexcept;
  int sys_enter(unsigned to_submit, unsigned min_complete, unsigned flags, const void* arg, std::size_t argsz) noexcept;

  /// 0, or the errno that makes us fall back.
  int setup() noexcept;
  std::uint32_t* u32(std::uint32_t offset) const noexcept;
  void unmap() noexcept;

  unsigned unsubmitted() const noexcept;
  /// A free submission entry; a full queue is handed to the kernel first.
  io_uring_sqe& next_sqe();
  void publish() noexcept;

  void submit_poll(int fd, slot& s, unsigned mask, bool permanent);
  void cancel(int fd, slot& s);

  /// Submits what is queued and waits up to `timeout` for a completion (0: none, negative:
  /// forever); `must_wait` waits even when completions are already there (forget's loop).
  void enter(std::chrono::nanoseconds timeout, bool must_wait = false);

  /// Appends the completions to reported_ (dispatched by wait, once the ring is consistent).
  void reap();

  std::optional<epoll_backend> fallback_;
  unique_fd ring_;
  char* ring_mem_ = nullptr;
  std::size_t ring_size_ = 0, sqes_size_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  io_uring_cqe* cqes_ = nullptr;
  std::uint32_t *sq_head_ = nullptr, *sq_tail_ = nullptr, *sq_flags_ = nullptr;
  std::uint32_t *cq_head_ = nullptr, *cq_tail_ = nullptr;
  std::uint32_t sq_mask_ = 0, cq_mask_ = 0, sq_entries_ = 0, local_tail_ = 0;
  std::uint32_t generation_ = 0;
  bool multishot_ = true;
  std::unordered_map<int, slot> slots_;
  std::vector<report> reported_, dispatching_;
  std::vector<int> resubmit_;
  uring_op* in_flight_ = nullptr;
  std::vector<uring_op*> completed_, dispatching_ops_;
  std::unordered_map<int, stashed> stash_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK io_uring_backend::io_uring_backend() {
  if (int err = setup(); err != 0) {
    // The kernel said no (ENOSYS, EPERM from the sysctl or seccomp, or too old): epoll.
    static std::atomic<bool> logged{false};
    if (io_uring_forced_errno.load() != 0 || !logged.exchange(true))
      log(log_level::debug, std::string("io_uring unavailable (") + std::strerror(err) + "), falling back to epoll");
    fallback_.emplace();
  }
}

ASYNC_UTILS_LINK io_uring_backend::~io_uring_backend() {
  // Awaiters forget their requests before they go; whatever is still in flight is cancelled
  // and awaited, so that the kernel writes into no freed memory.
  while (in_flight_) forget(*in_flight_);
  unmap();
}

ASYNC_UTILS_LINK void io_uring_backend::submit_queued() noexcept {
  if (fallback_ || unsubmitted() == 0) return;
  (void)sys_enter(unsubmitted(), 0, 0, nullptr, 0);
}

ASYNC_UTILS_LINK void io_uring_backend::cancel(uring_op& op) {
  if (op.st != uring_op::state::in_flight || op.cancel_sent) return;
  io_uring_sqe& sqe = next_sqe();
  sqe.opcode = IORING_OP_ASYNC_CANCEL;
  sqe.fd = -1;
  sqe.addr = reinterpret_cast<std::uintptr_t>(&op) | 1u;
  sqe.user_data = cancel_tag;
  publish();
  op.cancel_sent = true;
}

ASYNC_UTILS_LINK bool io_uring_backend::forget(uring_op& op) noexcept {
  if (op.st == uring_op::state::completed) {
    auto it = std::find(completed_.begin(), completed_.end(), &op);
    if (it != completed_.end()) completed_.erase(it);
    op.st = uring_op::state::idle;  // a dispatch list that still holds it skips idle ops
    return true;
  }
  if (op.st != uring_op::state::in_flight) return false;
  try {
    cancel(op);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (op.st == uring_op::state::in_flight) {
      if (std::chrono::steady_clock::now() > deadline) {
        log(log_level::error, "io_uring: a cancelled request did not complete; its memory is released anyway");
        unlink(op);
        op.st = uring_op::state::idle;
        return false;
      }
      enter(std::chrono::milliseconds(100), true);
      reap();
    }
  } catch (...) {
    unlink(op);
    op.st = uring_op::state::idle;
    return false;
  }
  return forget(op);  // completed now: taken out of the queue
}

ASYNC_UTILS_LINK void io_uring_backend::stash(int fd, const char* data, std::size_t n) noexcept {
  try {
    struct stat st{};
    if (::fstat(fd, &st) != 0) return;
    stashed& entry = stash_[fd];
    if (entry.bytes.empty() || entry.dev != st.st_dev || entry.ino != st.st_ino) {
      entry.bytes.clear();
      entry.dev = st.st_dev;
      entry.ino = st.st_ino;
    }
    entry.bytes.append(data, n);
  } catch (...) {  // out of memory: the bytes are lost, as with asyncio's cancelled reads
  }
}

ASYNC_UTILS_LINK long io_uring_backend::take_stash(int fd, char* data, std::size_t size) noexcept {
  if (stash_.empty()) return -1;
  auto it = stash_.find(fd);
  if (it == stash_.end()) return -1;
  struct stat st{};
  if (::fstat(fd, &st) != 0 || st.st_dev != it->second.dev || st.st_ino != it->second.ino) {
    stash_.erase(it);  // another file under the same number now
    return -1;
  }
  std::string& bytes = it->second.bytes;
  const std::size_t n = std::min(size, bytes.size());
  if (n) std::memcpy(data, bytes.data(), n);
  bytes.erase(0, n);
  if (bytes.empty()) stash_.erase(it);
  return static_cast<long>(n);
}

ASYNC_UTILS_LINK void io_uring_backend::add(int fd) {
  if (fallback_) return fallback_->add(fd);
  require_open_fd(fd, "io_uring add");
}

ASYNC_UTILS_LINK void io_uring_backend::arm(int fd, unsigned mask) {
  if (fallback_) return fallback_->arm(fd, mask);
  slot& s = slots_[fd];
  if (s.mask != 0) cancel(fd, s);
  if (mask != 0) submit_poll(fd, s, mask, false);
}

ASYNC_UTILS_LINK void io_uring_backend::remove(int fd) noexcept {
  if (fallback_) return fallback_->remove(fd);
  auto it = slots_.find(fd);
  if (it == slots_.end()) return;
  if (it->second.mask != 0) cancel(fd, it->second);
  slots_.erase(it);
}

ASYNC_UTILS_LINK void io_uring_backend::watch(int fd) {
  if (fallback_) return fallback_->watch(fd);
  submit_poll(fd, slots_[fd], io_read, true);
}

ASYNC_UTILS_LINK std::uint64_t io_uring_backend::user_data(int fd, std::uint32_t gen) noexcept {
  return (std::uint64_t{gen} << 33) | (std::uint64_t{static_cast<std::uint32_t>(fd)} << 1);
}

ASYNC_UTILS_LINK std::uint32_t io_uring_backend::next_generation() noexcept {
  generation_ = (generation_ + 1) & 0x7fffffffu;  // 31 bits; 0 is never used
  if (generation_ == 0) generation_ = 1;
  return generation_;
}

ASYNC_UTILS_LINK void io_uring_backend::unlink(uring_op& op) noexcept {
  if (op.prev) op.prev->next = op.next;
  else if (in_flight_ == &op) in_flight_ = op.next;
  if (op.next) op.next->prev = op.prev;
  op.prev = op.next = nullptr;
}

ASYNC_UTILS_LINK int io_uring_backend::sys_setup(unsigned entries, io_uring_params* p) noexcept {
  return static_cast<int>(::syscall(__NR_io_uring_setup, entries, p));
}

ASYNC_UTILS_LINK int io_uring_backend::sys_enter(unsigned to_submit, unsigned min_complete, unsigned flags, const void* arg, std::size_t argsz) noexcept {
  return static_cast<int>(::syscall(__NR_io_uring_enter, ring_.get(), to_submit, min_complete, flags, arg, argsz));
}

ASYNC_UTILS_LINK int io_uring_backend::setup() noexcept {
  if (int forced = io_uring_forced_errno.load()) return forced;
  io_uring_params p{};
  p.flags = IORING_SETUP_CLAMP;
#ifdef IORING_SETUP_COOP_TASKRUN
  p.flags |= IORING_SETUP_COOP_TASKRUN;  // no interrupting IPIs: we reap at our own pace
#endif
  int fd = sys_setup(256, &p);
  if (fd < 0 && errno == EINVAL) {
    p = io_uring_params{};
    fd = sys_setup(256, &p);
  }
  if (fd < 0) return errno;
  ring_.reset(fd);
  // EXT_ARG (5.11) puts the timeout into io_uring_enter; NODROP keeps overflowed completions.
  if (!(p.features & IORING_FEAT_EXT_ARG) || !(p.features & IORING_FEAT_NODROP) ||
      !(p.features & IORING_FEAT_SINGLE_MMAP)) {
    ring_.reset();
    return ENOSYS;
  }
  sq_entries_ = p.sq_entries;
  ring_size_ = std::max<std::size_t>(p.sq_off.array + p.sq_entries * sizeof(std::uint32_t),
                                     p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe));
  void* ring = ::mmap(nullptr, ring_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
  if (ring == MAP_FAILED) {
    int err = errno;
    ring_.reset();
    return err;
  }
  ring_mem_ = static_cast<char*>(ring);
  sqes_size_ = p.sq_entries * sizeof(io_uring_sqe);
  void* sqes = ::mmap(nullptr, sqes_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
  if (sqes == MAP_FAILED) {
    int err = errno;
    unmap();
    ring_.reset();
    return err;
  }
  sqes_ = static_cast<io_uring_sqe*>(sqes);
  sq_head_ = u32(p.sq_off.head);
  sq_tail_ = u32(p.sq_off.tail);
  sq_mask_ = *u32(p.sq_off.ring_mask);
  sq_flags_ = u32(p.sq_off.flags);
  std::uint32_t* array = u32(p.sq_off.array);
  for (unsigned i = 0; i < p.sq_entries; ++i) array[i] = i;  // identity: SQE i sits in slot i
  cq_head_ = u32(p.cq_off.head);
  cq_tail_ = u32(p.cq_off.tail);
  cq_mask_ = *u32(p.cq_off.ring_mask);
  cqes_ = reinterpret_cast<io_uring_cqe*>(ring_mem_ + p.cq_off.cqes);
  return 0;
}

ASYNC_UTILS_LINK std::uint32_t* io_uring_backend::u32(std::uint32_t offset) const noexcept {
  return reinterpret_cast<std::uint32_t*>(ring_mem_ + offset);
}

ASYNC_UTILS_LINK void io_uring_backend::unmap() noexcept {
  if (sqes_) ::munmap(sqes_, sqes_size_);
  if (ring_mem_) ::munmap(ring_mem_, ring_size_);
  sqes_ = nullptr;
  ring_mem_ = nullptr;
}

ASYNC_UTILS_LINK unsigned io_uring_backend::unsubmitted() const noexcept {
  return local_tail_ - std::atomic_ref<std::uint32_t>(*sq_head_).load(std::memory_order_acquire);
}

ASYNC_UTILS_LINK io_uring_sqe& io_uring_backend::next_sqe() {
  while (unsubmitted() >= sq_entries_) {
    int n = sys_enter(unsubmitted(), 0, 0, nullptr, 0);
    if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) throw_errno("io_uring_enter(submit)");
    if (n <= 0) reap();  // completions pending: make room by taking them
  }
  io_uring_sqe& sqe = sqes_[local_tail_ & sq_mask_];
  std::memset(&sqe, 0, sizeof sqe);
  return sqe;
}

ASYNC_UTILS_LINK void io_uring_backend::publish() noexcept {
  ++local_tail_;
  std::atomic_ref<std::uint32_t>(*sq_tail_).store(local_tail_, std::memory_order_release);
}

ASYNC_UTILS_LINK void io_uring_backend::submit_poll(int fd, slot& s, unsigned mask, bool permanent) {
  io_uring_sqe& sqe = next_sqe();
  sqe.opcode = IORING_OP_POLL_ADD;
  sqe.fd = fd;
  unsigned events = ((mask & io_read) ? POLLIN | POLLRDHUP : 0u) | ((mask & io_write) ? POLLOUT : 0u);
  sqe.poll32_events = events;  // little-endian hosts; the kernel swaps on big-endian ones
  if (permanent && multishot_) sqe.len = IORING_POLL_ADD_MULTI;
  s.gen = next_generation();
  s.mask = mask;
  s.permanent = permanent;
  sqe.user_data = user_data(fd, s.gen);
  publish();
}

ASYNC_UTILS_LINK void io_uring_backend::cancel(int fd, slot& s) {
  io_uring_sqe& sqe = next_sqe();
  sqe.opcode = IORING_OP_POLL_REMOVE;
  sqe.fd = -1;
  sqe.addr = user_data(fd, s.gen);
  sqe.user_data = cancel_tag;
  publish();
  s.mask = 0;
  s.gen = next_generation();  // whatever the old request still reports is stale now
}

ASYNC_UTILS_LINK void io_uring_backend::enter(std::chrono::nanoseconds timeout, bool must_wait) {
  const unsigned to_submit = unsubmitted();
  const bool overflow = (std::atomic_ref<std::uint32_t>(*sq_flags_).load(std::memory_order_relaxed) & IORING_SQ_CQ_OVERFLOW) != 0;
  const bool have_cqes = std::atomic_ref<std::uint32_t>(*cq_tail_).load(std::memory_order_acquire) != *cq_head_;
  if (have_cqes && !must_wait) timeout = std::chrono::nanoseconds{0};
  if (timeout.count() == 0 && to_submit == 0 && !overflow) return;  // nothing the kernel must hear
  unsigned flags = 0, min_complete = 0;
  io_uring_getevents_arg arg{};
  __kernel_timespec ts{};
  if (timeout.count() != 0 || overflow) flags |= IORING_ENTER_GETEVENTS;
  if (timeout.count() != 0) {
    min_complete = 1;
    if (timeout.count() > 0) {
      ts.tv_sec = timeout.count() / 1000000000;
      ts.tv_nsec = timeout.count() % 1000000000;
      arg.ts = reinterpret_cast<std::uint64_t>(&ts);
    }
    arg.sigmask_sz = _NSIG / 8;
    flags |= IORING_ENTER_EXT_ARG;
  }
  int n = flags & IORING_ENTER_EXT_ARG ? sys_enter(to_submit, min_complete, flags, &arg, sizeof arg)
                                       : sys_enter(to_submit, min_complete, flags, nullptr, 0);
  if (n < 0 && errno != EINTR && errno != ETIME && errno != EBUSY && errno != EAGAIN) throw_errno("io_uring_enter");
}

ASYNC_UTILS_LINK void io_uring_backend::reap() {
  std::uint32_t head = *cq_head_;
  const std::uint32_t tail = std::atomic_ref<std::uint32_t>(*cq_tail_).load(std::memory_order_acquire);
  for (; head != tail; ++head) {
    const io_uring_cqe& cqe = cqes_[head & cq_mask_];
    if (cqe.user_data == cancel_tag) continue;
    if (cqe.user_data & 1u) {
      auto* op = reinterpret_cast<uring_op*>(static_cast<std::uintptr_t>(cqe.user_data & ~std::uint64_t{1}));
      unlink(*op);
      op->res = cqe.res;
      op->st = uring_op::state::completed;
      completed_.push_back(op);
      continue;
    }
    const int fd = static_cast<int>(static_cast<std::uint32_t>(cqe.user_data >> 1));
    const auto gen = static_cast<std::uint32_t>(cqe.user_data >> 33);
    auto it = slots_.find(fd);
    if (it == slots_.end() || it->second.gen != gen) continue;  // replaced or removed since
    slot& s = it->second;
    const bool more = (cqe.flags & IORING_CQE_F_MORE) != 0;
    if (s.permanent) {
      if (!more) {
        if (cqe.res == -EINVAL && multishot_) multishot_ = false;  // a kernel before 5.13
        s.mask = 0;
        resubmit_.push_back(fd);
      }
      if (cqe.res >= 0) reported_.push_back({fd, io_read});
      continue;
    }
    s.mask = 0;  // one-shot: the report disarms
    unsigned bits = 0;
    if (cqe.res < 0) {
      bits = io_error;  // EBADF: closed under us; the waiters retry and see it
    } else {
      const auto re = static_cast<unsigned>(cqe.res);
      if (re & (POLLIN | POLLRDHUP)) bits |= io_read;
      if (re & POLLOUT) bits |= io_write;
      if (re & (POLLERR | POLLHUP | POLLNVAL)) bits |= io_error;
    }
    reported_.push_back({fd, bits});
  }
  std::atomic_ref<std::uint32_t>(*cq_head_).store(head, std::memory_order_release);
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils::detail

#ifdef ASYNC_UTILS_TESTS
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>

namespace codestare::async_utils::detail::testing {
// Drives a backend by hand: one-shot read and write reports, re-arming, disarming, timeouts.
inline void exercise_backend(io_uring_backend& b) {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  unique_fd a(sv[0]), c(sv[1]);
  std::vector<std::pair<int, unsigned>> seen;
  auto collect = [&](int fd, unsigned bits) { seen.emplace_back(fd, bits); };
  b.add(a.get());
  b.arm(a.get(), io_read);
  b.wait(std::chrono::nanoseconds{0}, collect);
  CHECK(seen.empty());
  b.wait(std::chrono::milliseconds(1), collect);  // times out
  CHECK(seen.empty());
  REQUIRE(::write(c.get(), "x", 1) == 1);
  b.wait(std::chrono::seconds(5), collect);
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].first == a.get());
  CHECK((seen[0].second & io_read) != 0);
  seen.clear();
  b.wait(std::chrono::nanoseconds{0}, collect);  // one-shot: no second report unarmed
  CHECK(seen.empty());
  b.arm(a.get(), io_read | io_write);
  b.arm(a.get(), io_write);  // replaces the request; the old one's completion is dropped
  b.wait(std::chrono::seconds(5), collect);
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].second == io_write);
  seen.clear();
  b.arm(a.get(), io_read);
  b.arm(a.get(), 0);  // disarmed: the pending byte is not reported
  b.wait(std::chrono::milliseconds(1), collect);
  CHECK(seen.empty());
  b.arm(a.get(), io_read);
  b.remove(a.get());
  b.wait(std::chrono::milliseconds(1), collect);
  CHECK(seen.empty());
  // A permanent watch reports every time, without re-arming.
  b.watch(a.get());
  for (int i = 0; i < 3; ++i) {
    b.wait(std::chrono::seconds(5), collect);
    REQUIRE(seen.size() == 1);
    char buf[8];
    CHECK(::read(a.get(), buf, sizeof buf) >= 1);
    seen.clear();
    REQUIRE(::write(c.get(), "y", 1) == 1);
  }
  b.remove(a.get());
}
}  // namespace codestare::async_utils::detail::testing

TEST_SUITE("io_uring") {
  using namespace codestare::async_utils;
  TEST_CASE("the io_uring backend reports readiness one-shot, re-arms and times out") {
    detail::io_uring_backend b;
    if (std::string(b.active_name()) != "io_uring") MESSAGE("io_uring refused here; this ran on the epoll fallback");
    detail::testing::exercise_backend(b);
  }
  TEST_CASE("a refused io_uring falls back to epoll and says so at debug level") {
    std::string logged;
    auto previous = set_log_handler([&](log_level level, std::string_view m) {
      if (level == log_level::debug) logged += std::string(m);
    });
    detail::io_uring_forced_errno = EPERM;
    std::optional<detail::io_uring_backend> b;
    b.emplace();
    detail::io_uring_forced_errno = 0;
    set_log_handler(std::move(previous));
    CHECK(std::string(b->active_name()) == "epoll");
    CHECK(logged.find("falling back to epoll") != std::string::npos);
    detail::testing::exercise_backend(*b);
  }
  TEST_CASE("a seccomp filter that refuses io_uring_setup makes the backend fall back (forked child)") {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::alarm(20);
      set_log_handler([](log_level, std::string_view) {});
      sock_filter filter[] = {
          BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 0),  // seccomp_data.nr
          BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
          BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
          BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      };
      sock_fprog prog{static_cast<unsigned short>(sizeof filter / sizeof filter[0]), filter};
      if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
        ::_exit(3);  // no seccomp here: nothing to test
      try {
        detail::io_uring_backend b;
        ::_exit(std::string(b.active_name()) == "epoll" ? 0 : 1);
      } catch (...) {
        ::_exit(2);
      }
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFEXITED(status));
    if (WEXITSTATUS(status) == 3) MESSAGE("seccomp unavailable; not tested");
    else CHECK(WEXITSTATUS(status) == 0);
  }
}
#endif
#endif  // ASYNC_UTILS_BACKEND_IO_URING
