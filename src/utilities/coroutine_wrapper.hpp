// coroutine_wrapper<R>: codestare's CoroutineWrapper, a base class that turns a class into a
// coroutine built from its own member coroutines.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../platform/log.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/event_loop.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/run.hpp"
#include "../runtime/async_generator.hpp"

#include <coroutine>
#include <cstdint>
#include <utility>

namespace codestare::async_utils {

/// CoroutineWrapper: derive from it, and pass the coroutine your members build to the base:
///
///     struct job : coroutine_wrapper<int> {
///       int value = 0;                        // readable by the creator while and after it runs
///       explicit job(int n) : limit(n) { set_coroutine(work()); }
///       coroutine<int> work() { ... }         // may use every member: it starts when awaited
///      private:
///       int limit;
///     };
///     job j(3);
///     int r = co_await j;                     // or: auto t = create_task(j); ... co_await t;
///
/// Call the member coroutine from the constructor body (set_coroutine) rather than from the
/// mem-initializer list: calling a member function before the base is constructed is undefined
/// behaviour in C++, even for a lazy coroutine. A coroutine that uses no member (a free or
/// static function) may be passed to the base constructor directly.
///
/// The object is awaitable once: `co_await obj` or `create_task(obj)` (by reference: the object
/// must outlive the task, so create_task does not accept a temporary). A second await or
/// schedule throws invalid_state_error when it runs (as Python's "cannot reuse already awaited
/// coroutine"). It is neither copyable nor movable, since its coroutines point at it. Cancel it
/// through the task that awaits it; close() destroys a coroutine that has not started.
template <class R = void>
class coroutine_wrapper {
 public:
  using value_type = R;

  // Not copyable and not movable: the member coroutines hold `this`. To schedule one, keep it in
  // a named object (or a std::unique_ptr) that outlives the task, and pass create_task(std::ref(obj)).
  coroutine_wrapper(const coroutine_wrapper&) = delete;  // not copyable: its coroutines hold `this`
  coroutine_wrapper(coroutine_wrapper&&) = delete;  // not movable: create_task(std::ref(obj)) needs a named object that outlives the task
  coroutine_wrapper& operator=(const coroutine_wrapper&) = delete;
  coroutine_wrapper& operator=(coroutine_wrapper&&) = delete;

  /// True once the coroutine ran to its end (returned or threw).
  bool done() const noexcept { return state_ == status::finished || (frame_ && frame_.done()); }
  /// True once it was awaited or its task started it.
  bool started() const noexcept { return state_ != status::fresh; }
  /// True when it was awaited and has not finished yet.
  bool running() const noexcept { return state_ == status::running && !done(); }

  /// Python's close(): destroys a coroutine that has not started, so it never runs (awaiting
  /// it then throws invalid_state_error); does nothing once it has finished. Throws
  /// invalid_state_error while it runs: cancel the task that awaits it instead.
  void close() {
    if (running()) throw invalid_state_error("coroutine_wrapper::close(): the coroutine is running; cancel the task awaiting it");
    if (state_ == status::fresh) {
      destroy_frame();
      state_ = status::closed;
    }
  }

  /// Awaits the wrapped coroutine (without taking it: the object keeps its state).
  class awaiter {
   public:
    explicit awaiter(coroutine_wrapper* self) noexcept : self_(self) {}
    awaiter(const awaiter&) = delete;
    awaiter& operator=(const awaiter&) = delete;
    ~awaiter() {
      // The awaiting coroutine was destroyed while ours was suspended (its task was abandoned
      // by a closing loop): destroy ours too, so nothing can resume it.
      if (claimed_ && self_->frame_ && !self_->frame_.done()) {
        self_->destroy_frame();
        self_->state_ = status::closed;
      }
    }
    bool await_ready() const noexcept { return self_->state_ != status::fresh || !self_->frame_; }
    bool await_suspend(std::coroutine_handle<> parent) {
      claimed_ = true;
      self_->state_ = status::running;
      auto& promise = self_->frame_.promise();
      promise.continuation = parent;
      promise.started_inline = true;
      self_->frame_.resume();
      promise.started_inline = false;
      return !self_->frame_.done();  // finished already: continue the parent right here
    }
    R await_resume() {
      if (!claimed_) {
        if (self_->state_ == status::fresh) throw invalid_state_error("coroutine_wrapper: no coroutine was set (call set_coroutine in the constructor)");
        throw invalid_state_error("coroutine_wrapper: the coroutine was already awaited, scheduled or closed");
      }
      self_->state_ = status::finished;
      return self_->frame_.promise().take();
    }

   private:
    coroutine_wrapper* self_;
    bool claimed_ = false;
  };
  awaiter operator co_await() & noexcept { return awaiter(this); }
  /// `co_await job(...)` on a temporary is fine: it lives until the await completes.
  awaiter operator co_await() && noexcept { return awaiter(this); }

