// libFuzzer target: a byte string is read as a schedule of operations on the runtime (tasks that
// sleep, yield, await futures or other tasks, wait_for, gather, shield, wait on a descriptor;
// cancellations; futures set, failed or cancelled; call_soon / call_later handles, some cancelled;
// done callbacks), run under run(). Checked for every input:
//  - the loop never logs an internal error ("woken twice" is a double resume refused);
//  - every task ends once the schedule is over and the leftovers are cancelled;
//  - outcomes are consistent: a task that awaited a future or task returns its value or its
//    exception, gather sums, wait_for times out only when its target ended cancelled;
//  - a callback runs at most once, never after its cancel(), and done callbacks never inline;
//  - no descriptor is leaked (and, under ASan, no memory).
//
// Build: clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize=function ...
// Input format: a sequence of operations, each an opcode byte then its argument bytes (reading
// past the end yields zeros). tests/fuzz/corpus/ holds seeds.
//
// Opcodes op_lock .. op_cancel_recent drive the primitives and utilities (lock, semaphore,
// condition, event, queue, accessor, task_nursery, task_group, timeout scopes, a stream over a
// socket pair with a raw peer), their waits plain, under wait_for or in a timeout scope, and
// cancel them. At the end, after every task ended: no waiter left in any primitive (their
// private lists are read), no lock or unit held, the semaphore's count back, the queue lost and
// duplicated no item, the stream carried the peer's bytes in order, every nursery closed, no
// descriptor or thread left. op_async_gen runs an async generator (sleeps, futures and the event
// between its yields, a throw at a random point) under a consumer task that takes some values,
// then abandons it, aclose()s it, or runs a second next() beside one in flight (which must
// throw invalid_state_error); consumers are cancelled at random. Checked: the generator's RAII
// guard destroyed exactly once, values in order without duplicate or gap, an exception of the
// generator delivered through next() exactly once and nullopt afterwards. op_wait runs wait()
// (first_completed, first_exception or all_completed) or as_completed() in a task, over 1-4
// earlier tasks or futures (repeats allowed), with no timeout, a zero one or a short one.
// Checked for wait: done and pending split the distinct inputs, every done one is done and
// every pending one is not (wait cancelled none), and pending is non-empty only as return_when
// allows it (or after the timeout). For as_completed: one element per distinct input, the k-th
// passing on the value or exception of the k-th child to complete (those done at the call
// first, in the given order), timeout_error for all the rest only once the timeout passed.
// op_executor hands jobs to the default executor (run_in_executor, to_thread), to a
// thread_pool_executor of the fuzzer's and through make_async; most wait on a gate the schedule
// opens, some post a call_soon_threadsafe from the worker, some throw; their awaiting tasks run
// plain, under wait_for or in a timeout scope and are cancelled at random (the job still runs).
// The pool is shut down (wait=false) with jobs queued, shutdown_default_executor() runs in a
// task, set_default_executor() replaces the default. Checked: every accepted job ran exactly
// once and its call_soon_threadsafe callback once, a refused one never (refused only after the
// shutdown, with the documented message). op_signal adds, replaces and removes SIGUSR1 / SIGUSR2
// handlers and raises them (raise(), or kill(getpid()), which another thread may receive and
// forward), also just before the handler is removed. Checked: a handler runs only while
// installed, the newest one, never more often than its signal was raised, and at least once
// after the last raise; a signal never reaches the disposition restored (the fuzzer's own,
// which aborts). op_shutdown raises SIGHUP with a task_nursery alive (its shutdown handling):
// the graceful shutdown must close every nursery before it cancels the schedule's task, which
// then ends the schedule. op_utility runs an async_exit_stack (callbacks, async callbacks, a
// suppressing exit, entered contexts; pop_all; checked: LIFO, each exactly once, suppression
// exactly when a suppressing exit saw the body's error), awaitable_predicate waits (with a
// timeout) and notifies, condition_property set/get (a refused negative value), coroutine_wrapper
// objects awaited, scheduled, awaited twice or close()d, and registered objects (shared keys,
// publish_unique, renamed) whose registry() is compared with the live instances. After run():
// every signal disposition and the thread's mask are as before (sigaction compared), no thread
// or descriptor is left.
// FUZZ_TRACE=1 in the environment prints the opcodes and the stream reads.
#include "../../async_utils.hpp"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <memory>
#include <cstdio>
#include <csignal>
#include <deque>
#include <map>
#include <atomic>
#include <cstdlib>
#include <dirent.h>
#include <string>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

