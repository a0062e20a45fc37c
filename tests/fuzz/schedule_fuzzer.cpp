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
// The synchronisation primitives and the utilities join later: see the places marked
// "EXTENSION POINT (primitives)" (opcodes from op_primitives_first on are reserved for them).
#include "../../async_utils.hpp"

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <dirent.h>
#include <string>
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
  k_kinds
};

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

struct state {
  std::vector<future<int>> futures;
  std::vector<task_rec> tasks;
  std::vector<handle_rec> handles;
  std::array<int, max_handles> handle_runs{};
  std::vector<done_cb_rec> done_cbs;
  std::array<int, max_handles> done_cb_runs{};
  bool inside_add_done_callback = false;
  int sock[2] = {-1, -1};
  std::string log;
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
      default: fail("unknown task kind");
    }
  }
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
  op_primitives_first,  // EXTENSION POINT (primitives): opcodes from here on are theirs
  op_count = 32
};

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

coroutine<void> schedule(state& s, reader& in) {
  event_loop& loop = event_loop::current();
  s.futures.push_back(loop.create_future<int>());
  s.futures.push_back(loop.create_future<int>());
  for (std::size_t ops = 0; in.more() && ops < max_ops; ++ops) {
    const auto code = static_cast<op>(in.byte() % op_count);
    const std::uint8_t arg = in.byte();
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
      default:
        // EXTENSION POINT (primitives): opcodes op_primitives_first .. op_count-1. Once merged,
        // give each an operation on a small pool of primitives created at the top of
        // schedule() — condition notify / notify_all (with the lock held) and waiter tasks,
        // event set / clear and waiters, queue put_nowait / get_nowait and put/get tasks,
        // accessor set / get, a task_nursery's create_task, stop_task and shutdown — and a
        // matching check in check_consistency(). Until then they only yield.
        co_await sleep(0s);
        break;
    }
  }

  // The schedule is over: cancel what is left, wait for every task, then check.
  co_await sleep(150us);  // every call_later of the schedule is due by now
  co_await sleep(0s);
  for (auto& r : s.tasks) r.t.cancel("drain");
  for (auto& r : s.tasks) co_await wait_done(r.t);
  for (auto& f : s.futures) f.cancel("drain");
  co_await sleep(0s);  // done callbacks of the futures just cancelled
  co_await sleep(0s);

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
  FUZZ_CHECK(left.size() == 1);
  FUZZ_CHECK(left[0] == *current_task());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const int fds_before = open_fds();
  state s;
  auto previous = set_log_handler([&s](log_level level, std::string_view message) {
    s.log += std::string(message) + "\n";
    // An internal error (a task woken twice would be resumed twice) or a task the loop had to
    // destroy while pending is a bug; "exception was never retrieved" reports are expected.
    if (message.find("internal error") != std::string_view::npos || message.find("woken twice") != std::string_view::npos ||
        message.find("destroyed but it is pending") != std::string_view::npos)
      fail("library log: " + std::string(message));
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
  return 0;
}