 protected:
  coroutine_wrapper() noexcept = default;
  /// For a coroutine that does not call members of the derived class (see the class comment).
  explicit coroutine_wrapper(coroutine<R> coro) { set_coroutine(std::move(coro)); }
  ~coroutine_wrapper() {
    if (running()) {
      try {
        log(log_level::error, "coroutine_wrapper destroyed while its coroutine runs: it must outlive the task awaiting it");
      } catch (...) {
      }
    }
    destroy_frame();
  }

  /// Sets (or replaces, before it started) the coroutine this object runs.
  void set_coroutine(coroutine<R> coro) {
    if (state_ != status::fresh) throw invalid_state_error("coroutine_wrapper::set_coroutine: the coroutine already started or was closed");
    if (!coro.valid()) throw std::invalid_argument("coroutine_wrapper::set_coroutine: the coroutine was already awaited or scheduled");
    destroy_frame();
    frame_ = coro.release();
  }

 private:
  enum class status : std::uint8_t { fresh, running, finished, closed };
  void destroy_frame() noexcept {
    if (frame_) std::exchange(frame_, {}).destroy();
  }

  typename coroutine<R>::handle_type frame_;
  status state_ = status::fresh;
};

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <functional>
#include <numeric>
#include <sstream>
#include <vector>

// The reference documentation's CoroutineWrapper example, function for function: an `async def`
// with `yield` is an async_generator, `async for v in gen` is `while (auto v = co_await
// gen.next())`. The types live in a named namespace: task.hpp's frames would otherwise hold
// types of an anonymous namespace, which g++ flags in a header.
namespace coroutine_wrapper_tests {
using namespace codestare::async_utils;
using namespace std::chrono_literals;

inline std::vector<int> range(int n) {
  std::vector<int> r(static_cast<std::size_t>(n));
  std::iota(r.begin(), r.end(), 0);
  return r;
}

/// async def generate_ranges(up_to): for n in range(up_to): yield range(n)
inline async_generator<std::vector<int>> generate_ranges(int up_to) {
  for (int n = 0; n < up_to; ++n) co_yield range(n);
}

/// The first, concise version: async def coro(process, filter_, ranges).
inline coroutine<void> coro_function(std::function<void(int)> process, std::function<bool(int)> filter,
                                     async_generator<std::vector<int>> ranges) {
  while (auto r = co_await ranges.next()) {
    for (int n : *r) {
      if (!filter(n)) continue;
      process(n);
    }
  }
}

/// class coro(CoroutineWrapper), with the same three member coroutines.
struct coro : coroutine_wrapper<void> {
  std::function<bool(int)> filter;
  std::function<void(int)> process;
  async_generator<std::vector<int>> ranges;

  coro(std::function<void(int)> process_, std::function<bool(int)> filter_, async_generator<std::vector<int>> ranges_)
      : filter(std::move(filter_)), process(std::move(process_)), ranges(std::move(ranges_)) {
    set_coroutine(work());
  }
  // async def make_flat_values(self): async for r in self.ranges: for n in r: yield n
  async_generator<int> make_flat_values() {
    while (auto r = co_await ranges.next()) {
      for (int n : *r) co_yield n;
    }
  }
  // async def filter_values(self): async for value in self.make_flat_values(): if self.filter(value): yield value
  async_generator<int> filter_values() {
    auto values = make_flat_values();
    while (auto value = co_await values.next()) {
      if (filter(*value)) co_yield *value;
    }
  }
  // async def work(self): async for value in self.filter_values(): self.process(value)
  coroutine<void> work() {
    auto values = filter_values();
    while (auto value = co_await values.next()) process(*value);
  }
};

/// A counter its creator reads while and after it runs.
struct counter : coroutine_wrapper<int> {
  int value = 0;
  explicit counter(int limit) : limit_(limit) { set_coroutine(count()); }
  coroutine<int> count() {
    while (value < limit_) co_await step();
    co_return value;
  }
  coroutine<void> step() {
    co_await sleep(1ms);
    ++value;
  }
  void replace() { set_coroutine(count()); }