using namespace codestare::async_utils;
using namespace std::chrono_literals;

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "schedule_fuzzer: invariant broken: %s\n", what.c_str());
  std::abort();
}
#define FUZZ_CHECK(cond)                                                                    \
  do {                                                                                      \
    if (!(cond)) fail(std::string(#cond) + " (line " + std::to_string(__LINE__) + ")");   \
  } while (0)

int open_fds() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (!dir) return -1;
  int n = 0;
  while (dirent* e = ::readdir(dir))
    if (e->d_name[0] != '.') ++n;
  ::closedir(dir);
  return n;
}

int threads() {
  DIR* dir = ::opendir("/proc/self/task");
  if (!dir) return -1;
  int n = 0;
  while (dirent* e = ::readdir(dir))
    if (e->d_name[0] != '.') ++n;
  ::closedir(dir);
  return n;
}

/// The schedule, read byte by byte.
struct reader {
  const std::uint8_t* data;
  std::size_t size;
  std::size_t pos = 0;
  bool more() const { return pos < size; }
  std::uint8_t byte() { return pos < size ? data[pos++] : 0; }
  /// Short durations keep executions fast: 0, 50, 100 or 150 microseconds.
  std::chrono::microseconds duration() { return std::chrono::microseconds(50 * (byte() % 4)); }
};

enum task_kind : std::uint8_t {
  k_sleep,           // sleeps, returns its value
  k_yield,           // yields n times, returns its value
  k_stubborn,        // sleeps; swallows one cancellation and returns its value
  k_throw,           // sleeps, throws runtime_error("boom")
  k_fd,              // waits until the socket is readable, returns its value
  k_await_future,    // returns co_await future
  k_await_task,      // returns co_await an earlier task
  k_wait_for_task,   // wait_for(earlier task, timeout); -2 on timeout_error
  k_wait_for_future, // wait_for(future, timeout); -2 on timeout_error
  k_gather,          // gather(a, b) -> a + b
  k_gather_exc,      // gather(return_exceptions, a, b) -> sum of the values that arrived
  k_shield,          // co_await shield(earlier task)
  k_wait_done,       // wait_done(earlier task) -> 0 (-3 if the task was not done after it)
  k_kinds,           // op_spawn makes the kinds above; the opcodes of the primitives the rest:
  k_lock,            // holds one of two locks a while (checks: at most one holder)
  k_semaphore,       // holds the bounded_semaphore(2) a while (checks: at most two holders)
  k_cond_wait,       // condition.wait() or wait_for(counter >= target) with the lock held
  k_cond_notify,     // takes the condition's lock, bumps the counter, notify(n) / notify_all()
  k_event_wait,      // event.wait()
  k_queue_put,       // queue.put(next item)
  k_queue_get,       // queue.get(), then task_done()
  k_queue_join,      // queue.join()
  k_acc_set,         // accessor.set(v[, wait_for_read])
  k_acc_get,         // accessor.get({predicate, wait_for_write})
  k_nursery_stop,    // task_nursery::stop_task(child)
  k_nursery_close,   // task_nursery::aclose()
  k_group,           // a task_group with 1-3 children, some failing
  k_timeout,         // a timeout scope (maybe rescheduled) around sleeps
  k_stream_read,     // one read of the stream_reader (read(n), readexactly, readline, readuntil)
  k_stream_drain,    // stream_writer::drain()
  k_gen_consumer,    // drives an async_generator (op_async_gen): takes values, then abandons,
                     // aclose()s or races a second next(); returns its value unless cancelled
  k_wait,            // wait() over earlier tasks or futures (op_wait); returns its value
  k_as_completed,    // as_completed() over earlier tasks or futures (op_wait); returns its value
  k_exec,            // awaits a job of run_in_executor / to_thread / a thread_pool / make_async
  k_exec_shutdown,   // event_loop::shutdown_default_executor()
  k_exit_stack,      // fills an async_exit_stack, runs a body, unwinds it (LIFO, once each)
  k_pred_wait,       // co_await awaitable_predicate(counter >= target[, timeout])
  k_pred_notify,     // bumps the predicate's counter, notify_all() on its condition
  k_prop_set,        // condition_property set(v[, wait_for_read]) (a negative v is refused)
  k_prop_get,        // condition_property get({predicate, wait_for_write})
  k_wrapper,         // co_await a coroutine_wrapper (a second await must throw invalid_state_error)
  k_wrapper_task,    // create_task(std::ref(wrapper)): its value, or invalid_state_error
  k_registry,        // holds a registered object (maybe publish_unique) across sleeps, renames it
  k_all_kinds
};
/// Waits (on a primitive) in the kinds from k_lock on may run plain, under wait_for or under a
/// timeout scope; a timeout makes them return timed_out.
enum guard_mode : std::uint8_t { g_plain, g_wait_for, g_timeout_scope, g_modes };

constexpr int timed_out = -2;
constexpr int not_done_after_wait = -3;
constexpr std::size_t max_tasks = 64, max_futures = 16, max_handles = 64, max_ops = 400;

struct task_rec {
  task<int> t;
  task_kind kind;
  int value;  // what a leaf returns
  int a = -1, b = -1;  // target task indices (or the future index for the future kinds)
  bool cancelled_by_schedule = false;
};

struct handle_rec {
  handle h;
  bool soon;           // call_soon (must have run by the end unless cancelled)
  int runs_at_cancel = -1;
};

struct done_cb_rec {
  int target;          // future index
  callback_id id;
  bool removed = false;
  bool added_done = false;  // the future was done when the callback was added
};

// ---- Reading the primitives' private waiter lists: explicit instantiation may name private
// members (the classic access trick, legal C++), so the fuzzer checks what no public call shows.
template <class Tag, typename Tag::type M>
struct private_member {
  friend typename Tag::type get(Tag) { return M; }
};
using waiter_list = detail::intrusive_list<detail::parked_task>;
#define FUZZ_PRIVATE(tag, cls, member, type_)                  \
  struct tag {                                                 \
    using type = type_ cls::*;                                 \
    friend type get(tag);                                      \
  };                                                           \
  template struct private_member<tag, &cls::member>;
FUZZ_PRIVATE(lock_waiters, lock, waiters_, waiter_list)
FUZZ_PRIVATE(semaphore_waiters, semaphore, waiters_, waiter_list)
FUZZ_PRIVATE(semaphore_handed, semaphore, handed_, waiter_list)
FUZZ_PRIVATE(semaphore_value, semaphore, value_, std::size_t)
FUZZ_PRIVATE(condition_waiters, condition, waiters_, waiter_list)
FUZZ_PRIVATE(event_waiters, event, waiters_, waiter_list)
FUZZ_PRIVATE(queue_getters, queue<int>, getters_, waiter_list)
FUZZ_PRIVATE(queue_putters, queue<int>, putters_, waiter_list)
FUZZ_PRIVATE(queue_joiners, queue<int>, joiners_, waiter_list)
FUZZ_PRIVATE(queue_woken, queue<int>, woken_, waiter_list)
FUZZ_PRIVATE(queue_claimed_items, queue<int>, claimed_items_, std::size_t)
FUZZ_PRIVATE(queue_claimed_slots, queue<int>, claimed_slots_, std::size_t)
FUZZ_PRIVATE(queue_unfinished, queue<int>, unfinished_, std::size_t)
#undef FUZZ_PRIVATE

struct nursery_rec {
  std::unique_ptr<task_nursery> n;
  std::vector<task<int>> children;
  bool close_requested = false;
};

/// One job handed to an executor (op_executor). A gated job blocks its worker until the
/// schedule opens its gate (op_executor, or the drain at the end), so that which jobs run when
/// follows the input, not the thread scheduler, as far as it can.
struct job_rec {
  std::atomic<bool> gate{false};
  std::atomic<int> runs{0};
  int ts_runs = 0;  // its call_soon_threadsafe callback ran (loop thread only)
  int id = 0;
  bool gated = false, throws = false, threadsafe = false;
  bool submitted = false;  // accepted by an executor: must run exactly once
  bool refused = false;    // refused with the documented error: must never run
  void open() {
    gate.store(true);
    gate.notify_all();
  }
};

/// A task's coroutine_wrapper (op_utility): sleeps `steps` times, counting its progress.
struct fz_wrapper : coroutine_wrapper<int> {
  int steps, value, progress = 0, completions = 0, refusals = 0;
  bool closed_fresh = false;  // close()d before it started: must never run
  std::chrono::microseconds d;
  fz_wrapper(int n, std::chrono::microseconds delay, int v) : steps(n), value(v), d(delay) { set_coroutine(work()); }
  coroutine<int> work() {
    for (int i = 0; i < steps; ++i) {
      co_await sleep(d);
      ++progress;
    }
    co_return value;
  }
};

/// The owner of a condition_property (op_utility); its setter refuses negative values.
struct prop_owner {
  int level_ = 0;
  int level() const { return level_; }
  void set_level(int v) {
    if (v < 0) throw std::invalid_argument("negative level");
    level_ = v;
  }
  condition_property<&prop_owner::level, &prop_owner::set_level> prop{this, "level"};
};

/// Registered objects (op_utility): keyed by name (shared keys allowed), and a kind whose
/// constructor publish_unique()s (refuses a key in use). `live` mirrors the live instances in
/// creation order, to compute what registry() must show.
struct fz_reg : registry<fz_reg> {
  std::string name;
  std::vector<fz_reg*>* live;
  static constexpr auto unique_key = &fz_reg::name;
  fz_reg(std::string n, std::vector<fz_reg*>* l) : name(std::move(n)), live(l) { live->push_back(this); }
  fz_reg(const fz_reg&) = delete;
  fz_reg& operator=(const fz_reg&) = delete;
  ~fz_reg() { std::erase(*live, this); }
};
struct fz_unique : registry<fz_unique> {
  std::string name;
  std::vector<fz_unique*>* live;
  static constexpr auto unique_key = &fz_unique::name;
  fz_unique(std::string n, std::vector<fz_unique*>* l) : registry_base(defer_registration), name(std::move(n)), live(l) {
    publish_unique();
    live->push_back(this);
  }
  fz_unique(const fz_unique&) = delete;
  fz_unique& operator=(const fz_unique&) = delete;
  ~fz_unique() {
    std::erase(*live, this);
    withdraw();
  }
};
/// registry() lists, for each key, the most recently created live instance with it.
template <class T>
void check_registry(const std::vector<T*>& live) {
  std::map<std::string, T*> expected;
  for (T* o : live) expected[o->name] = o;
  const std::map<std::string, T*> got = T::registry();
  FUZZ_CHECK(got == expected);
  for (T* o : live) FUZZ_CHECK(T::key_in_use(o->name));
}

/// A signal handler of op_signal (kept in `state`: a queued call may run until the loop closes).
struct sig_rec {
  int sig = 0;
  bool installed = false;
  int gen = 0;          // which add_signal_handler the installed handler comes from
  bool expect = false;  // raised while installed, the handler has not run since (it must, before the end)
  int calls = 0, raises = 0;
};

/// The primitives and utilities one schedule works on (created at its start, checked and
/// destroyed at its end, inside run()).
struct prim_state {
  lock locks[2];
  int lock_holders[2] = {0, 0};
  bounded_semaphore sem{2};
  int sem_holders = 0;
  condition cond;
  int cond_holders = 0;
  int cond_counter = 0;
  event ev;
  queue<int> q{3};
  int next_item = 0;
  std::vector<int> put_ok, got;  // items put (put returned) and items taken
  accessor<int> acc;             // starts at 0
  std::vector<int> acc_values{0};
  std::vector<std::unique_ptr<nursery_rec>> nurseries;  // back(): the current one
  // A stream over one end of a socket pair; the other end (peer) is driven raw.
  std::optional<stream_reader> reader;
  std::optional<stream_writer> writer;
  int peer = -1;
  bool peer_write_shut = false, peer_closed = false, peer_reset = false, writer_closed = false;
  int reader_task = -1;  // index of the last k_stream_read task
  std::string peer_sent, stream_got;  // peer -> reader
  /// What the reader got is what the peer sent so far, in order and without gaps: a read
  /// cancelled or timed out (plain, under wait_for or in a timeout scope) loses no byte.
  bool stream_consistent() const { return peer_sent.compare(0, stream_got.size(), stream_got) == 0; }
  std::string stream_sent, peer_got;  // writer -> peer
  // op_executor
  std::deque<std::unique_ptr<job_rec>> jobs;
  std::unique_ptr<thread_pool_executor> pool;
  bool pool_shut = false, default_shut = false;
  // op_utility
  std::shared_ptr<condition> pred_cond = std::make_shared<condition>();
  int pred_counter = 0;
  prop_owner owner;
  std::vector<int> prop_values{0};
  std::deque<std::unique_ptr<fz_wrapper>> wrappers;
  std::vector<fz_reg*> reg_live;
  std::vector<fz_unique*> unique_live;
  int reg_serial = 0;
};

/// One async generator of op_async_gen: what its frame and its consumers saw.
struct gen_rec {
  int constructed = 0, destroyed = 0;  // of the RAII guard in the generator's frame
  int length = 0, throw_at = -1;       // yields 0..length-1; throws before yielding throw_at
  int received = 0;                    // values delivered through next(): 0..received-1, in order
  int body_errors = 0, delivered_errors = 0;  // thrown by the body; come out of a next()
  std::string body_error, delivered_error;
  bool ended = false;        // a next() returned nullopt or threw: only nullopt from now on
  bool pull_started = false; // the concurrent next() task began (it holds an awaiter of the frame)
  std::vector<task<int>> pulls;
};

struct state {
  std::unique_ptr<prim_state> p;
  std::vector<std::unique_ptr<gen_rec>> gens;
  std::vector<future<int>> futures;
  std::vector<task_rec> tasks;
  std::vector<handle_rec> handles;
  std::array<int, max_handles> handle_runs{};
  std::vector<done_cb_rec> done_cbs;
  std::array<int, max_handles> done_cb_runs{};
  bool inside_add_done_callback = false;
  int sock[2] = {-1, -1};
  std::string log;
  sig_rec sigs[2];
  bool shutdown_hit = false;  // op_shutdown: the graceful shutdown cancelled the schedule
};

// ---- Task bodies (parameters by value: a coroutine must not hold references to the schedule) --

coroutine<int> leaf(task_kind kind, int value, std::chrono::microseconds d, int n, int fd) {
  switch (kind) {
    case k_sleep: co_await sleep(d); co_return value;
    case k_yield:
      for (int i = 0; i < n; ++i) co_await sleep(0s);
      co_return value;
    case k_stubborn:
      try {
        co_await sleep(d + 100ms);
      } catch (const cancelled_error&) {
      }
      co_return value;
    case k_throw:
      co_await sleep(d);
      throw std::runtime_error("boom");
    case k_fd: co_await wait_readable(fd); co_return value;
    default: co_return -1;
  }
}

coroutine<int> await_future(future<int> f) { co_return co_await f; }
coroutine<int> await_task(task<int> t) { co_return co_await t; }
template <class F>
coroutine<int> wait_for_target(F target, std::chrono::microseconds timeout) {
  try {
    co_return co_await wait_for(target, timeout);
  } catch (const timeout_error&) {
    co_return timed_out;
  }
}
coroutine<int> gather_two(task<int> a, task<int> b) {
  auto [x, y] = co_await gather(a, b);
  co_return x + y;
}
coroutine<int> gather_two_exc(task<int> a, task<int> b) {
  auto [x, y] = co_await gather(return_exceptions, a, b);
  int sum = 0;
  if (x.index() == 0) sum += std::get<0>(x);
  if (y.index() == 0) sum += std::get<0>(y);
  co_return sum;
}
coroutine<int> shielded(task<int> t) { co_return co_await shield(t); }
coroutine<int> await_done(task<int> t) {
  co_await wait_done(t);
  co_return t.done() ? 0 : not_done_after_wait;
}

// ---- Bodies of the primitives' kinds -------------------------------------------------------

/// Runs `c` plainly, under wait_for or under a timeout scope; a timeout yields timed_out.
coroutine<int> guarded(guard_mode mode, std::chrono::microseconds d, coroutine<int> c) {
  try {
    if (mode == g_wait_for) co_return co_await wait_for(std::move(c), d);
    if (mode == g_timeout_scope) {
      auto body = [&c]() -> coroutine<int> { co_return co_await std::move(c); };
      std::optional<int> result = co_await async_with(timeout(d), std::move(body));
      FUZZ_CHECK(result.has_value());  // a timeout scope suppresses nothing
      co_return *result;
    }
    co_return co_await std::move(c);
  } catch (const timeout_error&) {
    co_return timed_out;
  }
}

/// Counts a holder in for a while; `max` holders at most.
coroutine<void> hold(int* holders, int max, std::chrono::microseconds d) {
  ++*holders;
  FUZZ_CHECK(*holders <= max);
  try {
    co_await sleep(d);
  } catch (...) {
    --*holders;
    throw;
  }
  --*holders;
}

coroutine<int> lock_body(prim_state* p, int i, std::chrono::microseconds d, bool scoped, int value) {
  lock& lk = p->locks[i];
  if (scoped) {
    auto guard = co_await lk.scoped();
    FUZZ_CHECK(lk.locked());
    co_await hold(&p->lock_holders[i], 1, d);
  } else {
    FUZZ_CHECK(co_await lk.acquire());
    try {
      co_await hold(&p->lock_holders[i], 1, d);
    } catch (...) {
      lk.release();
      throw;
    }
    lk.release();
  }
  co_return value;
}

coroutine<int> semaphore_body(prim_state* p, std::chrono::microseconds d, int value) {
  auto guard = co_await p->sem.scoped();
  co_await hold(&p->sem_holders, 2, d);
  co_return value;
}

coroutine<int> cond_wait_body(prim_state* p, int target, bool with_predicate, int value) {
  auto guard = co_await p->cond.scoped();
  FUZZ_CHECK(++p->cond_holders == 1);
  --p->cond_holders;  // wait() releases the lock
  try {
    if (with_predicate) {
      auto pred = [p, target] { return p->cond_counter >= target; };
      FUZZ_CHECK(co_await p->cond.wait_for(pred));
      FUZZ_CHECK(p->cond_counter >= target);
    } else {
      FUZZ_CHECK(co_await p->cond.wait());
    }
  } catch (...) {
    // Cancelled, the wait still takes the lock back before it throws (asyncio).
    FUZZ_CHECK(p->cond.locked());
    FUZZ_CHECK(++p->cond_holders == 1);
    --p->cond_holders;
    throw;
  }
  FUZZ_CHECK(p->cond.locked());
  FUZZ_CHECK(++p->cond_holders == 1);
  --p->cond_holders;
  co_return value;
}

coroutine<int> cond_notify_body(prim_state* p, int n, int value) {
  auto guard = co_await p->cond.scoped();
  FUZZ_CHECK(++p->cond_holders == 1);
  ++p->cond_counter;
  if (n == 0) p->cond.notify_all();
  else p->cond.notify(static_cast<std::size_t>(n));
  --p->cond_holders;
  co_return value;
}

coroutine<int> event_wait_body(prim_state* p, int value) {
  FUZZ_CHECK(co_await p->ev.wait());
  co_return value;
}

coroutine<int> queue_put_body(prim_state* p, int value) {
  const int item = p->next_item++;
  co_await p->q.put(item);
  p->put_ok.push_back(item);
  co_return value;
}

coroutine<int> queue_get_body(prim_state* p, int value) {
  const int item = co_await p->q.get();
  p->got.push_back(item);
  p->q.task_done();
  co_return value;
}

coroutine<int> queue_join_body(prim_state* p, int value) {
  co_await p->q.join();
  co_return value;
}

coroutine<int> acc_set_body(prim_state* p, int v, bool wait_for_read, int value) {
  p->acc_values.push_back(v);  // maybe visible from now on
  co_await p->acc.set(v, wait_for_read);
  co_return value;
}

coroutine<int> acc_get_body(prim_state* p, bool with_predicate, std::optional<bool> wait_for_write, int value) {
  get_options<int> options;
  if (with_predicate) options.predicate = [](const int& x) { return x % 2 == 0; };
  options.wait_for_write = wait_for_write;
  const int v = co_await p->acc.get(std::move(options));
  if (with_predicate) FUZZ_CHECK(v % 2 == 0);
  FUZZ_CHECK(std::find(p->acc_values.begin(), p->acc_values.end(), v) != p->acc_values.end());
  co_return value;
}

coroutine<int> nursery_stop_body(nursery_rec* rec, task<int> child, int value) {
  std::exception_ptr e;
  try {
    e = co_await rec->n->stop_task(any_task(child));
  } catch (const std::invalid_argument&) {
    FUZZ_CHECK(child.done());  // no longer listed: done before the call
    co_return value;
  }
  FUZZ_CHECK(child.done());
  if (!e) FUZZ_CHECK(!child.cancelled() && child.exception() == nullptr);
  else FUZZ_CHECK(child.cancelled() || child.exception() != nullptr);
  co_return value;
}

coroutine<int> nursery_close_body(nursery_rec* rec, int value) {
  co_await rec->n->aclose();
  FUZZ_CHECK(rec->n->closed());
  FUZZ_CHECK(!rec->n->sentinel_task());
  for (auto& c : rec->children) FUZZ_CHECK(c.done());
  co_return value;
}

coroutine<int> group_body(std::chrono::microseconds d, std::uint8_t plan, int value) {
  std::vector<task<int>> kids;
  bool any_throws = false;
  const int count = 1 + plan % 3;
  try {
    auto body = [&](task_group& tg) -> coroutine<void> {
      for (int i = 0; i < count; ++i) {
        const int pick = (plan >> (2 + 2 * i)) & 3;
        const task_kind kind = pick == 0 ? k_sleep : pick == 1 ? k_throw : k_yield;
        if (kind == k_throw) any_throws = true;
        kids.push_back(tg.create_task(leaf(kind, 7, std::chrono::microseconds(50 * i) + d, 2, -1)));
      }
      co_await sleep(d);
    };
    co_await async_with(task_group{}, std::move(body));
    FUZZ_CHECK(static_cast<int>(kids.size()) == count);
    for (auto& k : kids) FUZZ_CHECK(k.done() && !k.cancelled() && k.exception() == nullptr && k.result() == 7);
  } catch (const exception_group& g) {
    FUZZ_CHECK(any_throws);
    FUZZ_CHECK(!g.exceptions().empty());
    for (const auto& e : g.exceptions()) {
      try {
        std::rethrow_exception(e);
      } catch (const std::runtime_error& ex) {
        FUZZ_CHECK(std::string(ex.what()) == "boom");
      } catch (...) {
        fail("task_group: a sub-exception other than the children's");
      }
    }
    for (auto& k : kids) FUZZ_CHECK(k.done());
  } catch (const cancelled_error&) {
    for (auto& k : kids) FUZZ_CHECK(k.done());
    throw;
  }
  co_return value;
}

coroutine<int> timeout_body(std::chrono::microseconds limit, std::chrono::microseconds d, bool reschedule, int value) {
  auto scope = timeout(limit);
  auto body = [&](timeout_scope& t) -> coroutine<void> {
    if (reschedule) t.reschedule(event_loop::current().time() + d);
    co_await sleep(d);
    co_await sleep(0s);
  };
  try {
    co_await async_with(scope, std::move(body));
  } catch (const timeout_error&) {
    FUZZ_CHECK(scope.expired());
    co_return timed_out;
  }
  co_return value;
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

/// One read: read(n) (mode 0), readexactly(n) (1), readline() (2), readuntil("ab") (3),
/// read() to EOF (4); plain, under a timeout scope, or under wait_for. What comes must continue
/// what the peer sent. A read cancelled (or timed out) plainly or in a timeout scope keeps
/// every byte for the next read. Under wait_for it may not: wait_for runs the read as a task
/// of its own, and a result that lands just before the caller's cancellation (or deadline) is
/// dropped (asyncio 3.11 returned it; 3.12 awaits a coroutine inline); from then on the bytes
/// read need only be a subsequence of those sent.
coroutine<int> stream_read_body(prim_state* p, int mode, int n, guard_mode how, std::chrono::microseconds d, int value) {
  stream_reader r = *p->reader;
  std::string got;
  try {
    coroutine<std::string> c = mode == 0   ? r.read(n)
                               : mode == 1 ? r.readexactly(n)
                               : mode == 2 ? r.readline()
                               : mode == 3 ? r.readuntil("ab")
                                           : r.read();
    if (how == g_wait_for) {
      got = co_await wait_for(std::move(c), d);
    } else if (how == g_timeout_scope) {
      auto body = [&c]() -> coroutine<std::string> { co_return co_await std::move(c); };
      got = *co_await async_with(timeout(d), std::move(body));
    } else {
      got = co_await std::move(c);
    }
    switch (mode) {
      case 0: FUZZ_CHECK(got.size() <= static_cast<std::size_t>(n) && (!got.empty() || r.at_eof())); break;
      case 1: FUZZ_CHECK(got.size() == static_cast<std::size_t>(n)); break;
      case 2: FUZZ_CHECK(ends_with(got, "\n") || r.at_eof()); break;
      case 3: FUZZ_CHECK(ends_with(got, "ab")); break;
      default: FUZZ_CHECK(r.at_eof()); break;
    }
  } catch (const incomplete_read_error& e) {
    FUZZ_CHECK(mode == 1 || mode == 3);
    FUZZ_CHECK(r.at_eof());
    got = e.partial();
  } catch (const timeout_error&) {
    co_return timed_out;
  } catch (const cancelled_error&) {
    throw;
  } catch (const std::system_error&) {
    FUZZ_CHECK(p->peer_reset || p->writer_closed);  // a connection error only after a reset or close
  }
  p->stream_got += got;
  FUZZ_CHECK(p->stream_consistent());
  co_return value;
}

coroutine<int> stream_drain_body(prim_state* p, int value) {
  stream_writer w = *p->writer;
  try {
    co_await w.drain();
  } catch (const std::system_error&) {
    FUZZ_CHECK(p->peer_closed);
  }
  co_return value;
}

// ---- Async generators (op_async_gen) ----------------------------------------------------------

/// Lives in the generator's frame: constructed once when it starts, destroyed once however it
/// ends (finished, closed, or its frame destroyed with the generator).
struct gen_guard {
  gen_rec* g;
  explicit gen_guard(gen_rec* r) : g(r) { ++g->constructed; }
  gen_guard(const gen_guard&) = delete;
  gen_guard& operator=(const gen_guard&) = delete;
  ~gen_guard() { ++g->destroyed; }
};

/// Yields 0..n-1; before each yield it awaits (by two bits of `pattern`) nothing, sleep(0),
/// sleep(d), or the future / the event; throws before yielding throw_at.
async_generator<int> gen_body(gen_rec* g, prim_state* p, int n, int throw_at, std::uint8_t pattern, future<int> f,
                              std::chrono::microseconds d) {
  gen_guard guard(g);
  try {
    for (int i = 0; i < n; ++i) {
      switch ((pattern >> (2 * (i % 4))) & 3) {
        case 0: break;
        case 1: co_await sleep(0s); break;
        case 2: co_await sleep(d); break;
        default:
          if (i % 2) (void)co_await f;
          else (void)co_await p->ev.wait();
          break;
      }
      if (i == throw_at) throw std::runtime_error("generator boom");
      co_yield i;
    }
  } catch (const generator_exit&) {
    throw;  // aclose(): not an error of the generator
  } catch (...) {
    ++g->body_errors;
    g->body_error = describe(std::current_exception());
    throw;
  }
}

/// One next() came back with `v`: the values come in order, none after the end.
void gen_got_value(gen_rec* g, const std::optional<int>& v) {
  if (!v) {
    g->ended = true;
    return;
  }
  FUZZ_CHECK(!g->ended);
  FUZZ_CHECK(*v == g->received);  // no duplicate, no gap
  ++g->received;
}
/// One next() threw the generator's exception: once, and only nullopt afterwards.
void gen_got_error(gen_rec* g, const std::exception_ptr& e) {
  FUZZ_CHECK(!g->ended);
  ++g->delivered_errors;
  g->delivered_error = describe(e);
  g->ended = true;
}
bool is_cancellation(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const cancelled_error&) {
    return true;
  } catch (...) {
    return false;
  }
}

/// A next() in a task of its own, beside the consumer's (its awaiter holds the frame, not the
/// generator: the consumer may drop the generator while this next() runs).
coroutine<int> gen_pull(gen_rec* g, async_generator<int>::next_awaiter next, int value) {
  g->pull_started = true;
  std::exception_ptr err;
  std::optional<int> v;
  try {
    v = co_await std::move(next);
  } catch (...) {
    err = std::current_exception();
  }
  if (!err) {
    gen_got_value(g, v);
    co_return value;
  }
  gen_got_error(g, err);
  if (is_cancellation(err)) std::rethrow_exception(err);
  co_return value;
}

/// Takes up to `take` values (a cancellation of this task reaches the generator's await), then
/// ends by `ending`: 0 abandons the generator (destroys it), 1 aclose()s it, 2 starts a second
/// next() in a task halfway and awaits next() (and maybe aclose()) beside it, which must throw
/// invalid_state_error while it runs; then waits for that task or abandons the generator under
/// it; 3 takes every value, then abandons.
coroutine<int> gen_consumer(gen_rec* g, prim_state* p, std::uint8_t pattern, future<int> f, std::chrono::microseconds d,
                            int take, int ending, bool wait_pull, bool consumer_sleeps, int value) {
  auto gen = gen_body(g, p, g->length, g->throw_at, pattern, f, d);
  task<int> pull;
  bool has_pull = false;
  // Declared after gen, so it runs first: a pull task that has not started yet would await a
  // destroyed frame, so it is cancelled (its body then never runs).
  struct unstarted_pull {
    gen_rec* g;
    task<int>* t;
    bool* has;
    ~unstarted_pull() {
      if (*has && !g->pull_started) t->cancel("consumer gone");
    }
  } pull_guard{g, &pull, &has_pull};
  if (ending == 3) take = 8;
  const int race_at = ending == 2 ? take / 2 : -1;
  for (int i = 0; i <= take; ++i) {
    if (i == race_at) {
      has_pull = true;
      pull = create_task(gen_pull(g, gen.next(), value));
      g->pulls.push_back(pull);
      co_await sleep(0s);  // the pull task runs first
      FUZZ_CHECK(g->pull_started);
      if (gen.running()) {
        bool threw = false;
        try {
          (void)co_await gen.next();
        } catch (const invalid_state_error&) {
          threw = true;
        }
        FUZZ_CHECK(threw);
        if (consumer_sleeps) {
          threw = false;
          try {
            co_await gen.aclose();
          } catch (const invalid_state_error&) {
            threw = true;
          }
          FUZZ_CHECK(threw);
        }
      }
      if (!wait_pull) co_return value;  // abandoned, maybe while the pull task runs it
      co_await wait_done(pull);
    }
    if (i == take) break;
    std::exception_ptr err;
    std::optional<int> v;
    try {
      v = co_await gen.next();
    } catch (...) {
      err = std::current_exception();
    }
    if (err) gen_got_error(g, err);
    else gen_got_value(g, v);
    if (err || !v) {
      const std::optional<int> again = co_await gen.next();  // finished: nullopt, at once
      FUZZ_CHECK(!again);
      FUZZ_CHECK(gen.done());
      if (err && is_cancellation(err)) std::rethrow_exception(err);
      break;
    }
    if (consumer_sleeps && i % 2) co_await sleep(0s);
  }
  if (ending == 1) {
    co_await gen.aclose();  // its cleanup has no await: ends at once
    FUZZ_CHECK(gen.done());
    const std::optional<int> again = co_await gen.next();
    FUZZ_CHECK(!again);
    g->ended = true;
  }
  co_return value;
}

/// After every consumer and pull task ended: each guard destroyed once, each error delivered once.
void check_generators(const state& s) {
  for (const auto& g : s.gens) {
    FUZZ_CHECK(g->constructed <= 1);
    FUZZ_CHECK(g->destroyed == g->constructed);
    FUZZ_CHECK(g->received <= g->length);
    FUZZ_CHECK(g->body_errors <= 1);
    FUZZ_CHECK(g->delivered_errors == g->body_errors);
    if (g->delivered_errors) FUZZ_CHECK(g->delivered_error == g->body_error);
    if (g->body_error == describe(std::make_exception_ptr(std::runtime_error("generator boom")))) FUZZ_CHECK(g->received == g->throw_at);
    for (const auto& t : g->pulls) FUZZ_CHECK(t.done());
  }
}

// ---- wait() and as_completed() (op_wait) ----------------------------------------------------

/// op_wait's timeouts: none, zero or a short one.
optional_timeout wait_timeout(int mode, std::chrono::microseconds d) {
  if (mode == 0) return std::nullopt;
  if (mode == 1) return 0s;
  return d;
}
bool timeout_passed(int mode, std::chrono::microseconds d, event_loop::time_point start) {
  return mode != 0 && event_loop::current().time() - start >= (mode == 1 ? std::chrono::microseconds(0) : d);
}
/// The handles of `in` without duplicates (by shared state), in their order.
template <class H>
std::vector<H> distinct_handles(const std::vector<H>& in) {
  std::vector<H> out;
  for (const H& h : in) {
    const bool seen = std::any_of(out.begin(), out.end(), [&](const H& o) { return detail::core_of(o) == detail::core_of(h); });
    if (!seen) out.push_back(h);
  }
  return out;
}
template <class H>
bool has_error(const H& h) {
  return h.done() && !h.cancelled() && h.exception() != nullptr;
}

/// wait(in, {timeout, when}) over earlier tasks or futures (duplicates among them): done and
/// pending split the distinct inputs, done ones are done and pending ones are not (so wait
/// cancelled none), and wait returned only when its return_when (or the timeout) allowed it.
template <class H>
coroutine<int> wait_body(std::vector<H> in, return_when_t when, int tmode, std::chrono::microseconds d, int value) {
  const std::vector<H> distinct = distinct_handles(in);
  const auto start = event_loop::current().time();
  const wait_options options{wait_timeout(tmode, d), when};
  auto result = co_await wait(in, options);
  const bool passed = timeout_passed(tmode, d, start);
  FUZZ_CHECK(result.done.size() + result.pending.size() == distinct.size());
  for (const H& h : distinct) {
    const auto core = detail::core_of(h);
    const auto same = [core](const H& x) { return detail::core_of(x) == core; };
    const auto in_done = std::count_if(result.done.begin(), result.done.end(), same);
    const auto in_pending = std::count_if(result.pending.begin(), result.pending.end(), same);
    FUZZ_CHECK(in_done + in_pending == 1);
  }
  for (const H& h : result.done) FUZZ_CHECK(h.done());
  for (const H& h : result.pending) FUZZ_CHECK(!h.done());
  if (!passed) {
    if (when == first_completed) FUZZ_CHECK(!result.done.empty());
    if (when == all_completed) FUZZ_CHECK(result.pending.empty());
    if (when == first_exception && !result.pending.empty())
      FUZZ_CHECK(std::any_of(result.done.begin(), result.done.end(), [](const H& h) { return has_error(h); }));
  }
  if (std::getenv("FUZZ_TRACE")) std::fprintf(stderr, "  wait %d: %zu done, %zu pending\n", value, result.done.size(), result.pending.size());
  co_return value;
}

/// as_completed(in, timeout) over earlier tasks or futures: one element per distinct input, the
/// k-th passing on the outcome of the k-th child to complete (those done at the call first, in
/// the given order), timeout_error for all the rest once the timeout has passed.
template <class H>
coroutine<int> as_completed_body(std::vector<H> in, int tmode, std::chrono::microseconds d, int value) {
  std::vector<H> distinct = distinct_handles(in);
  std::vector<std::size_t> order;  // indices into distinct, in completion order
  auto later = std::make_shared<std::vector<std::size_t>>();
  for (std::size_t i = 0; i < distinct.size(); ++i)
    if (distinct[i].done()) order.push_back(i);
  for (std::size_t i = 0; i < distinct.size(); ++i) {
    // Registered before as_completed's own callbacks: they run in the same order.
    if (!distinct[i].done()) distinct[i].add_done_callback([later, i](const auto&) { later->push_back(i); });
  }
  const std::size_t done_at_call = order.size();
  const auto start = event_loop::current().time();
  auto range = as_completed(in, wait_timeout(tmode, d));
  FUZZ_CHECK(range.size() == distinct.size());
  std::size_t k = 0;
  bool timed_out_seen = false;
  std::size_t timeouts = 0;
  for (auto next : range) {
    std::exception_ptr err;
    int v = 0;
    try {
      v = co_await next;
    } catch (...) {
      err = std::current_exception();
    }
    order.resize(done_at_call);
    order.insert(order.end(), later->begin(), later->end());
    const H* child = k < order.size() ? &distinct[order[k]] : nullptr;
    if (err && is_cancellation(err) && current_task()->cancelling() > 0) std::rethrow_exception(err);  // this task's
    bool is_timeout = false;
    if (err) {
      try {
        std::rethrow_exception(err);
      } catch (const timeout_error&) {
        is_timeout = !(child && child->done() && has_error(*child) && describe(child->exception()) == describe(err));
      } catch (...) {
      }
    }
    if (is_timeout) {
      if (!timed_out_seen) FUZZ_CHECK(timeout_passed(tmode, d, start));
      timed_out_seen = true;
      ++timeouts;
      ++k;
      continue;
    }
    FUZZ_CHECK(!timed_out_seen);
    FUZZ_CHECK(child != nullptr);
    FUZZ_CHECK(child->done());
    if (!err) FUZZ_CHECK(!child->cancelled() && !child->exception() && child->result() == v);
    else if (is_cancellation(err)) FUZZ_CHECK(child->cancelled());
    else FUZZ_CHECK(has_error(*child) && describe(child->exception()) == describe(err));
    ++k;
  }
  FUZZ_CHECK(k == distinct.size());
  if (std::getenv("FUZZ_TRACE")) std::fprintf(stderr, "  as_completed %d: %zu elements, %zu timed out\n", value, k, timeouts);
  co_return value;
}

// ---- The executor (op_executor) -------------------------------------------------------------

/// The job: waits for its gate, maybe posts a call_soon_threadsafe, counts its run, returns
/// its id or throws. It reads `j` only before counting the run (the schedule may drop it then).
auto job_fn(job_rec* j) {
  return [j, loop = &event_loop::current()]() -> int {
    if (j->gated) j->gate.wait(false);
    const bool throws = j->throws;
    const int id = j->id;
    if (j->threadsafe) loop->call_soon_threadsafe([j] { ++j->ts_runs; });
    j->runs.fetch_add(1);
    if (throws) throw std::runtime_error("job boom");
    return id;
  };
}

/// Awaits a submitted job: its value or its error; a cancellation (the job still runs) passes.
coroutine<int> exec_await(job_rec* j, executor_future<int> f, int value) {
  try {
    const int r = co_await f;
    FUZZ_CHECK(!j->throws);
    FUZZ_CHECK(r == j->id);
    FUZZ_CHECK(j->runs.load() == 1);
  } catch (const cancelled_error&) {
    throw;
  } catch (const timeout_error&) {
    throw;
  } catch (const std::runtime_error& e) {
    FUZZ_CHECK(j->throws);
    FUZZ_CHECK(std::string(e.what()) == "job boom");
  }
  co_return value;
}

/// make_async(job)(): submits when it starts; refused (with the documented error) once
/// shutdown_default_executor ran.
coroutine<int> make_async_body(prim_state* p, job_rec* j, int value) {
  const bool shut = p->default_shut;
  j->submitted = true;
  auto call = make_async(job_fn(j));
  try {
    const int r = co_await call();
    FUZZ_CHECK(!j->throws && r == j->id);
  } catch (const cancelled_error&) {
    throw;
  } catch (const timeout_error&) {
    throw;
  } catch (const std::runtime_error& e) {
    if (std::string(e.what()) == "Executor shutdown has been called") {
      FUZZ_CHECK(shut);
      j->submitted = false;
      j->refused = true;
    } else {
      FUZZ_CHECK(j->throws);
      FUZZ_CHECK(std::string(e.what()) == "job boom");
    }
  }
  co_return value;
}

coroutine<int> exec_shutdown_body(prim_state* p, int value) {
  p->default_shut = true;  // from here on the default executor refuses jobs
  co_await event_loop::current().shutdown_default_executor();
  co_return value;
}

/// Every job that was accepted ran once and its call_soon_threadsafe callback ran once.
bool jobs_settled(const prim_state& p) {
  for (const auto& j : p.jobs) {
    if (j->submitted && j->runs.load() != 1) return false;
    if (j->submitted && j->threadsafe && j->ts_runs != 1) return false;
  }
  return true;
}
void check_jobs(const prim_state& p) {
  for (const auto& j : p.jobs) {
    FUZZ_CHECK(j->runs.load() <= 1);
    FUZZ_CHECK(j->ts_runs <= 1);
    if (j->submitted) FUZZ_CHECK(j->runs.load() == 1);
    else FUZZ_CHECK(j->runs.load() == 0);  // refused, or its make_async task never started
    if (j->refused) FUZZ_CHECK(!j->submitted);
    if (j->submitted && j->threadsafe) FUZZ_CHECK(j->ts_runs == 1);
  }
}

// ---- Signals (op_signal, op_shutdown) ---------------------------------------------------------

/// The library's forwarding handler is the disposition of `sig` (so raising it is safe).
bool library_handles(int sig) {
  struct sigaction a{};
  FUZZ_CHECK(::sigaction(sig, nullptr, &a) == 0);
  return !(a.sa_flags & SA_SIGINFO) && a.sa_handler == &detail::on_signal;
}

void add_sig_handler(sig_rec* r) {
  event_loop& loop = event_loop::current();
  const int gen = ++r->gen;
  const bool self_remove = (r->gen % 3) == 0;  // every third handler removes itself when it runs
  loop.add_signal_handler(r->sig, [r, gen, self_remove, &loop] {
    FUZZ_CHECK(r->installed);  // a removed handler never runs
    FUZZ_CHECK(r->gen == gen); // a replaced one neither: a queued call runs the newest
    // Never more calls than raises. (Not "only while one is expected": kill(getpid()) may be
    // delivered to another thread, whose forward reaches the loop after a later raise().)
    FUZZ_CHECK(r->calls < r->raises);
    r->expect = false;
    ++r->calls;
    if (self_remove) {
      FUZZ_CHECK(loop.remove_signal_handler(r->sig));
      r->installed = false;
    }
  });
  r->installed = true;
}

void raise_sig(int sig, bool to_process) {
  if (to_process) FUZZ_CHECK(::kill(::getpid(), sig) == 0);
  else FUZZ_CHECK(std::raise(sig) == 0);
}

// ---- Utilities (op_utility) ---------------------------------------------------------------

struct stack_journal {
  std::vector<int> pushed, exited;
};
const char* const stack_error = "stack body";
bool is_stack_error(const std::exception_ptr& e) {
  if (!e) return false;
  try {
    std::rethrow_exception(e);
  } catch (const std::runtime_error& x) {
    return std::string(x.what()) == stack_error;
  } catch (...) {
  }
  return false;
}
/// An async context manager: aenter sleeps, aexit records itself, sleeps, suppresses nothing.
struct fz_cm {
  std::shared_ptr<stack_journal> j;
  int id;
  std::chrono::microseconds d;
  coroutine<void> aenter() { co_await sleep(d); }
  coroutine<bool> aexit(std::exception_ptr) {
    j->exited.push_back(id);
    co_await sleep(d);
    co_return false;
  }
};
coroutine<void> exit_sleep(std::shared_ptr<stack_journal> j, int id, std::chrono::microseconds d) {
  j->exited.push_back(id);
  co_await sleep(d);
}
coroutine<bool> exit_suppress(std::shared_ptr<stack_journal> j, int id, std::exception_ptr e) {
  j->exited.push_back(id);
  co_await sleep(0s);
  co_return is_stack_error(e);  // suppresses the body's error only
}

/// Fills a stack with 1-4 exits (callback, async callback, suppressing exit, entered context),
/// runs a body (sleeps, maybe throws), unwinds (itself or what pop_all() moved out of it) with
/// aexit(error). Checked: every registered exit ran exactly once, in LIFO order, whatever was
/// cancelled when; the body's error is suppressed exactly when a suppressing exit saw it.
coroutine<int> exit_stack_body(std::uint8_t plan, std::uint8_t kinds, std::chrono::microseconds d, int value) {
  auto j = std::make_shared<stack_journal>();
  const int n = 1 + plan % 4;
  const bool body_throws = (plan >> 2) & 1;
  const bool use_pop_all = (plan >> 3) & 1;
  bool has_suppressor = false;
  async_exit_stack stack;
  std::exception_ptr err;
  try {
    for (int i = 0; i < n; ++i) {
      switch ((kinds >> (2 * i)) & 3) {
        case 0: stack.callback([j, i] { j->exited.push_back(i); }); break;
        case 1: stack.push_async_callback(exit_sleep, j, i, d); break;
        case 2:
          stack.push_async_exit([j, i](std::exception_ptr e) { return exit_suppress(j, i, std::move(e)); });
          has_suppressor = true;
          break;
        default: {
          fz_cm cm{j, i, d};
          co_await stack.enter_async_context(std::move(cm));  // owned by the stack
          break;
        }
      }
      j->pushed.push_back(i);
      FUZZ_CHECK(stack.size() == j->pushed.size());
    }
    co_await sleep(d);
    if (body_throws) throw std::runtime_error(stack_error);
  } catch (...) {
    err = std::current_exception();
  }
  async_exit_stack moved = use_pop_all ? stack.pop_all() : async_exit_stack{};
  if (use_pop_all) FUZZ_CHECK(stack.empty());
  async_exit_stack& st = use_pop_all ? moved : stack;
  bool suppressed = false;
  std::exception_ptr unwind_error;
  try {
    suppressed = co_await st.aexit(err);
  } catch (...) {
    unwind_error = std::current_exception();
  }
  FUZZ_CHECK(st.empty());
  FUZZ_CHECK(stack.empty());
  const std::vector<int> lifo(j->pushed.rbegin(), j->pushed.rend());
  if (j->exited != lifo) fail("async_exit_stack: exits ran out of LIFO order, twice or not at all");
  if (unwind_error) {
    FUZZ_CHECK(is_cancellation(unwind_error));  // only a cancellation (of an exit's sleep) escapes
    std::rethrow_exception(unwind_error);
  }
  if (suppressed) FUZZ_CHECK(is_stack_error(err) && has_suppressor);
  if (err && !suppressed) {
    if (is_cancellation(err)) std::rethrow_exception(err);
    FUZZ_CHECK(is_stack_error(err));
    // Not suppressed, and no exit raised: no suppressing exit was registered (one would have
    // seen the body's error still pending).
    FUZZ_CHECK(!has_suppressor);
  }
  co_return value;
}

coroutine<int> pred_wait_body(prim_state* p, int target, std::optional<std::chrono::steady_clock::duration> limit, int value) {
  awaitable_predicate pred([p, target] { return p->pred_counter >= target; }, p->pred_cond, limit);
  try {
    co_await pred;
  } catch (const timeout_error&) {
    FUZZ_CHECK(limit.has_value());
    co_return timed_out;
  }
  FUZZ_CHECK(p->pred_counter >= target);
  FUZZ_CHECK(static_cast<bool>(pred));
  co_return value;
}

coroutine<int> pred_notify_body(prim_state* p, int value) {
  auto guard = co_await p->pred_cond->scoped();
  ++p->pred_counter;
  p->pred_cond->notify_all();
  co_return value;
}

coroutine<int> prop_set_body(prim_state* p, int v, bool wait_for_read, int value) {
  if (v >= 0) p->prop_values.push_back(v);
  const int before = p->owner.level();
  bool threw = false;
  try {
    co_await p->owner.prop.set(v, wait_for_read);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  FUZZ_CHECK(threw == (v < 0));
  FUZZ_CHECK(p->owner.level() >= 0);  // a refused value never becomes the level
  if (threw && p->owner.level() != before) FUZZ_CHECK(std::find(p->prop_values.begin(), p->prop_values.end(), p->owner.level()) != p->prop_values.end());
  co_return value;
}

coroutine<int> prop_get_body(prim_state* p, bool with_predicate, std::optional<bool> wait_for_write, int value) {
  get_options<int> options;
  if (with_predicate) options.predicate = [](const int& x) { return x % 2 == 0; };
  options.wait_for_write = wait_for_write;
  const int v = co_await p->owner.prop.get(std::move(options));
  if (with_predicate) FUZZ_CHECK(v % 2 == 0);
  FUZZ_CHECK(v >= 0);
  FUZZ_CHECK(std::find(p->prop_values.begin(), p->prop_values.end(), v) != p->prop_values.end());
  co_return value;
}

coroutine<int> wrapper_await_body(fz_wrapper* w, int value) {
  try {
    const int r = co_await *w;
    FUZZ_CHECK(r == w->value);
    FUZZ_CHECK(w->progress == w->steps);
    FUZZ_CHECK(w->done());
    ++w->completions;
  } catch (const invalid_state_error&) {
    ++w->refusals;  // already awaited, scheduled or closed
  }
  co_return value;
}

/// Holds a registered object across sleeps (destroyed when cancelled), may rename it; checks
/// the registry against the live instances at every step.
coroutine<int> registry_body(prim_state* p, std::uint8_t plan, std::chrono::microseconds d, int value) {
  const std::string key = "k" + std::to_string(plan % 4);
  if ((plan >> 2) & 1) {
    const bool in_use = std::any_of(p->unique_live.begin(), p->unique_live.end(), [&](fz_unique* o) { return o->name == key; });
    std::optional<fz_unique> u;
    try {
      u.emplace(key, &p->unique_live);
    } catch (const std::invalid_argument&) {
      FUZZ_CHECK(in_use);
      check_registry(p->unique_live);
      co_return value;
    }
    FUZZ_CHECK(!in_use);
    check_registry(p->unique_live);
    co_await sleep(d);
    check_registry(p->unique_live);
    co_return value;
  }
  fz_reg o(key, &p->reg_live);
  check_registry(p->reg_live);
  co_await sleep(d);
  if ((plan >> 3) & 1) {
    o.name = "k" + std::to_string((plan >> 4) % 4);  // keys are read when the registry is read
    check_registry(p->reg_live);
    co_await sleep(0s);
  }
  check_registry(p->reg_live);
  co_return value;
}

// ---- Outcomes --------------------------------------------------------------------------------

struct outcome {
  enum { pending, cancelled, value, error } how = pending;
  int v = 0;
  std::string message;
};

template <class F>
outcome outcome_of(const F& f) {
  outcome o;
  if (!f.done()) return o;
  if (f.cancelled()) {
    o.how = outcome::cancelled;
    return o;
  }
  if (auto e = f.exception()) {
    o.how = outcome::error;
    o.message = describe(e);
    return o;
  }
  o.how = outcome::value;
  o.v = f.result();
  return o;
}

/// An outcome that passes a target's outcome on: the same value, or the same error.
void check_passes_on(const outcome& mine, const outcome& target, const char* what) {
  if (mine.how == outcome::value) {
    if (target.how != outcome::value || target.v != mine.v) fail(std::string(what) + ": value does not match its target");
  } else if (mine.how == outcome::error) {
    if (target.how != outcome::error || target.message != mine.message) fail(std::string(what) + ": error does not match its target");
  }
}

void check_consistency(state& s) {
  for (std::size_t i = 0; i < s.tasks.size(); ++i) {
    task_rec& r = s.tasks[i];
    FUZZ_CHECK(r.t.done());
    const outcome mine = outcome_of(r.t);
    FUZZ_CHECK(mine.how != outcome::pending);
    auto target = [&](int j) { return outcome_of(s.tasks[static_cast<std::size_t>(j)].t); };
    switch (r.kind) {
      case k_sleep:
      case k_yield:
      case k_stubborn:
      case k_fd:
        FUZZ_CHECK(mine.how != outcome::error);
        if (mine.how == outcome::value) FUZZ_CHECK(mine.v == r.value);
        break;
      case k_throw:
        FUZZ_CHECK(mine.how != outcome::value);
        if (mine.how == outcome::error) FUZZ_CHECK(mine.message == "boom");
        break;
      case k_await_future: check_passes_on(mine, outcome_of(s.futures[static_cast<std::size_t>(r.a)]), "await future"); break;
      case k_await_task:
      case k_shield: check_passes_on(mine, target(r.a), "await task"); break;
      case k_wait_for_task:
      case k_wait_for_future: {
        outcome t = r.kind == k_wait_for_task ? target(r.a) : outcome_of(s.futures[static_cast<std::size_t>(r.a)]);
        // A timeout only when the target ended cancelled (a target may itself pass a timed_out on).
        if (mine.how == outcome::value && mine.v == timed_out && t.how != outcome::value) FUZZ_CHECK(t.how == outcome::cancelled);
        else check_passes_on(mine, t, "wait_for");
        break;
      }
      case k_gather: {
        outcome x = target(r.a), y = target(r.b);
        if (mine.how == outcome::value) {
          FUZZ_CHECK(x.how == outcome::value && y.how == outcome::value);
          FUZZ_CHECK(mine.v == x.v + y.v);
        } else if (mine.how == outcome::error) {
          FUZZ_CHECK((x.how == outcome::error && x.message == mine.message) || (y.how == outcome::error && y.message == mine.message));
        }
        break;
      }
      case k_gather_exc: {
        FUZZ_CHECK(mine.how != outcome::error);
        if (mine.how == outcome::value) {
          outcome x = target(r.a), y = target(r.b);
          FUZZ_CHECK(x.how != outcome::pending && y.how != outcome::pending);
          FUZZ_CHECK(mine.v == (x.how == outcome::value ? x.v : 0) + (y.how == outcome::value ? y.v : 0));
        }
        break;
      }
      case k_wait_done:
        FUZZ_CHECK(mine.how != outcome::error);
        if (mine.how == outcome::value) FUZZ_CHECK(mine.v == 0);
        break;
      case k_lock:
      case k_semaphore:
      case k_cond_wait:
      case k_cond_notify:
      case k_event_wait:
      case k_queue_put:
      case k_queue_get:
      case k_queue_join:
      case k_acc_set:
      case k_acc_get:
      case k_nursery_stop:
      case k_nursery_close:
      case k_group:
      case k_timeout:
      case k_stream_read:
      case k_stream_drain:
      case k_gen_consumer:
      case k_wait:
      case k_as_completed:
      case k_exec:
      case k_exec_shutdown:
      case k_exit_stack:
      case k_pred_wait:
      case k_pred_notify:
      case k_prop_set:
      case k_prop_get:
      case k_wrapper:
      case k_registry:
        FUZZ_CHECK(mine.how != outcome::error);
        if (mine.how == outcome::value) FUZZ_CHECK(mine.v == r.value || mine.v == timed_out);
        break;
      case k_wrapper_task:  // the wrapper's value, or refused as awaited before
        if (mine.how == outcome::value) FUZZ_CHECK(mine.v == r.value);
        if (mine.how == outcome::error) FUZZ_CHECK(mine.message.find("coroutine_wrapper") != std::string::npos);
        break;
      default: fail("unknown task kind");
    }
  }
}

// ---- The primitives at the end ---------------------------------------------------------------

/// After every task ended: no waiter is left anywhere, nothing is held, the queue lost and
/// duplicated no item, the stream carried every byte in order. Then the nurseries close and
/// the stream is closed.
coroutine<void> check_primitives(state& s) {
  prim_state& p = *s.p;
  for (int i = 0; i < 2; ++i) {
    FUZZ_CHECK(!p.locks[i].locked());
    FUZZ_CHECK(p.lock_holders[i] == 0);
    FUZZ_CHECK((p.locks[i].*get(lock_waiters{})).empty());
  }
  FUZZ_CHECK(p.sem_holders == 0);
  FUZZ_CHECK((p.sem.*get(semaphore_waiters{})).empty());
  FUZZ_CHECK((p.sem.*get(semaphore_handed{})).empty());
  FUZZ_CHECK(p.sem.*get(semaphore_value{}) == 2);  // every unit given back
  FUZZ_CHECK(!p.sem.locked());
  FUZZ_CHECK(!p.cond.locked());
  FUZZ_CHECK(p.cond_holders == 0);
  FUZZ_CHECK((p.cond.*get(condition_waiters{})).empty());
  FUZZ_CHECK((p.ev.*get(event_waiters{})).empty());
  FUZZ_CHECK((p.q.*get(queue_getters{})).empty());
  FUZZ_CHECK((p.q.*get(queue_putters{})).empty());
  FUZZ_CHECK((p.q.*get(queue_joiners{})).empty());
  FUZZ_CHECK(p.q.*get(queue_unfinished{}) == p.q.qsize());  // task_done() for every item taken
  FUZZ_CHECK((p.q.*get(queue_woken{})).empty());
  FUZZ_CHECK(p.q.*get(queue_claimed_items{}) == 0);
  FUZZ_CHECK(p.q.*get(queue_claimed_slots{}) == 0);
  // Items: what was put is what was taken plus what is left, each exactly once.
  std::vector<int> out = p.got;
  while (!p.q.empty()) out.push_back(p.q.get_nowait());
  std::vector<int> in = p.put_ok;
  std::sort(out.begin(), out.end());
  std::sort(in.begin(), in.end());
  FUZZ_CHECK(in == out);
  FUZZ_CHECK(!static_cast<bool>(p.acc.has_waiting_read));

  for (auto& rec : p.nurseries) {
    co_await rec->n->aclose();
    FUZZ_CHECK(rec->n->closed());
    FUZZ_CHECK(rec->n->tasks().empty());
    for (auto& c : rec->children) FUZZ_CHECK(c.done());
  }
  p.nurseries.clear();

  if (p.reader) {
    // Peer -> reader: after the peer's EOF, the rest is exactly what the peer sent.
    if (!p.peer_closed && !p.peer_write_shut) {
      ::shutdown(p.peer, SHUT_WR);
      p.peer_write_shut = true;
    }
    std::string rest;
    bool failed = false;
    try {
      rest = co_await p.reader->read();
    } catch (const std::system_error&) {
      failed = true;
    }
    p.stream_got += rest;
    if (!p.peer_reset && !p.writer_closed) FUZZ_CHECK(!failed);  // (closing the writer closes the connection)
    if (!p.peer_reset && !p.writer_closed && p.stream_got != p.peer_sent)
      fail("stream: read \"" + p.stream_got + "\", the peer sent \"" + p.peer_sent + "\"");
    FUZZ_CHECK(p.stream_consistent());
    // Writer -> peer: close() flushes; the peer then reads every byte and EOF.
    p.writer->close();
    try {
      co_await p.writer->wait_closed();
    } catch (const std::system_error&) {
      FUZZ_CHECK(p.peer_closed);
    }
    if (!p.peer_closed) {
      char buf[256];
      ssize_t n;
      while ((n = ::recv(p.peer, buf, sizeof buf, MSG_DONTWAIT)) > 0) p.peer_got.append(buf, static_cast<std::size_t>(n));
      if (n == 0) {  // EOF: the close went through after every byte
        FUZZ_CHECK(p.peer_got == p.stream_sent);
      } else {
        // Closed with bytes from the peer unread, the stream resets the connection (only a
        // close in the schedule can leave some: the read above took them all).
        FUZZ_CHECK(errno == ECONNRESET && p.writer_closed);
        FUZZ_CHECK(p.stream_sent.compare(0, p.peer_got.size(), p.peer_got) == 0);
      }
      ::close(p.peer);
      p.peer = -1;
    }
    p.reader.reset();
    p.writer.reset();
  }
  if (p.peer >= 0) ::close(p.peer);

  // Executor: every accepted job ran once, refused ones never; the pool joins its threads.
  check_jobs(p);
  if (p.pool) p.pool->shutdown(true);
  // Utilities: no waiter left on the predicate's condition or the property; wrappers ended
  // (each awaited to its end at most once, never after a close() before it started);
  // the registries list exactly the live instances (none once every task ended).
  FUZZ_CHECK(!p.pred_cond->locked());
  FUZZ_CHECK((p.pred_cond.get()->*get(condition_waiters{})).empty());
  FUZZ_CHECK(!static_cast<bool>(p.owner.prop.get_accessor().has_waiting_read));
  for (auto& w : p.wrappers) {
    FUZZ_CHECK(!w->running());
    FUZZ_CHECK(w->completions <= 1);
    FUZZ_CHECK(w->progress <= w->steps);
    if (w->closed_fresh) FUZZ_CHECK(w->progress == 0 && w->completions == 0);
  }
  FUZZ_CHECK(p.reg_live.empty() && p.unique_live.empty());
  FUZZ_CHECK(fz_reg::registry().empty() && fz_unique::registry().empty());
  s.p.reset();
}

// ---- The schedule ----------------------------------------------------------------------------

enum op : std::uint8_t {
  op_spawn,
  op_cancel_task,
  op_set_result,
  op_set_exception,
  op_cancel_future,
  op_new_future,
  op_yield,
  op_sleep,
  op_call_soon,
  op_call_later,
  op_cancel_handle,
  op_write_socket,
  op_drain_socket,
  op_add_done_callback,
  op_remove_done_callback,
  op_main_wait_for,
  op_call_soon_threadsafe,
  op_reopen_socket,  // closes the socket pair under its waiters and opens a new one
  op_lock,          // a k_lock task
  op_semaphore,     // a k_semaphore task
  op_condition,     // a k_cond_wait (wait or wait_for) or k_cond_notify (notify(n), notify_all) task
  op_event,         // event set() / clear(), or a k_event_wait task
  op_queue,         // put_nowait / get_nowait / task_done, or a put, get or join task
  op_accessor,      // a k_acc_set or k_acc_get task
  op_nursery,       // a new task_nursery; a child; stop_task(child); aclose()
  op_task_group,    // a k_group task
  op_timeout,       // a k_timeout task
  op_stream_read,   // a k_stream_read task (one at a time)
  op_stream_write,  // stream_writer write() (+ a drain task) or close()
  op_stream_peer,   // the raw peer: send, recv, shutdown(SHUT_WR), close (clean or with a reset)
  op_cancel_recent, // cancels the newest pending task (most likely waiting on a primitive)
  op_async_gen,     // a k_gen_consumer task driving a new async_generator
  op_wait,          // a k_wait or k_as_completed task over earlier tasks or futures
  op_executor,      // a job (default executor, to_thread, own thread_pool, make_async), a gate
                    // opened, the pool shut down, shutdown_default_executor, set_default_executor
  op_signal,        // add / remove a SIGUSR1 / SIGUSR2 handler, raise the signal (maybe while removing)
  op_utility,       // async_exit_stack, awaitable_predicate, condition_property, coroutine_wrapper,
                    // registry
  op_shutdown,      // a nursery shut down by SIGHUP (setup_shutdown_handling): ends the schedule
  op_count
};
static_assert(op_count == 37);

void spawn(state& s, reader& in) {
  const auto index = static_cast<int>(s.tasks.size());
  const auto kind = static_cast<task_kind>(in.byte() % k_kinds);
  const int value = 1000 + index;
  const auto d = in.duration();
  const int n = in.byte() % 4;
  task_rec r{{}, kind, value};
  auto pick_task = [&] { return index == 0 ? -1 : static_cast<int>(in.byte() % static_cast<unsigned>(index)); };
  auto earlier = [&](int j) { return s.tasks[static_cast<std::size_t>(j)].t; };
  auto pick_future = [&] { return static_cast<int>(in.byte() % s.futures.size()); };
  switch (kind) {
    case k_sleep:
    case k_yield:
    case k_stubborn:
    case k_throw:
    case k_fd: r.t = create_task(leaf(kind, value, d, n, s.sock[0])); break;
    case k_await_future:
      r.a = pick_future();
      r.t = create_task(await_future(s.futures[static_cast<std::size_t>(r.a)]));
      break;
    case k_wait_for_future: {
      r.a = pick_future();
      const auto timeout = n == 3 ? std::chrono::microseconds(std::chrono::hours(1)) : d;
      r.t = create_task(wait_for_target(s.futures[static_cast<std::size_t>(r.a)], timeout));
      break;
    }
    default: {
      r.a = pick_task();
      r.b = pick_task();
      if (r.a < 0) {  // no earlier task to await: a plain sleeper instead
        r.kind = k_sleep;
        r.t = create_task(leaf(k_sleep, value, d, n, -1));
        break;
      }
      const auto timeout = n == 3 ? std::chrono::microseconds(std::chrono::hours(1)) : d;
      switch (kind) {
        case k_await_task: r.t = create_task(await_task(earlier(r.a))); break;
        case k_wait_for_task: r.t = create_task(wait_for_target(earlier(r.a), timeout)); break;
        case k_gather: r.t = create_task(gather_two(earlier(r.a), earlier(r.b))); break;
        case k_gather_exc: r.t = create_task(gather_two_exc(earlier(r.a), earlier(r.b))); break;
        case k_shield: r.t = create_task(shielded(earlier(r.a))); break;
        case k_wait_done: r.t = create_task(await_done(earlier(r.a))); break;
        default: fail("unhandled task kind");
      }
    }
  }
  s.tasks.push_back(r);
}

int next_value(const state& s) { return 1000 + static_cast<int>(s.tasks.size()); }
void add_task(state& s, task_kind kind, task<int> t) {
  task_rec r{std::move(t), kind, next_value(s)};
  s.tasks.push_back(r);
}

void open_stream_pair(prim_state& p) {
  int sv[2];
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  auto [r, w] = open_stream(sv[0]);
  p.reader.emplace(std::move(r));
  p.writer.emplace(std::move(w));
  p.peer = sv[1];
}

/// Bytes with separators in them often ('\n', "ab").
std::string chunk_of(reader& in, std::size_t n) {
  static constexpr char alphabet[] = "ab\nxyz";
  std::string out;
  for (std::size_t i = 0; i < n; ++i) out += alphabet[in.byte() % 6];
  return out;
}

/// The opcodes op_lock .. op_cancel_recent.
coroutine<void> primitive_op(state& s, op code, std::uint8_t arg, reader& in) {
  prim_state& p = *s.p;
  const int value = next_value(s);
  const auto mode = static_cast<guard_mode>(arg % g_modes);
  const auto d = in.duration();
  auto guard = [&](coroutine<int> c) { return guarded(mode, d, std::move(c)); };
  const auto hold_for = std::chrono::microseconds(50 * ((arg >> 2) % 4));
  switch (code) {
    case op_lock: add_task(s, k_lock, create_task(guard(lock_body(&p, (arg >> 4) & 1, hold_for, (arg >> 5) & 1, value)))); break;
    case op_semaphore: add_task(s, k_semaphore, create_task(guard(semaphore_body(&p, hold_for, value)))); break;
    case op_condition:
      if ((arg >> 2) & 1) add_task(s, k_cond_notify, create_task(cond_notify_body(&p, (arg >> 3) % 3, value)));
      else add_task(s, k_cond_wait, create_task(guard(cond_wait_body(&p, p.cond_counter + (arg >> 4) % 3, (arg >> 3) & 1, value))));
      break;
    case op_event:
      switch ((arg >> 2) % 3) {
        case 0: p.ev.set(); FUZZ_CHECK(p.ev.is_set()); break;
        case 1: p.ev.clear(); FUZZ_CHECK(!p.ev.is_set()); break;
        default: add_task(s, k_event_wait, create_task(guard(event_wait_body(&p, value)))); break;
      }
      break;
    case op_queue:
      switch ((arg >> 2) % 6) {
        case 0: {
          const bool was_full = p.q.full();
          const int item = p.next_item++;
          try {
            p.q.put_nowait(item);
            FUZZ_CHECK(!was_full);
            p.put_ok.push_back(item);
          } catch (const queue_full&) {
            FUZZ_CHECK(was_full);
          }
          break;
        }
        case 1: {
          const bool was_empty = p.q.empty();
          try {
            p.got.push_back(p.q.get_nowait());
            FUZZ_CHECK(!was_empty);
            p.q.task_done();
          } catch (const queue_empty&) {
            FUZZ_CHECK(was_empty);
          }
          break;
        }
        case 2: add_task(s, k_queue_put, create_task(guard(queue_put_body(&p, value)))); break;
        case 3: add_task(s, k_queue_join, create_task(guard(queue_join_body(&p, value)))); break;
        default: add_task(s, k_queue_get, create_task(guard(queue_get_body(&p, value)))); break;
      }
      break;
    case op_accessor: {
      const std::uint8_t how = in.byte();
      if ((arg >> 2) & 1) {
        add_task(s, k_acc_set, create_task(guard(acc_set_body(&p, how % 8, (arg >> 3) & 1, value))));
      } else {
        const std::optional<bool> wfw = how % 3 == 0 ? std::nullopt : std::optional<bool>(how % 3 == 1);
        add_task(s, k_acc_get, create_task(guard(acc_get_body(&p, (arg >> 3) & 1, wfw, value))));
      }
      break;
    }
    case op_nursery: {
      nursery_rec* rec = p.nurseries.empty() ? nullptr : p.nurseries.back().get();
      switch ((arg >> 2) % 4) {
        case 0:
          if (!rec || rec->close_requested) {
            if (p.nurseries.size() < 4) {
              p.nurseries.push_back(std::make_unique<nursery_rec>());
              p.nurseries.back()->n = std::make_unique<task_nursery>();
            }
          } else {
            const task_kind kind = (arg >> 4) % 3 == 0 ? k_sleep : (arg >> 4) % 3 == 1 ? k_yield : k_stubborn;
            auto child = rec->n->create_task(leaf(kind, value, hold_for, 2, -1));
            rec->children.push_back(child);
            task_rec r{child, kind, value};
            s.tasks.push_back(r);
          }
          break;
        case 1:
          if (rec && !rec->children.empty()) {
            task<int> child = rec->children[in.byte() % rec->children.size()];
            add_task(s, k_nursery_stop, create_task(nursery_stop_body(rec, child, value)));
          }
          break;
        case 2:
          if (rec) {
            rec->close_requested = true;
            add_task(s, k_nursery_close, create_task(nursery_close_body(rec, value)));
          }
          break;
        default:
          if (rec && rec->close_requested) {  // a closing nursery refuses new work
            bool threw = false;
            try {
              rec->n->create_task(leaf(k_sleep, 0, 0us, 0, -1));
            } catch (const std::runtime_error&) {
              threw = true;
            }
            // aclose() starts when its task runs: until then the nursery still takes work.
            if (!threw) FUZZ_CHECK(!rec->n->closed());
          }
          break;
      }
      break;
    }
    case op_executor: {
      event_loop& loop = event_loop::current();
      switch (arg % 8) {
        case 0:
        case 1:
        case 2:
        case 3: {
          if (p.jobs.size() >= 24) break;
          const std::uint8_t flags = in.byte();
          p.jobs.push_back(std::make_unique<job_rec>());
          job_rec* j = p.jobs.back().get();
          j->id = static_cast<int>(p.jobs.size());
          j->gated = (flags & 3) != 0;
          j->throws = (flags >> 2) & 1;
          j->threadsafe = (flags >> 3) & 1;
          const auto how = static_cast<guard_mode>((flags >> 4) % g_modes);
          const int where = arg % 8;
          if (where == 3) {
            add_task(s, k_exec, create_task(guarded(how, d, make_async_body(&p, j, value))));
            break;
          }
          if (where == 2 && !p.pool) p.pool = std::make_unique<thread_pool_executor>(1 + ((flags >> 6) & 1));
          const bool shut = where == 2 ? p.pool_shut : p.default_shut;
          try {
            auto fn = job_fn(j);
            executor_future<int> f = where == 0   ? run_in_executor(fn)
                                     : where == 1 ? to_thread(fn)
                                                  : loop.run_in_executor(*p.pool, fn);
            FUZZ_CHECK(!shut);
            j->submitted = true;
            add_task(s, k_exec, create_task(guarded(how, d, exec_await(j, std::move(f), value))));
          } catch (const std::runtime_error& e) {
            // The documented refusals: a thread_pool after shutdown(), the default executor
            // after shutdown_default_executor().
            FUZZ_CHECK(shut);
            FUZZ_CHECK(std::string(e.what()) == (where == 2 ? "cannot schedule new jobs after shutdown" : "Executor shutdown has been called"));
            j->refused = true;
          }
          break;
        }
        case 4:  // opens the oldest closed gate (the job runs now; queued ones behind it follow)
          for (auto& j : p.jobs) {
            if (j->gated && !j->gate.load()) {
              j->open();
              break;
            }
          }
          break;
        case 5:  // shutdown(wait=false) with jobs queued: they still run, new ones are refused
          if (p.pool) {
            p.pool->shutdown(false);
            p.pool_shut = true;
          }
          break;
        case 6: add_task(s, k_exec_shutdown, create_task(exec_shutdown_body(&p, value))); break;
        default:
          if (!p.default_shut) loop.set_default_executor(static_cast<std::size_t>(1 + ((arg >> 3) & 1)));
          break;
      }
      break;
    }
    case op_utility:
      switch (arg % 8) {
        case 0: {
          const std::uint8_t plan = in.byte();
          add_task(s, k_exit_stack, create_task(exit_stack_body(plan, in.byte(), d, value)));
          break;
        }
        case 1: {
          const int target = p.pred_counter + (arg >> 3) % 3;
          std::optional<std::chrono::steady_clock::duration> limit;
          if ((arg >> 5) & 1) limit = std::chrono::microseconds(d);
          add_task(s, k_pred_wait, create_task(pred_wait_body(&p, target, limit, value)));
          break;
        }
        case 2: add_task(s, k_pred_notify, create_task(pred_notify_body(&p, value))); break;
        case 3: {
          const int v = static_cast<int>(in.byte() % 8) - 1;
          add_task(s, k_prop_set, create_task(guard(prop_set_body(&p, v, (arg >> 3) & 1, value))));
          break;
        }
        case 4: {
          const std::uint8_t how = in.byte();
          const std::optional<bool> wfw = how % 3 == 0 ? std::nullopt : std::optional<bool>(how % 3 == 1);
          add_task(s, k_prop_get, create_task(guard(prop_get_body(&p, (arg >> 3) & 1, wfw, value))));
          break;
        }
        case 5:  // a new wrapper, awaited by a task or scheduled itself
          if (p.wrappers.size() < 8) {
            p.wrappers.push_back(std::make_unique<fz_wrapper>((arg >> 3) % 3, hold_for, value));
            fz_wrapper* w = p.wrappers.back().get();
            if ((arg >> 5) & 1) add_task(s, k_wrapper_task, create_task(std::ref(*w)));
            else add_task(s, k_wrapper, create_task(wrapper_await_body(w, value)));
          }
          break;
        case 6:  // the newest wrapper awaited again (refused), or close()d
          if (!p.wrappers.empty()) {
            fz_wrapper* w = p.wrappers.back().get();
            if ((arg >> 3) & 1) {
              add_task(s, k_wrapper, create_task(wrapper_await_body(w, value)));
            } else {
              const bool running = w->running(), fresh = !w->started();
              bool threw = false;
              try {
                w->close();
              } catch (const invalid_state_error&) {
                threw = true;
              }
              FUZZ_CHECK(threw == running);
              if (fresh) w->closed_fresh = true;
            }
          }
          break;
        default: {
          check_registry(p.reg_live);
          check_registry(p.unique_live);
          const std::uint8_t plan = in.byte();
          add_task(s, k_registry, create_task(registry_body(&p, plan, hold_for, value)));
          break;
        }
      }
      break;
    case op_task_group: add_task(s, k_group, create_task(group_body(d, in.byte(), value))); break;
    case op_timeout: add_task(s, k_timeout, create_task(timeout_body(d, hold_for, (arg >> 4) & 1, value))); break;
    case op_stream_read: {
      if (!p.reader) open_stream_pair(p);
      if (p.reader_task >= 0 && !s.tasks[static_cast<std::size_t>(p.reader_task)].t.done()) {
        co_await sleep(0s);  // one read at a time (a second one throws, as in asyncio)
        break;
      }
      const int n = 1 + in.byte() % 8;
      p.reader_task = static_cast<int>(s.tasks.size());
      add_task(s, k_stream_read, create_task(stream_read_body(&p, (arg >> 2) % 5, n, static_cast<guard_mode>((arg >> 5) % g_modes), d, value)));
      break;
    }
    case op_stream_write: {
      if (!p.writer) open_stream_pair(p);
      if (p.writer_closed) break;
      if ((arg >> 2) % 8 == 0) {
        p.writer->close();
        p.writer_closed = true;
        break;
      }
      const std::string data = chunk_of(in, 1 + (arg >> 3) % 16);
      p.writer->write(data);
      p.stream_sent += data;
      if ((arg >> 7) & 1) add_task(s, k_stream_drain, create_task(stream_drain_body(&p, value)));
      break;
    }
    case op_stream_peer: {
      if (p.peer < 0 && !p.peer_closed) open_stream_pair(p);
      if (p.peer_closed) break;
      switch ((arg >> 2) % 6) {
        case 0:
        case 1:
          if (!p.peer_write_shut) {
            const std::string data = chunk_of(in, 1 + (arg >> 4) % 12);
            const ssize_t n = ::send(p.peer, data.data(), data.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n > 0) p.peer_sent += data.substr(0, static_cast<std::size_t>(n));
          }
          break;
        case 2:
        case 3: {
          char buf[64];
          const ssize_t n = ::recv(p.peer, buf, 1 + (arg >> 5) % sizeof buf, MSG_DONTWAIT);
          if (n > 0) p.peer_got.append(buf, static_cast<std::size_t>(n));
          FUZZ_CHECK(p.stream_sent.compare(0, p.peer_got.size(), p.peer_got) == 0);
          break;
        }
        case 4:
          ::shutdown(p.peer, SHUT_WR);
          p.peer_write_shut = true;
          break;
        default: {
          // Unread data in the peer makes the close a reset for the stream.
          int unread = 0;
          FUZZ_CHECK(::ioctl(p.peer, FIONREAD, &unread) == 0);
          if (unread > 0 || !p.stream_sent.empty()) p.peer_reset = true;
          ::close(p.peer);
          p.peer = -1;
          p.peer_closed = true;
          break;
        }
      }
      break;
    }
    case op_cancel_recent:
      for (auto it = s.tasks.rbegin(); it != s.tasks.rend(); ++it) {
        if (!it->t.done()) {
          it->cancelled_by_schedule = true;
          FUZZ_CHECK(it->t.cancel("schedule"));
          break;
        }
      }
      break;
    default: fail("unknown opcode");
  }
}

coroutine<void> schedule(state& s, reader& in) {
  static const bool trace = std::getenv("FUZZ_TRACE") != nullptr;  // prints the opcodes
  event_loop& loop = event_loop::current();
  // Our own handler, so that a task_nursery does not install codestare's handle_exception
  // (which would shut the loop down at the first failed task).
  loop.set_exception_handler([](event_loop& l, const exception_context& c) { l.default_exception_handler(c); });
  s.p = std::make_unique<prim_state>();
  s.futures.push_back(loop.create_future<int>());
  s.futures.push_back(loop.create_future<int>());
  for (std::size_t ops = 0; in.more() && ops < max_ops; ++ops) {
    const auto code = static_cast<op>(in.byte() % op_count);
    const std::uint8_t arg = in.byte();
    if (trace) std::fprintf(stderr, "op %d arg %d (tasks %zu)\n", static_cast<int>(code), arg, s.tasks.size());
    switch (code) {
      case op_spawn:
        if (s.tasks.size() < max_tasks) spawn(s, in);
        break;
      case op_cancel_task:
        if (!s.tasks.empty()) {
          task_rec& r = s.tasks[arg % s.tasks.size()];
          r.cancelled_by_schedule = true;
          const bool was_done = r.t.done();
          FUZZ_CHECK(r.t.cancel("schedule") == !was_done);
        }
        break;
      case op_set_result:
      case op_set_exception:
      case op_cancel_future: {
        future<int>& f = s.futures[arg % s.futures.size()];
        if (f.done()) {
          if (code == op_set_result) {
            bool threw = false;
            try {
              f.set_result(1);
            } catch (const invalid_state_error&) {
              threw = true;
            }
            FUZZ_CHECK(threw);
          } else if (code == op_cancel_future) {
            FUZZ_CHECK(!f.cancel());
          }
        } else if (code == op_set_result) {
          f.set_result(500 + arg);
        } else if (code == op_set_exception) {
          f.set_exception(std::make_exception_ptr(std::runtime_error("future failed")));
        } else {
          FUZZ_CHECK(f.cancel("schedule"));
          FUZZ_CHECK(f.cancelled());
        }
        break;
      }
      case op_new_future:
        if (s.futures.size() < max_futures) s.futures.push_back(loop.create_future<int>());
        break;
      case op_yield: co_await sleep(0s); break;
      case op_sleep: co_await sleep(std::chrono::microseconds(50 * (arg % 4))); break;
      case op_call_soon:
      case op_call_later:
      case op_call_soon_threadsafe:
        if (s.handles.size() < max_handles) {
          int* runs = &s.handle_runs[s.handles.size()];
          auto fn = [runs] { ++*runs; };
          handle h = code == op_call_soon              ? loop.call_soon(fn)
                     : code == op_call_soon_threadsafe ? loop.call_soon_threadsafe(fn)
                                                       : loop.call_later(std::chrono::microseconds(50 * (arg % 4)), fn);
          s.handles.push_back({h, code != op_call_later});
        }
        break;
      case op_cancel_handle:
        if (!s.handles.empty()) {
          const std::size_t i = arg % s.handles.size();
          handle_rec& h = s.handles[i];
          if (h.runs_at_cancel < 0) h.runs_at_cancel = s.handle_runs[i];
          h.h.cancel();
          FUZZ_CHECK(h.h.cancelled());
        }
        break;
      case op_write_socket: FUZZ_CHECK(::write(s.sock[1], "x", 1) == 1); break;
      case op_reopen_socket:
        // Waiters on the old descriptors may never wake (as in asyncio); the drain cancels them.
        // New waits on a reused number must work: the loop has to arm them anew.
        ::close(s.sock[0]);
        ::close(s.sock[1]);
        FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, s.sock) == 0);
        break;
      case op_drain_socket: {
        char buf[64];
        while (::recv(s.sock[0], buf, sizeof buf, MSG_DONTWAIT) > 0) {
        }
        break;
      }
      case op_add_done_callback:
        if (s.done_cbs.size() < max_handles) {
          const int target = arg % static_cast<int>(s.futures.size());
          int* runs = &s.done_cb_runs[s.done_cbs.size()];
          future<int>& f = s.futures[static_cast<std::size_t>(target)];
          s.inside_add_done_callback = true;
          bool* inside = &s.inside_add_done_callback;
          done_cb_rec rec{target, 0, false, f.done()};
          rec.id = f.add_done_callback([runs, inside](future<int> done) {
            if (*inside) fail("a done callback ran inline");
            if (!done.done()) fail("a done callback ran before its future was done");
            ++*runs;
          });
          s.inside_add_done_callback = false;
          s.done_cbs.push_back(rec);
        }
        break;
      case op_remove_done_callback:
        if (!s.done_cbs.empty()) {
          done_cb_rec& rec = s.done_cbs[arg % s.done_cbs.size()];
          future<int>& f = s.futures[static_cast<std::size_t>(rec.target)];
          const bool was_scheduled = f.done();  // once done, callbacks are scheduled, not removable
          const std::size_t removed = f.remove_done_callback(rec.id);
          if (!rec.removed && !was_scheduled) FUZZ_CHECK(removed == 1);
          if (rec.removed || was_scheduled) FUZZ_CHECK(removed == 0);
          if (removed) rec.removed = true;
        }
        break;
      case op_main_wait_for:
        if (!s.tasks.empty()) {
          task<int> t = s.tasks[arg % s.tasks.size()].t;
          try {
            (void)co_await wait_for(t, std::chrono::microseconds(50 * (arg % 4)));
          } catch (const timeout_error&) {
            FUZZ_CHECK(t.cancelled());
          } catch (const cancelled_error&) {
            FUZZ_CHECK(t.cancelled());
          } catch (const std::runtime_error&) {
            FUZZ_CHECK(t.exception() != nullptr);
          }
        }
        break;
      case op_async_gen:
        if (s.tasks.size() < max_tasks) {
          s.gens.push_back(std::make_unique<gen_rec>());
          gen_rec* g = s.gens.back().get();
          g->length = in.byte() % 6;
          const int throw_byte = in.byte() % 8;
          g->throw_at = throw_byte < g->length ? throw_byte : -1;
          const std::uint8_t pattern = in.byte();
          future<int> f = s.futures[in.byte() % s.futures.size()];
          const auto d = in.duration();
          if (trace) std::fprintf(stderr, "  async_gen length %d throw_at %d pattern %d ending %d take %d\n", g->length, g->throw_at, pattern, arg & 3, (arg >> 2) % 5);
          add_task(s, k_gen_consumer,
                   create_task(gen_consumer(g, s.p.get(), pattern, f, d, (arg >> 2) % 5, arg & 3, (arg >> 5) & 1, (arg >> 6) & 1, next_value(s))));
        }
        break;
      case op_wait:
        // arg: bit 0 as_completed, bit 1 futures, bits 2-3 return_when, bits 4-5 timeout mode
        // (none, zero, short); then a count byte and one index byte per input (repeats allowed).
        if (s.tasks.size() < max_tasks) {
          const bool use_futures = (arg >> 1) & 1;
          if (!use_futures && s.tasks.empty()) break;
          const auto when = static_cast<return_when_t>(((arg >> 2) & 3) % 3);
          const int tmode = ((arg >> 4) & 3) % 3;
          const auto d = in.duration();
          const int count = 1 + in.byte() % 4;
          std::vector<task<int>> ts;
          std::vector<future<int>> fs;
          for (int i = 0; i < count; ++i) {
            const std::uint8_t b = in.byte();
            if (use_futures) fs.push_back(s.futures[b % s.futures.size()]);
            else ts.push_back(s.tasks[b % s.tasks.size()].t);
          }
          if (trace) std::fprintf(stderr, "  %s over %d %s, when %d, timeout mode %d\n", (arg & 1) ? "as_completed" : "wait", count, use_futures ? "futures" : "tasks", static_cast<int>(when), tmode);
          const int value = next_value(s);
          if (arg & 1) {
            add_task(s, k_as_completed,
                     use_futures ? create_task(as_completed_body(std::move(fs), tmode, d, value)) : create_task(as_completed_body(std::move(ts), tmode, d, value)));
          } else {
            add_task(s, k_wait,
                     use_futures ? create_task(wait_body(std::move(fs), when, tmode, d, value)) : create_task(wait_body(std::move(ts), when, tmode, d, value)));
          }
        }
        break;
      case op_signal: {
        // arg: bit 0 SIGUSR2 (else SIGUSR1), bits 1-3 what, bit 4 kill(getpid()) (else raise()).
        sig_rec* r = &s.sigs[arg & 1];
        const bool to_process = (arg >> 4) & 1;
        switch ((arg >> 1) % 6) {
          case 0:
          case 1: add_sig_handler(r); break;  // new, or replacing the installed one
          case 2: {
            const bool removed = loop.remove_signal_handler(r->sig);
            FUZZ_CHECK(removed == r->installed);
            r->installed = false;
            r->expect = false;
            break;
          }
          case 3:
          case 4:
            if (r->installed) {
              FUZZ_CHECK(library_handles(r->sig));
              raise_sig(r->sig, to_process);
              ++r->raises;
              r->expect = true;
              if ((arg >> 1) % 6 == 4) co_await sleep(0s);  // maybe delivered, maybe not yet
            }
            break;
          default:
            // Arrives while its handler is being removed: the handler must not run, and the
            // signal must not reach the disposition restored (the fuzzer's, which aborts).
            if (r->installed) {
              FUZZ_CHECK(library_handles(r->sig));
              raise_sig(r->sig, to_process);
              ++r->raises;
              FUZZ_CHECK(loop.remove_signal_handler(r->sig));
              r->installed = false;
              r->expect = false;
              if ((arg >> 5) & 1) add_sig_handler(r);  // and added again at once
            }
            break;
        }
        break;
      }
      case op_shutdown: {
        // A nursery (whose creation sets up the shutdown handling of SIGHUP/SIGINT/SIGTERM),
        // maybe with a stubborn child, then SIGHUP: the graceful shutdown stops every nursery,
        // then cancels every other task, this one included. The schedule ends here.
        prim_state& p = *s.p;
        if (p.nurseries.empty() || (p.nurseries.back()->close_requested && p.nurseries.size() < 4)) {
          p.nurseries.push_back(std::make_unique<nursery_rec>());
          p.nurseries.back()->n = std::make_unique<task_nursery>();
        }
        nursery_rec* rec = p.nurseries.back().get();
        if ((arg & 1) && !rec->close_requested && s.tasks.size() < max_tasks) {
          const int value = next_value(s);
          auto child = rec->n->create_task(leaf((arg >> 1) & 1 ? k_stubborn : k_sleep, value, std::chrono::microseconds(50 * ((arg >> 2) % 4)), 0, -1));
          rec->children.push_back(child);
          task_rec tr{child, (arg >> 1) & 1 ? k_stubborn : k_sleep, value};
          s.tasks.push_back(tr);
        }
        if ((arg >> 4) & 1) co_await sleep(0s);
        FUZZ_CHECK(library_handles(SIGHUP));
        raise_sig(SIGHUP, (arg >> 5) & 1);
        try {
          co_await sleep(1s);
        } catch (const cancelled_error&) {
          s.shutdown_hit = true;
        }
        FUZZ_CHECK(s.shutdown_hit);
        current_task()->uncancel();
        // Graceful: every nursery was closed (its children ended) before the rest was cancelled.
        for (auto& n : p.nurseries) {
          FUZZ_CHECK(n->n->closed());
          for (auto& c : n->children) FUZZ_CHECK(c.done());
        }
        break;
      }
      default:
        if (s.tasks.size() < max_tasks) co_await primitive_op(s, code, arg, in);
        break;
    }
    if (s.shutdown_hit) break;
  }

  // The schedule is over: cancel what is left, wait for every task, then check.
  for (auto& j : s.p->jobs) j->open();  // every job may run now
  co_await sleep(150us);  // every call_later of the schedule is due by now
  co_await sleep(0s);
  for (auto& r : s.tasks) r.t.cancel("drain");
  for (auto& r : s.tasks) co_await wait_done(r.t);
  for (auto& g : s.gens) {  // second next() tasks of consumers that abandoned their generator
    for (auto& t : g->pulls) t.cancel("drain");
    for (auto& t : g->pulls) co_await wait_done(t);
  }
  for (auto& f : s.futures) f.cancel("drain");
  co_await sleep(0s);  // done callbacks of the futures just cancelled
  co_await sleep(0s);

  // Jobs run on their own threads: wait (bounded) until each accepted one ran and its
  // call_soon_threadsafe callback ran on the loop, and until each raised signal's handler ran.
  auto settled = [&s] { return jobs_settled(*s.p) && !s.sigs[0].expect && !s.sigs[1].expect; };
  for (int i = 0; i < 20000 && !settled(); ++i) co_await sleep(i < 100 ? 0us : 200us);
  FUZZ_CHECK(jobs_settled(*s.p));
  for (const sig_rec& r : s.sigs) FUZZ_CHECK(!r.expect);  // a raised signal's handler ran
  for (const sig_rec& r : s.sigs) FUZZ_CHECK(r.calls <= r.raises);

  check_generators(s);
  co_await check_primitives(s);
  check_consistency(s);
  for (std::size_t i = 0; i < s.handles.size(); ++i) {
    const handle_rec& h = s.handles[i];
    const int runs = s.handle_runs[i];
    FUZZ_CHECK(runs <= 1);
    if (h.runs_at_cancel >= 0) FUZZ_CHECK(runs == h.runs_at_cancel);  // nothing ran after cancel()
    else FUZZ_CHECK(runs == 1);  // due (call_later delays are at most 150 us) and not cancelled
  }
  for (std::size_t i = 0; i < s.done_cbs.size(); ++i) {
    const done_cb_rec& rec = s.done_cbs[i];
    FUZZ_CHECK(s.done_cb_runs[i] <= 1);
    if (!rec.removed) FUZZ_CHECK(s.done_cb_runs[i] == 1);
  }
  // Only this task is left.
  auto left = all_tasks();
  // (after op_shutdown, also the shutdown task, which waits for this one)
  FUZZ_CHECK(left.size() == 1 || (s.shutdown_hit && left.size() == 2));
  FUZZ_CHECK(std::find(left.begin(), left.end(), *current_task()) != left.end());
}

}  // namespace

