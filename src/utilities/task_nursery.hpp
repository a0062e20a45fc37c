// task_nursery: codestare's TaskNursery, an async_exit_stack that also owns tasks and closes
// when its sentinel task is cancelled; and the free stop_task(t). (Nursery or task_group: see
// the class comment.)
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../platform/log.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/any_task.hpp"
#include "../runtime/handle.hpp"
#include "../runtime/event_loop.hpp"
#include "../runtime/future.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/run.hpp"
#include "../runtime/executor.hpp"
#include "registry.hpp"
#include "async_exit_stack.hpp"

#if ASYNC_UTILS_DEFINITIONS
#include <algorithm>
#endif
#include <atomic>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#if ASYNC_UTILS_DEFINITIONS
#include <sstream>
#endif
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

ASYNC_UTILS_USER_TYPES_IN_FRAMES_BEGIN

namespace codestare::async_utils {

class task_nursery;

namespace detail {

/// Waits until `t` is done; cancellation requests to the waiting task are noted in `cancelled`
/// and otherwise ignored, so that a shutdown in progress always finishes.
ASYNC_UTILS_LINK coroutine<void> wait_through_cancel(any_task t, bool& cancelled);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK coroutine<void> wait_through_cancel(any_task t, bool& cancelled) {
  for (;;) {
    try {
      co_await wait_done(t);
      co_return;
    } catch (const cancelled_error&) {
      cancelled = true;
    }
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

template <class T>
coroutine<void> wait_through_cancel(future<T> f, bool& cancelled) {
  for (;;) {
    try {
      co_await wait_done(f);
      co_return;
    } catch (const cancelled_error&) {
      cancelled = true;
    }
  }
}

/// What a task_nursery shares with its sentinel, the done callbacks of its children, the
/// nursery that adopted it by pop_all() and the shutdown handling of its loop. It outlives the
/// nursery object when those still need it.
struct nursery_state {
  task_nursery* owner = nullptr;  // null once the nursery object is destroyed
  event_loop* loop = nullptr;
  std::string name;                // the name at creation, for messages after destruction
  std::vector<any_task> tasks;     // children not done yet
  any_task sentinel;               // empty once shut down
  bool sentinel_woke = false;      // the sentinel's body runs (it ends the shutdown itself)
  bool closing = false;            // a shutdown started ...
  bool closed = false;             // ... and finished
  bool responsible = true;         // false after pop_all(): the adopter stops our tasks
  std::optional<future<void>> close_done;
  std::vector<std::shared_ptr<nursery_state>> adopted;  // what pop_all() handed to us
  std::shared_ptr<void> shutdown_guard;  // keeps the loop's shutdown handling listed
  // The exit callbacks being unwound by a shutdown: moved here from the nursery first, so that a
  // nursery destroyed while its shutdown runs leaves them (and the shutdown) nothing to reach.
  std::optional<async_exit_stack> unwinding;

  /// Pending children of this nursery and of those it adopted, but not `except`.
  std::vector<any_task> pending_children(const std::optional<any_task>& except) const;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::vector<any_task> nursery_state::pending_children(const std::optional<any_task>& except) const {
  std::vector<any_task> out;
  auto add = [&](const nursery_state& s) {
    for (const any_task& t : s.tasks)
      if (!t.done() && !(except && *except == t)) out.push_back(t);
  };
  add(*this);
  if (responsible)
    for (const auto& a : adopted) add(*a);
  return out;
}
#endif  // ASYNC_UTILS_DEFINITIONS

// shutdown.hpp defines attach_nursery (it includes this file), so tests/self_contained.py
// links this part together with it:
// Links with: utilities/shutdown.hpp

/// Registers `state` with the shutdown handling of its loop (shutdown.hpp).
void attach_nursery(event_loop& loop, const std::shared_ptr<nursery_state>& state);

}  // namespace detail

/// asyncio's stop_task (codestare.async_utils.nursery.stop_task): cancels `t`, waits until it
/// is done and returns how it ended: null when it returned, its exception when it failed,
/// cancelled_error when it was cancelled. Awaiting it from `t` itself throws
/// std::invalid_argument.
ASYNC_UTILS_LINK coroutine<std::exception_ptr> stop_task(any_task t);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK coroutine<std::exception_ptr> stop_task(any_task t) {
  if (!t) throw std::invalid_argument("stop_task: empty task handle");
  if (auto me = current_task(); me && *me == t) throw std::invalid_argument("stop_task: a task cannot stop itself");
  t.cancel();
  co_await wait_done(t);
  try {
    co_return t.exception();  // marks the outcome retrieved
  } catch (...) {
    co_return std::current_exception();  // cancelled_error
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// The name of a task_nursery: a string, a function computing it each time it is read (the
/// original's callable name), or nothing for the automatic `TaskNursery-<n>`.
class nursery_name {
 public:
  nursery_name() = default;
  nursery_name(std::string name) : value_(std::move(name)) {}
  nursery_name(const char* name) : value_(std::string(name)) {}
  template <class F>
    requires(!std::is_convertible_v<F, std::string> && std::is_invocable_r_v<std::string, F&>)
  nursery_name(F fn) : value_(std::function<std::string()>(std::move(fn))) {
    if (!std::get<2>(value_)) throw std::invalid_argument("task_nursery: empty name function");
  }

 private:
  friend class task_nursery;
  std::variant<std::monostate, std::string, std::function<std::string()>> value_;
};

/// codestare's TaskNursery: an async_exit_stack whose shutdown also stops the tasks it created,
/// and a registry<task_nursery> keyed by name() (unique among live nurseries).
///
/// Nursery or task_group? Use a task_nursery for background tasks that live as long as a service
/// (started from anywhere, callbacks included, running until shutdown): nobody awaits them, so a
/// failing child is reported to the loop's exception handler and shuts the loop down gracefully,
/// and closing the nursery cancels the children and exits its contexts. Use a task_group
/// (task_group.hpp, asyncio.TaskGroup) for one piece of work inside a coroutine: leaving the
/// async_with block waits for every child, the first failure cancels the others and the body,
/// and the failures come back to the caller as one exception_group. A nursery owns its tasks for
/// the program; a group owns them for its caller, who waits for them and handles their errors.
///
/// - Construction installs shutdown handling on the loop once (add_shutdown_handling: SIGINT,
///   SIGTERM and SIGHUP and, when the loop has no exception handler, handle_exception) and
///   starts sentinel_task(), which waits forever: cancelling it shuts the nursery down.
/// - Shutting down (sentinel cancelled, aclose(), aexit(), the end of async_with(nursery, ...)):
///   every child task is cancelled and awaited, then the entered contexts exit LIFO, then
///   sentinel_task() becomes empty and create_task() refuses new work. A shutdown runs once;
///   a second request waits for the first. Cancelling the task that runs it while it waits for
///   the children does not interrupt it (the cancellation is rethrown at the end).
/// - pop_all() moves the exit callbacks and the responsibility for the tasks to a new nursery.
/// - Destroying a nursery that was not shut down cancels its tasks and sentinel (it cannot
///   await them) and logs a warning; its exit callbacks never run.
/// Loop thread only. Neither copyable nor movable (its sentinel and children point at it).
class task_nursery : public async_exit_stack, public registry<task_nursery> {
 public:
  /// The unique name (computed now when the nursery was given a name function).
  std::string name() const;
  static constexpr auto unique_key = &task_nursery::name;

  /// A nursery on `loop` (default: the running one). Throws std::invalid_argument when a live
  /// nursery has this name (nothing is registered or started then).
  explicit task_nursery(nursery_name given = {}, event_loop* loop = nullptr);
  task_nursery(nursery_name name, event_loop& loop) : task_nursery(std::move(name), &loop) {}

  task_nursery(const task_nursery&) = delete;
  task_nursery& operator=(const task_nursery&) = delete;
  task_nursery(task_nursery&&) = delete;  // the sentinel and the children's callbacks point here
  task_nursery& operator=(task_nursery&&) = delete;

  ~task_nursery();

  /// The static add_shutdown_handling of the original: installs setup_shutdown_handling(loop)
  /// once per loop (shutdown.hpp).
  static void add_shutdown_handling(event_loop& loop);

  event_loop& loop() const noexcept { return *state_->loop; }
  /// The tasks created by create_task() that are not done yet.
  const std::vector<any_task>& tasks() const noexcept { return state_->tasks; }
  /// The task whose cancellation shuts the nursery down; empty once it is shut down.
  any_task sentinel_task() const noexcept { return state_->sentinel; }
  /// True once a shutdown has finished (create_task refuses work from then on).
  bool closed() const noexcept { return state_->closed; }

  /// Schedules `aw` (as loop.create_task) under this nursery: the task's name gets
  /// ":<nursery name>" appended; it is listed in tasks() until done; if it fails (other than
  /// by cancellation) the loop's exception handler receives message, exception, task and this
  /// nursery's sentinel. Throws std::runtime_error once the nursery is shut down.
  template <class A>
  auto create_task(A&& aw, std::string name = {}) {
    auto& st = *state_;
    if (st.closing)
      throw std::runtime_error("task_nursery " + detail::python_repr(st.name) + " is shut down: create a new task_nursery to start tasks");
    const std::string suffix = ":" + this->name();
    st.tasks.reserve(st.tasks.size() + 1);
    auto t = st.loop->create_task(std::forward<A>(aw), std::move(name));
    any_task handle(t);
    try {
      handle.set_name(handle.name() + suffix);
      handle.add_done_callback([weak = std::weak_ptr<detail::nursery_state>(state_)](any_task done) { child_done(weak, std::move(done)); });
    } catch (...) {
      handle.cancel();
      throw;
    }
    st.tasks.push_back(std::move(handle));
    return t;
  }

  /// Stops one of this nursery's tasks (see the free stop_task); std::invalid_argument when
  /// `t` is not one of tasks().
  coroutine<std::exception_ptr> stop_task(const any_task& t);

  /// A new nursery (automatic name, same loop) that takes over the exit callbacks and the
  /// responsibility for the tasks. Closing this one afterwards does nothing (its tasks keep
  /// running, its sentinel stays); closing the new one stops those tasks, shuts this one down
  /// and ends the new one.
  std::unique_ptr<task_nursery> pop_all();

  /// Shuts the nursery down (see the class).
  coroutine<void> aclose();
  /// `async with nursery as n` binds the nursery itself.
  detail::ready_ref<task_nursery> aenter() noexcept { return {*this}; }
  /// Shuts the nursery down; true when a context suppressed `error`.
  coroutine<bool> aexit(std::exception_ptr error) { return shut_down(std::move(error), false); }

  /// `codestare::async_utils::task_nursery(name='Foo', loop=<event_loop running=true closed=false>)`
  friend std::ostream& operator<<(std::ostream& os, const task_nursery& n) {
    std::string name;
    try {
      name = detail::python_repr(n.name());
    } catch (...) {
      name = "<error>";
    }
    const event_loop& l = n.loop();
    return os << "codestare::async_utils::task_nursery(name=" << name << ", loop=<event_loop running=" << (l.is_running() ? "true" : "false")
              << " closed=" << (l.is_closed() ? "true" : "false") << ">)";
  }

 private:
  static coroutine<void> sentinel_body(std::shared_ptr<detail::nursery_state> st);

  static void child_done(const std::weak_ptr<detail::nursery_state>& weak, any_task done);

  /// The shutdown. `sentinel_ending`: the sentinel runs it or is done already (do not wait for it).
  coroutine<bool> shut_down(std::exception_ptr error, bool sentinel_ending);

  static coroutine<void> close_later(std::shared_ptr<detail::nursery_state> st);

  /// Shuts down a nursery we adopted: its sentinel is cancelled and it closes (its own tasks
  /// were stopped by us already).
  static coroutine<void> end_adopted(std::shared_ptr<detail::nursery_state> a, bool& cancelled);

 public:
  /// Internal (shutdown handling): makes sure the nursery of `st` has finished shutting down,
  /// once its sentinel is done, running the shutdown here if nobody else does.
  static coroutine<void> finish_close(std::shared_ptr<detail::nursery_state> st, bool& cancelled);

 private:
  std::variant<std::monostate, std::string, std::function<std::string()>> name_;
  std::shared_ptr<detail::nursery_state> state_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::string task_nursery::name() const {
  if (const auto* fixed = std::get_if<std::string>(&name_)) return *fixed;
  return std::get<2>(name_)();
}

ASYNC_UTILS_LINK task_nursery::task_nursery(nursery_name given, event_loop* loop)
    : registry_base(defer_registration), state_(std::make_shared<detail::nursery_state>()) {
  event_loop& target = loop ? *loop : event_loop::current();
  target.check_open();
  state_->loop = &target;
  name_ = std::move(given.value_);
  if (std::holds_alternative<std::monostate>(name_)) {
    static std::atomic<std::uint64_t> counter{0};
    for (;;) {  // the automatic name skips names a user gave
      name_ = "TaskNursery-" + std::to_string(counter.fetch_add(1));
      try {
        publish_unique();
        break;
      } catch (const std::invalid_argument&) {
      }
    }
  } else {
    publish_unique();
  }
  try {
    state_->name = this->name();
    state_->owner = this;
    state_->tasks.reserve(4);
    detail::attach_nursery(target, state_);
    state_->sentinel = target.create_task(sentinel_body(state_), "sentinel:" + state_->name);
    // A sentinel cancelled before it started never runs its body: shut down from here then.
    state_->sentinel.add_done_callback([weak = std::weak_ptr<detail::nursery_state>(state_)](any_task) {
      auto st = weak.lock();
      if (!st || st->sentinel_woke || st->closing || !st->owner) return;
      st->loop->create_task(close_later(st), "shutdown:" + st->name);
    });
  } catch (...) {
    withdraw();
    if (state_->sentinel) state_->sentinel.cancel();
    state_->owner = nullptr;
    throw;
  }
}

ASYNC_UTILS_LINK task_nursery::~task_nursery() {
  withdraw();
  auto& st = *state_;
  if (st.closing && !st.closed) {
    try {
      log(log_level::error, "task_nursery " + detail::python_repr(st.name) + " destroyed while it shuts down");
    } catch (...) {
    }
  }
  if (!st.closing && st.responsible) {
    auto pending = st.pending_children(std::nullopt);
    if (!pending.empty()) {
      try {
        log(log_level::warning, "task_nursery " + detail::python_repr(st.name) + " destroyed with " + std::to_string(pending.size()) +
                                    " pending task(s) without being shut down: they are cancelled");
      } catch (...) {
      }
      for (auto& t : pending) t.cancel();
    }
  }
  st.owner = nullptr;
  if (st.sentinel && !st.sentinel.done()) st.sentinel.cancel();  // ends without touching us
}

ASYNC_UTILS_LINK coroutine<std::exception_ptr> task_nursery::stop_task(const any_task& t) {
  const auto& list = state_->tasks;
  if (!t || std::find(list.begin(), list.end(), t) == list.end())
    throw std::invalid_argument("task_nursery::stop_task: the task is not one of the pending tasks of " + detail::python_repr(state_->name));
  return codestare::async_utils::stop_task(t);
}

ASYNC_UTILS_LINK std::unique_ptr<task_nursery> task_nursery::pop_all() {
  auto adopter = std::make_unique<task_nursery>(nursery_name(), state_->loop);
  auto& st = *state_;
  adopter->state_->adopted.reserve(st.adopted.size() + 1);
  if (!empty()) adopter->push_async_exit(async_exit_stack::pop_all());
  adopter->state_->adopted.push_back(state_);
  for (auto& a : st.adopted) adopter->state_->adopted.push_back(std::move(a));
  st.adopted.clear();
  st.responsible = false;
  return adopter;
}

ASYNC_UTILS_LINK void task_nursery::child_done(const std::weak_ptr<detail::nursery_state>& weak, any_task done) {
  auto st = weak.lock();
  if (!st) return;
  auto& list = st->tasks;
  list.erase(std::remove(list.begin(), list.end(), done), list.end());
  if (done.cancelled()) return;
  std::exception_ptr error = done.exception();
  if (!error) return;
  try {
    std::rethrow_exception(error);
  } catch (const cancelled_error&) {
    return;  // it raised cancelled_error itself: a cancellation
  } catch (...) {
  }
  if (!st->loop || st->loop->is_closed()) return;
  std::optional<any_task> sentinel;
  if (st->sentinel) sentinel = st->sentinel;
  st->loop->call_exception_handler({"Exception in a task of task_nursery " + detail::python_repr(st->name), error, done, sentinel});
}
#endif  // ASYNC_UTILS_DEFINITIONS

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK coroutine<void> task_nursery::aclose() { co_await shut_down(nullptr, false); }

ASYNC_UTILS_LINK coroutine<void> task_nursery::sentinel_body(std::shared_ptr<detail::nursery_state> st) {
  try {
    co_await st->loop->create_future<void>();  // never completed: waits for cancellation
  } catch (const cancelled_error&) {
  }
  st->sentinel_woke = true;
  // A shutdown run by someone else cancelled us and waits for us: end at once (whoever
  // stopped us to shut the nursery down waits for close_done, see finish_close).
  if (!st->owner || st->closing) co_return;
  co_await st->owner->shut_down(nullptr, true);
}

ASYNC_UTILS_LINK coroutine<bool> task_nursery::shut_down(std::exception_ptr error, bool sentinel_ending) {
  std::shared_ptr<detail::nursery_state> st = state_;
  if (st->closing) {  // another shutdown runs or ran: wait for it, then exit what came since
    bool ignored = false;
    co_await detail::wait_through_cancel(*st->close_done, ignored);
    if (!st->owner || empty()) co_return false;  // (destroyed meanwhile: nothing of ours is left)
    co_return co_await async_exit_stack::aexit(std::move(error));
  }
  if (!st->responsible && !sentinel_ending) co_return co_await async_exit_stack::aexit(std::move(error));  // popped: nothing else
  st->closing = true;
  st->close_done = st->loop->create_future<void>();
  // From here on the shutdown touches only `st`, never the nursery object, which may be
  // destroyed while the shutdown runs: the exit callbacks move into the state first.
  st->unwinding.emplace(async_exit_stack::pop_all());
  bool cancelled = false;
  // 1. The tasks: cancelled together, awaited (the task running this is spared).
  if (st->responsible) {
    const auto me = current_task();
    for (;;) {
      auto victims = st->pending_children(me);
      if (victims.empty()) break;
      for (auto& t : victims) t.cancel();
      for (auto& t : victims) co_await detail::wait_through_cancel(t, cancelled);
    }
  }
  // 2. The entered contexts and callbacks, LIFO (those entered while the tasks stopped first).
  bool suppressed = false;
  std::exception_ptr exit_error;
  try {
    if (st->owner && !empty()) st->unwinding->push_async_exit(async_exit_stack::pop_all());
    suppressed = co_await st->unwinding->aexit(std::move(error));
  } catch (...) {
    exit_error = std::current_exception();
  }
  // 3. The nurseries we adopted end, then our own sentinel.
  if (st->responsible) {
    auto adopted = std::move(st->adopted);
    st->adopted.clear();
    for (auto& a : adopted) co_await end_adopted(a, cancelled);
  }
  if (!sentinel_ending && st->sentinel && !st->sentinel_woke) {
    st->sentinel.cancel();
    co_await detail::wait_through_cancel(st->sentinel, cancelled);
  }
  st->sentinel = any_task();
  st->closed = true;
  st->close_done->set_result();
  if (exit_error) std::rethrow_exception(exit_error);
  if (cancelled) throw cancelled_error("cancelled while task_nursery " + detail::python_repr(st->name) + " shut down");
  co_return suppressed;
}

ASYNC_UTILS_LINK coroutine<void> task_nursery::close_later(std::shared_ptr<detail::nursery_state> st) {
  bool cancelled = false;
  co_await finish_close(std::move(st), cancelled);
}

ASYNC_UTILS_LINK coroutine<void> task_nursery::end_adopted(std::shared_ptr<detail::nursery_state> a, bool& cancelled) {
  if (a->sentinel && !a->sentinel_woke && !a->sentinel.done()) a->sentinel.cancel();
  if (a->sentinel) co_await detail::wait_through_cancel(a->sentinel, cancelled);
  co_await finish_close(a, cancelled);
}

ASYNC_UTILS_LINK coroutine<void> task_nursery::finish_close(std::shared_ptr<detail::nursery_state> st, bool& cancelled) {
  if (st->closed) co_return;
  if (st->closing) {
    co_await detail::wait_through_cancel(*st->close_done, cancelled);
    co_return;
  }
  if (st->owner) {
    try {
      co_await st->owner->shut_down(nullptr, true);
    } catch (const cancelled_error&) {
      cancelled = true;
    } catch (...) {
      log(log_level::error, "task_nursery " + detail::python_repr(st->name) + ": error while shutting down: " + describe(std::current_exception()));
    }
    co_return;
  }
  st->sentinel = any_task();  // destroyed before it could shut down
  st->closed = true;
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils

ASYNC_UTILS_USER_TYPES_IN_FRAMES_END

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("task_nursery") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  /// An async context manager that journals its enter and exit (and whether the nursery's
  /// sentinel was still there when it exited).
  struct nursery_probe {
    std::vector<std::string>* journal;
    std::string name;
    const task_nursery* nursery = nullptr;
    coroutine<std::string> aenter() {
      journal->push_back("enter " + name);
      co_return name;
    }
    coroutine<bool> aexit(std::exception_ptr) {
      co_await sleep(0s);
      journal->push_back("exit " + name + (nursery && nursery->sentinel_task() ? " (sentinel alive)" : ""));
      co_return false;
    }
  };
  inline coroutine<void> nursery_sleeper(std::vector<std::string>* journal, std::string name) {
    try {
      co_await sleep(1h);
    } catch (const cancelled_error&) {
      journal->push_back("cancelled " + name);
      throw;
    }
  }
  inline coroutine<int> nursery_quick() { co_return 1; }
  inline coroutine<void> nursery_fails() {
    co_await sleep(0s);
    throw std::runtime_error("boom");
  }
  inline std::string testing_join(const std::vector<std::string>& v) {
    std::string out;
    for (const auto& x : v) out += x + "; ";
    return out;
  }
  inline bool ends_with(const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
  }

  TEST_CASE("the reference example: the registry lists the nursery by name") {
    testing::run_bounded([]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      std::ostringstream out;
      {
        task_nursery nursery("Foo", loop);
        out << task_nursery::registry();
        CHECK(task_nursery::registry().at("Foo") == &nursery);
        co_await nursery.aclose();
      }
      CHECK(out.str() == "{'Foo': codestare::async_utils::task_nursery(name='Foo', loop=<event_loop running=true closed=false>)}");
      CHECK(task_nursery::registry().empty());
    }());
  }

  TEST_CASE("the sentinel waits forever; stopping it shuts the nursery down") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      task_nursery n("sentinel-test");
      any_task sentinel = n.sentinel_task();
      REQUIRE(sentinel);
      CHECK(sentinel.name() == "sentinel:sentinel-test");
      nursery_probe probe1{&journal, "a", &n};  // named first: g++ 12 mis-copies braced temporaries in co_await
      co_await n.enter_async_context(std::move(probe1));
      auto child = n.create_task(nursery_sleeper(&journal, "child"));
      co_await sleep(5ms);
      CHECK_FALSE(sentinel.done());
      CHECK(co_await stop_task(sentinel) == nullptr);  // it returns normally once shut down
      CHECK(journal == std::vector<std::string>{"enter a", "cancelled child", "exit a (sentinel alive)"});
      CHECK(child.cancelled());
      CHECK_FALSE(n.sentinel_task());
      CHECK(n.closed());
      co_await sleep(0s);
      CHECK(n.tasks().empty());
      co_await n.aclose();  // once only
      CHECK(journal.size() == 3);
    }());
  }

  TEST_CASE("a sentinel cancelled before it started still shuts the nursery down") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      task_nursery n;
      n.push_async_callback([&]() -> coroutine<void> {
        journal.push_back("callback");
        co_return;
      });
      any_task sentinel = n.sentinel_task();
      sentinel.cancel();
      co_await wait_done(sentinel);
      co_await testing::wait_until([&] { return n.closed(); });
      CHECK(n.closed());
      CHECK(journal == std::vector<std::string>{"callback"});
    }());
  }