 private:
  int limit_;
};

/// One that fails, and one that never sets a coroutine.
struct failing : coroutine_wrapper<int> {
  failing() { set_coroutine(fail()); }
  coroutine<int> fail() {
    co_await sleep(0s);
    throw std::domain_error("wrapped failure");
  }
};
struct empty_wrapper : coroutine_wrapper<void> {};

/// Counts live frames, to see that an abandoned coroutine is freed.
inline int tracked_alive = 0;
struct tracked {
  tracked() { ++tracked_alive; }
  ~tracked() { --tracked_alive; }
};
struct holder : coroutine_wrapper<void> {
  holder() { set_coroutine(hold()); }
  coroutine<void> hold() {
    tracked t;
    co_await sleep(1h);
  }
};

/// Built from a coroutine that uses no member, passed to the base constructor.
inline coroutine<int> forty_two() { co_return 42; }
struct direct : coroutine_wrapper<int> {
  direct() : coroutine_wrapper(forty_two()) {}
};

}  // namespace coroutine_wrapper_tests

TEST_SUITE("coroutine_wrapper") {
  using namespace coroutine_wrapper_tests;

  TEST_CASE("the CoroutineWrapper example of the reference documentation") {
    testing::run_bounded([]() -> coroutine<void> {
      const std::string expected = "0\n0\n0\n2\n0\n2\n";
      std::ostringstream out;
      // [list(r) async for r in generate_ranges(5)]
      out << '[';
      auto ranges = generate_ranges(5);
      for (bool first = true; auto r = co_await ranges.next(); first = false) {
        out << (first ? "[" : ", [");
        for (std::size_t i = 0; i < r->size(); ++i) out << (i ? ", " : "") << (*r)[i];
        out << ']';
      }
      out << ']';
      CHECK(out.str() == "[[], [0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]");
      out.str("");
      std::function<void(int)> print = [&out](int n) { out << n << '\n'; };
      std::function<bool(int)> even = [](int n) { return n % 2 == 0; };
      co_await coro_function(print, even, generate_ranges(5));
      CHECK(out.str() == expected);
      out.str("");
      co_await coro(print, even, generate_ranges(5));
      CHECK(out.str() == expected);
      out.str("");
      coro c(print, even, generate_ranges(5));
      co_await create_task(std::ref(c));
      CHECK(out.str() == expected);
      CHECK(c.done());
    }());
  }

  TEST_CASE("members stay readable by the creator while and after it runs") {
    testing::run_bounded([]() -> coroutine<void> {
      counter c(5);
      CHECK_FALSE(c.started());
      auto t = create_task(std::ref(c), "counter");
      while (c.value < 2) co_await sleep(0s);
      CHECK(c.value == 2);
      CHECK(c.running());
      CHECK_FALSE(c.done());
      CHECK(co_await t == 5);
      CHECK(c.value == 5);
      CHECK(c.done());
      CHECK_FALSE(c.running());
      direct d;
      CHECK(co_await d == 42);
    }());
  }

  TEST_CASE("awaiting or scheduling twice throws invalid_state_error") {
    testing::run_bounded([]() -> coroutine<void> {
      counter c(1);
      CHECK(co_await c == 1);
      CHECK_THROWS_AS(co_await c, invalid_state_error);
      counter d(1);
      auto first = create_task(std::ref(d));
      auto second = create_task(std::ref(d));
      CHECK(co_await first == 1);
      CHECK_THROWS_AS(co_await second, invalid_state_error);
      empty_wrapper e;
      CHECK_THROWS_AS(co_await e, invalid_state_error);
      static_assert(!std::is_copy_constructible_v<coro> && !std::is_move_constructible_v<coro>);
      static_assert(!std::is_copy_assignable_v<coro> && !std::is_move_assignable_v<coro>);
    }());
  }

  TEST_CASE("exceptions and cancellation pass through") {
    testing::run_bounded([]() -> coroutine<void> {
      failing f;
      try {
        co_await f;
        FAIL("no exception");
      } catch (const std::domain_error& e) {
        CHECK(std::string(e.what()) == "wrapped failure");
      }
      CHECK(f.done());
      counter c(1000);
      auto t = create_task(std::ref(c));
      while (c.value < 1) co_await sleep(0s);
      t.cancel();
      co_await wait_done(t);
      CHECK(t.cancelled());
      CHECK(c.done());  // it ended, by cancelled_error
      CHECK(c.value < 1000);
    }());
  }

  TEST_CASE("close(): before start, while running, after the end; set_coroutine after start") {
    testing::run_bounded([]() -> coroutine<void> {
      counter c(3);
      c.close();
      CHECK_FALSE(c.done());
      CHECK_THROWS_AS(co_await c, invalid_state_error);
      CHECK_THROWS_AS(c.replace(), invalid_state_error);
      counter d(3);
      d.replace();  // before it started: allowed
      auto t = create_task(std::ref(d));
      co_await sleep(0s);
      CHECK_THROWS_AS(d.close(), invalid_state_error);
      CHECK_THROWS_AS(d.replace(), invalid_state_error);
      CHECK(co_await t == 3);
      d.close();  // finished: nothing to do
      CHECK(d.done());
      CHECK(d.value == 3);
    }());
  }

  TEST_CASE("a closing loop that abandons the awaiting task frees the wrapped coroutine") {
    testing::log_capture log;
    holder h;
    {
      event_loop loop;
      auto t = loop.create_task(std::ref(h));
      loop.run_until_complete(sleep(1ms));
      CHECK(tracked_alive == 1);
      CHECK(h.running());
      loop.close();
      CHECK(t.cancelled());
    }
    CHECK(tracked_alive == 0);
    CHECK_FALSE(h.running());
    CHECK_FALSE(h.done());
  }
}
#endif