namespace {
/// The disposition of SIGUSR1, SIGUSR2 and SIGHUP outside run(): a signal that reaches it
/// (one the library let through after removing its handler) aborts the fuzzer.
void leaked_signal(int) {
  static const char message[] = "schedule_fuzzer: invariant broken: a signal reached the handler the library restored\n";
  [[maybe_unused]] auto n = ::write(2, message, sizeof message - 1);
  std::abort();
}
constexpr int watched_signals[] = {SIGUSR1, SIGUSR2, SIGHUP, SIGINT, SIGTERM};
struct signal_snapshot {
  struct sigaction actions[std::size(watched_signals)];
  sigset_t mask;
};
signal_snapshot take_signal_snapshot() {
  signal_snapshot out{};
  for (std::size_t i = 0; i < std::size(watched_signals); ++i) FUZZ_CHECK(::sigaction(watched_signals[i], nullptr, &out.actions[i]) == 0);
  FUZZ_CHECK(::pthread_sigmask(SIG_BLOCK, nullptr, &out.mask) == 0);
  return out;
}
/// The handlers and this thread's mask are what they were before run() (sigaction compared).
void check_signals_restored(const signal_snapshot& before) {
  const signal_snapshot now = take_signal_snapshot();
  for (std::size_t i = 0; i < std::size(watched_signals); ++i) {
    const int sig = watched_signals[i];
    const auto& a = before.actions[i];
    const auto& b = now.actions[i];
    if (a.sa_handler != b.sa_handler || a.sa_flags != b.sa_flags) fail("the disposition of signal " + std::to_string(sig) + " was not restored");
    for (int m = 1; m < NSIG; ++m) {
      if (sigismember(&a.sa_mask, m) != sigismember(&b.sa_mask, m)) fail("the handler mask of signal " + std::to_string(sig) + " was not restored");
    }
    if (sigismember(&before.mask, sig) != sigismember(&now.mask, sig)) fail("signal " + std::to_string(sig) + " left blocked or unblocked");
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const bool detectors = [] {
    struct sigaction a{};
    a.sa_handler = &leaked_signal;
    sigemptyset(&a.sa_mask);
    for (int sig : {SIGUSR1, SIGUSR2, SIGHUP}) FUZZ_CHECK(::sigaction(sig, &a, nullptr) == 0);
    return true;
  }();
  (void)detectors;
  const signal_snapshot signals_before = take_signal_snapshot();
  const int fds_before = open_fds();
  const int threads_before = threads();
  state s;
  s.sigs[0].sig = SIGUSR1;
  s.sigs[1].sig = SIGUSR2;
  auto previous = set_log_handler([&s](log_level level, std::string_view message) {
    s.log += std::string(message) + "\n";
    // An internal error (a task woken twice would be resumed twice) or a task the loop had to
    // destroy while pending is a bug; "exception was never retrieved" reports are expected.
    if (message.find("internal error") != std::string_view::npos || message.find("woken twice") != std::string_view::npos ||
        message.find("destroyed but it is pending") != std::string_view::npos)
      fail("library log: " + std::string(message));
    if (message.find("never ran") != std::string_view::npos) fail("library log: " + std::string(message));  // an exit stack not unwound
    if (level == log_level::error && message.find("never retrieved") == std::string_view::npos)
      fail("unexpected library error: " + std::string(message));
  });
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, s.sock) == 0);
  reader in{data, size};
  run(schedule(s, in));
  for (auto& r : s.tasks) FUZZ_CHECK(r.t.done());  // and every task stays ended after run()
  ::close(s.sock[0]);
  ::close(s.sock[1]);
  s = state{};  // drop every handle now, so that late reports still reach our log handler
  set_log_handler(std::move(previous));
  FUZZ_CHECK(open_fds() == fds_before);
  check_signals_restored(signals_before);
  // A joined thread may stay listed for a moment: wait up to a second before calling it leaked.
  for (int i = 0; i < 1000 && threads() != threads_before; ++i) ::usleep(1000);
  FUZZ_CHECK(threads() == threads_before);
  return 0;
}