  TEST_CASE("create_task: names, tracking, and failures reported with the sentinel") {
    testing::run_bounded([]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      std::vector<exception_context> seen;
      loop.set_exception_handler([&](event_loop&, const exception_context& c) { seen.push_back(c); });
      std::vector<std::string> journal;
      task_nursery n("Bar");
      auto named = n.create_task(nursery_sleeper(&journal, "named"), "worker");
      CHECK(named.name() == "worker:Bar");
      auto quick = n.create_task(nursery_quick());
      CHECK(quick.name().rfind("Task-", 0) == 0);
      CHECK(ends_with(quick.name(), ":Bar"));
      CHECK(n.tasks().size() == 2);
      CHECK(co_await quick == 1);
      co_await sleep(0s);
      REQUIRE(n.tasks().size() == 1);
      CHECK(n.tasks()[0] == any_task(named));
      auto failing = n.create_task(nursery_fails(), "failing");
      co_await wait_done(failing);
      co_await sleep(0s);
      REQUIRE(seen.size() == 1);
      CHECK(seen[0].message.find("'Bar'") != std::string::npos);
      CHECK(describe(seen[0].exception) == "boom");
      REQUIRE(seen[0].task);
      CHECK(*seen[0].task == any_task(failing));
      REQUIRE(seen[0].sentinel);
      CHECK(*seen[0].sentinel == n.sentinel_task());
      named.cancel();  // a cancellation is no failure
      co_await wait_done(named);
      co_await sleep(0s);
      CHECK(seen.size() == 1);
      CHECK(n.tasks().empty());
      co_await n.aclose();
    }());
  }

  TEST_CASE("stop_task: the nursery's and the free one") {
    testing::run_bounded([]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      std::vector<exception_context> seen;
      loop.set_exception_handler([&](event_loop&, const exception_context& c) { seen.push_back(c); });
      std::vector<std::string> journal;
      task_nursery n("stopper");
      auto foreign = create_task(nursery_sleeper(&journal, "foreign"));
      CHECK_THROWS_AS(static_cast<void>(n.stop_task(foreign)), std::invalid_argument);
      auto sleeping = n.create_task(nursery_sleeper(&journal, "sleeping"));
      auto stubborn = n.create_task([]() -> coroutine<int> {
        try {
          co_await sleep(1h);
        } catch (const cancelled_error&) {
        }
        co_return 3;
      }());
      auto sore = n.create_task([]() -> coroutine<void> {
        try {
          co_await sleep(1h);
        } catch (const cancelled_error&) {
        }
        throw std::domain_error("sore loser");
      }());
      co_await sleep(0s);
      CHECK(describe(co_await n.stop_task(sleeping)) == "cancelled_error: cancelled");
      CHECK(co_await n.stop_task(stubborn) == nullptr);
      CHECK(describe(co_await n.stop_task(sore)) == "sore loser");
      CHECK(describe(co_await stop_task(foreign)) == "cancelled_error: cancelled");
      auto me = current_task();
      REQUIRE(me);
      CHECK_THROWS_AS(co_await stop_task(*me), std::invalid_argument);
      co_await sleep(0s);
      CHECK(seen.size() == 1);  // the failure is still reported
      co_await n.aclose();
    }());
  }

  TEST_CASE("shutting down: tasks cancelled, then contexts LIFO, then the sentinel empty") {
    for (int how = 0; how < 3; ++how) {
      CAPTURE(how);
      testing::run_bounded([](int how) -> coroutine<void> {
        std::vector<std::string> journal;
        task_nursery n;
        auto body = [&](task_nursery& nn) -> coroutine<void> {
          nursery_probe probe2{&journal, "a", &nn};  // named first: g++ 12 mis-copies braced temporaries in co_await
          co_await nn.enter_async_context(std::move(probe2));
          nursery_probe probe3{&journal, "b", &nn};  // named first: g++ 12 mis-copies braced temporaries in co_await
          co_await nn.enter_async_context(std::move(probe3));
          nn.create_task(nursery_sleeper(&journal, "x"));
          co_await sleep(1ms);
        };
        if (how == 0) {
          co_await async_with(n, body);
        } else {
          co_await body(n);
          if (how == 1) co_await n.aclose();
          else co_await stop_task(n.sentinel_task());
        }
        CHECK(journal == std::vector<std::string>{"enter a", "enter b", "cancelled x", "exit b (sentinel alive)", "exit a (sentinel alive)"});
        CHECK_FALSE(n.sentinel_task());
        CHECK(n.closed());
      }(how));
    }
  }

  TEST_CASE("pop_all moves the exit callbacks and the responsibility for the tasks") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      task_nursery old("old");
      nursery_probe probe4{&journal, "a", nullptr};  // named first: g++ 12 mis-copies braced temporaries in co_await
      co_await old.enter_async_context(std::move(probe4));
      auto child = old.create_task(nursery_sleeper(&journal, "child"));
      auto moved = old.pop_all();
      REQUIRE(moved);
      CHECK(moved->name().rfind("TaskNursery-", 0) == 0);
      CHECK(old.empty());
      co_await old.aclose();  // does nothing now
      co_await sleep(1ms);
      CHECK_FALSE(child.done());
      REQUIRE(old.sentinel_task());
      CHECK_FALSE(old.sentinel_task().done());
      CHECK_FALSE(old.closed());
      CHECK(journal == std::vector<std::string>{"enter a"});
      auto later = old.create_task(nursery_sleeper(&journal, "later"));  // still accepted
      co_await sleep(0s);
      co_await moved->aclose();
      CHECK(child.cancelled());
      CHECK(later.cancelled());
      INFO(testing_join(journal));
      CHECK(journal == std::vector<std::string>{"enter a", "cancelled child", "cancelled later", "exit a"});
      CHECK_FALSE(old.sentinel_task());
      CHECK(old.closed());
      CHECK_FALSE(moved->sentinel_task());
      CHECK(moved->closed());
      CHECK_THROWS_AS(old.create_task(nursery_quick()), std::runtime_error);
    }());
  }

  TEST_CASE("dynamic names, the registry by name, duplicates refused") {
    testing::run_bounded([]() -> coroutine<void> {
      int generation = 1;
      task_nursery dyn([&] { return "dyn-" + std::to_string(generation); });
      CHECK(task_nursery::registry().at("dyn-1") == &dyn);
      generation = 2;
      CHECK(dyn.name() == "dyn-2");
      CHECK(task_nursery::registry().count("dyn-1") == 0);
      CHECK(task_nursery::registry().at("dyn-2") == &dyn);
      auto t = dyn.create_task(nursery_quick(), "job");
      CHECK(t.name() == "job:dyn-2");
      task_nursery same("same");
      const auto tasks_before = all_tasks().size();
      try {
        task_nursery again("same");
        FAIL("no exception");
      } catch (const std::invalid_argument& e) {
        CHECK(std::string(e.what()).find("'same'") != std::string::npos);
      }
      CHECK(all_tasks().size() == tasks_before);  // no sentinel started
      CHECK(task_nursery::registry().size() == 2);
      CHECK(task_nursery::registry().at("same") == &same);
      task_nursery auto1, auto2;
      CHECK(auto1.name() != auto2.name());
      CHECK(auto1.name().rfind("TaskNursery-", 0) == 0);
      CHECK(task_nursery::registry().size() == 4);
      for (task_nursery* n : {&dyn, &same, &auto1, &auto2}) co_await n->aclose();
    }());
  }

  TEST_CASE("create_task after shutdown says to create a new nursery") {
    testing::run_bounded([]() -> coroutine<void> {
      task_nursery n("done");
      co_await n.aclose();
      try {
        n.create_task(nursery_quick());
        FAIL("no exception");
      } catch (const std::runtime_error& e) {
        CHECK(std::string(e.what()).find("create a new task_nursery") != std::string::npos);
      }
    }());
  }

  TEST_CASE("destroyed while its own shutdown runs: the shutdown finishes without touching it") {
    testing::log_capture log;
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      auto slow_to_stop = [](std::vector<std::string>* j) -> coroutine<void> {
        try {
          co_await sleep(std::chrono::hours(1));
        } catch (const cancelled_error&) {
          j->push_back("stopping");
        }
        co_await sleep(5ms);  // cleanup that takes a while, after the cancellation
        j->push_back("stopped");
      };
      auto n = std::make_unique<task_nursery>("dropped");
      nursery_probe probe{&journal, "ctx", nullptr};
      co_await n->enter_async_context(std::move(probe));
      auto child = n->create_task(slow_to_stop(&journal));
      any_task sentinel = n->sentinel_task();
      co_await sleep(1ms);
      sentinel.cancel();  // the documented way to shut a nursery down
      co_await sleep(1ms);
      CHECK_FALSE(child.done());  // the shutdown waits for the child's cleanup ...
      n.reset();                  // ... and the nursery goes meanwhile
      co_await wait_done(child);
      co_await wait_done(sentinel);
      CHECK(std::find(journal.begin(), journal.end(), "stopped") != journal.end());
    }());
    CHECK(log.text().find("'dropped' destroyed while it shuts down") != std::string::npos);
  }

  TEST_CASE("destroyed without shutdown: its tasks are cancelled, a warning logged") {
    testing::log_capture log;
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> journal;
      task<void> child;
      any_task sentinel;
      {
        task_nursery n("careless");
        child = n.create_task(nursery_sleeper(&journal, "child"));
        sentinel = n.sentinel_task();
        co_await sleep(0s);
      }
      co_await wait_done(child);
      co_await wait_done(sentinel);
      CHECK(child.cancelled());
      CHECK(journal == std::vector<std::string>{"cancelled child"});
    }());
    CHECK(log.text().find("'careless' destroyed with 1 pending task(s)") != std::string::npos);
    static_assert(!std::is_copy_constructible_v<task_nursery>);
    static_assert(!std::is_move_constructible_v<task_nursery>);
    static_assert(!std::is_copy_assignable_v<task_nursery>);
    static_assert(!std::is_move_assignable_v<task_nursery>);
  }
}
#endif
