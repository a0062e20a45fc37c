// async_generator<T>: an `async def` with `yield`. A coroutine that uses co_yield and may
// co_await anything between yields; its consumer pulls values with `co_await gen.next()`.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "test_support.hpp"
#include "frame_cache.hpp"
#include "event_loop.hpp"
#include "coroutine.hpp"
#include "sleep.hpp"
#include "completion.hpp"
#include "task.hpp"
#include "wait_for.hpp"
#include "run.hpp"

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>

namespace codestare::async_utils {

/// Python's GeneratorExit: what `co_await gen.aclose()` throws inside a generator suspended at a
/// co_yield, so that it unwinds (destructors, catch blocks, then any awaits placed after them).
/// Like GeneratorExit (a BaseException) it is no std::runtime_error: `catch (const
/// std::exception&)` sees it, `catch (const std::runtime_error&)` does not.
class generator_exit : public std::exception {
 public:
  const char* what() const noexcept override { return "generator_exit"; }
};

template <class T>
class async_generator;

namespace detail {

enum class generator_state : std::uint8_t {
  fresh,      // created, body not entered yet
  suspended,  // stopped at a co_yield, a value ready
  running,    // a next() or aclose() is being served
  finished,   // returned or threw (the exception, if any, is in `error` until delivered)
};

template <class T>
struct generator_promise {
  std::coroutine_handle<> continuation;  // the coroutine awaiting next() or aclose()
  async_generator<T>* owner = nullptr;   // null once the owner is gone while a next() runs
  T* yielded = nullptr;                  // the object of the current co_yield, in the generator's frame
  std::exception_ptr error;
  generator_state state = generator_state::fresh;
  bool copy_out = false;        // yielded as an lvalue: copy it rather than move it
  bool started_inline = false;  // the consumer's await_suspend is still on the stack below us
  bool closing = false;         // aclose() resumed us: the co_yield throws generator_exit

  // Frames come from the per-thread frame cache, like every other coroutine frame here.
  static void* operator new(std::size_t n) { return cached_allocate(n); }
  static void operator delete(void* frame, std::size_t n) noexcept { cached_free(frame, n); }

  async_generator<T> get_return_object() noexcept;
  std::suspend_always initial_suspend() const noexcept { return {}; }

  /// Back to the consumer: by returning from its await_suspend when we run inside it (no stack
  /// growth for values produced without suspending), by symmetric transfer otherwise.
  std::coroutine_handle<> hand_back() const noexcept {
    if (started_inline || !continuation) return std::noop_coroutine();
    return continuation;
  }
  struct yield_awaiter {
    generator_promise* p;
    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<>) const noexcept {
      p->state = generator_state::suspended;
      return p->hand_back();
    }
    void await_resume() const {
      if (p->closing) throw generator_exit();
    }
  };
  /// co_yield of an rvalue: the consumer moves it out of the frame.
  yield_awaiter yield_value(T&& value) noexcept {
    yielded = std::addressof(value);
    copy_out = false;
    return {this};
  }
  /// co_yield of an lvalue: the consumer copies it (the generator's variable keeps its value).
  yield_awaiter yield_value(const T& value) noexcept {
    static_assert(std::is_copy_constructible_v<T>, "co_yield of an lvalue copies it, and T cannot be copied: co_yield std::move(x)");
    yielded = const_cast<T*>(std::addressof(value));
    copy_out = true;
    return {this};
  }

  struct final_awaiter {
    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<generator_promise> h) const noexcept {
      generator_promise& p = h.promise();
      p.state = generator_state::finished;
      p.yielded = nullptr;
      return p.hand_back();
    }
    void await_resume() const noexcept {}
  };
  final_awaiter final_suspend() const noexcept { return {}; }
  void return_void() const noexcept {}
  void unhandled_exception() noexcept { error = std::current_exception(); }
};

}  // namespace detail

/// Python's async generator (`async def f(): ... yield x`): a lazy, move-only coroutine that
/// uses `co_yield` and may `co_await` anything (sleeps, tasks, locks, other generators) between
/// yields. Its body runs in the task that awaits next(), so a cancellation of that task reaches
/// the generator's current await.
///
///     async_generator<int> ticks(int n) {
///       for (int i = 0; i < n; ++i) {
///         co_await sleep(1ms);
///         co_yield i;
///       }
///     }
///     auto gen = ticks(3);
///     while (auto v = co_await gen.next()) use(*v);   // async for v in ticks(3): use(v)
///
/// - `co_await gen.next()` (`anext`): the next value, or std::nullopt at the end
///   (StopAsyncIteration), and again std::nullopt on every later call. An exception thrown in
///   the generator (cancelled_error included) leaves through the next() that ran it; the
///   generator is finished afterwards. Awaiting next() while another next() or aclose() of the
///   same generator is in progress throws invalid_state_error (Python: RuntimeError "anext():
///   asynchronous generator is already running").
/// - `co_await gen.aclose()`: a generator stopped at a co_yield gets generator_exit thrown at
///   that co_yield and runs to its end (its catch blocks may co_await, after the handler); one
///   not started is closed without running; a finished one is left as it is. An exception other
///   than generator_exit leaves through aclose(); a generator that co_yields again instead of
///   ending makes aclose() throw std::runtime_error and stays stopped at that co_yield.
/// - Destroying an unfinished generator destroys its frame: the destructors of its locals run
///   (but no catch block and no co_await: that is what aclose() is for). Destroying it while a
///   next() is in progress leaves the frame to that next(), which delivers its value and then
///   frees it.
/// - A value is produced without allocating: `co_yield x` copies x straight into the optional
///   next() returns, `co_yield std::move(x)` (or a temporary) moves it. The frame is the only
///   allocation (from the per-thread frame cache). For a move-only T, co_yield an rvalue.
/// - T is a value type: async_generator<T&> does not compile; yield a pointer or a
///   std::reference_wrapper<T> (valid until the next call of next(), when it points into the
///   generator's frame).
/// The generator must outlive the awaits of its next() and aclose(). Loop thread only.
template <class T>
class [[nodiscard]] async_generator {
  static_assert(!std::is_reference_v<T>, "async_generator<T&> is not supported: yield a pointer or a std::reference_wrapper<T>");
  static_assert(!std::is_void_v<T>, "async_generator<void> yields nothing: use coroutine<void>");
  static_assert(!std::is_const_v<T> && !std::is_volatile_v<T>, "async_generator<const T>: yield plain T (next() returns a copy)");

 public:
  using value_type = T;
  using promise_type = detail::generator_promise<T>;
  using handle_type = std::coroutine_handle<promise_type>;

  async_generator() noexcept = default;
  explicit async_generator(handle_type h) noexcept : frame_(h) {
    if (frame_) frame_.promise().owner = this;
  }
  async_generator(async_generator&& other) noexcept : frame_(std::exchange(other.frame_, {})) {
    if (frame_) frame_.promise().owner = this;
  }
  async_generator& operator=(async_generator&& other) noexcept {
    if (this != &other) {
      release();
      frame_ = std::exchange(other.frame_, {});
      if (frame_) frame_.promise().owner = this;
    }
    return *this;
  }
  async_generator(const async_generator&) = delete;
  async_generator& operator=(const async_generator&) = delete;
  ~async_generator() { release(); }

  /// True once it has finished (returned or thrown), was closed, or was moved from: next()
  /// returns std::nullopt from now on.
  bool done() const noexcept { return !frame_ || frame_.promise().state == detail::generator_state::finished; }
  /// True while a next() or aclose() is being served.
  bool running() const noexcept { return frame_ && frame_.promise().state == detail::generator_state::running; }

  /// Shared by next() and aclose(): the bookkeeping of one await of the generator.
  class step_awaiter {
   public:
    step_awaiter(const step_awaiter&) = delete;
    step_awaiter& operator=(const step_awaiter&) = delete;
    /// Movable until awaited (create_task and wait_for keep it by value).
    step_awaiter(step_awaiter&& other) noexcept
        : frame_(std::exchange(other.frame_, {})), closing_(other.closing_), busy_(other.busy_), in_flight_(other.in_flight_) {}
    ~step_awaiter() {
      // The awaiting coroutine was destroyed while the generator ran for it (its task was
      // abandoned by a closing loop): the generator's frame goes too, so nothing resumes it.
      if (in_flight_ && frame_) destroy_frame(frame_);
    }

    bool await_ready() noexcept {
      if (!frame_) return true;
      switch (frame_.promise().state) {
        case detail::generator_state::running: busy_ = true; return true;
        case detail::generator_state::finished: return true;
        case detail::generator_state::fresh: return closing_;  // aclose() of an unstarted one: nothing to run
        case detail::generator_state::suspended: return false;
      }
      return false;
    }
    bool await_suspend(std::coroutine_handle<> consumer) {
      promise_type& p = frame_.promise();
      p.continuation = consumer;
      p.closing = closing_;
      p.state = detail::generator_state::running;
      p.started_inline = true;
      frame_.resume();
      p.started_inline = false;
      in_flight_ = p.state == detail::generator_state::running;
      return in_flight_;  // it yielded or ended already: continue the consumer right here
    }

   protected:
    step_awaiter(handle_type frame, bool closing) noexcept : frame_(frame), closing_(closing) {}
    void check_not_busy() const {
      if (busy_)
        throw invalid_state_error(closing_ ? "aclose(): the async generator is already running (a next() or aclose() of it is in progress)"
                                           : "next(): the async generator is already running (a next() or aclose() of it is in progress)");
    }
    /// After the generator handed back: its exception, which leaves the generator finished.
    void rethrow_error(promise_type& p) {
      if (p.error) {
        std::exception_ptr e = std::exchange(p.error, nullptr);
        free_if_orphaned(p);
        std::rethrow_exception(e);
      }
    }
    /// The owner went away while we were in flight: the frame is ours to free.
    void free_if_orphaned(promise_type& p) noexcept {
      if (!p.owner) std::exchange(frame_, {}).destroy();
    }
    static void destroy_frame(handle_type h) noexcept {
      if (async_generator* owner = h.promise().owner) owner->frame_ = {};
      h.destroy();
    }

    handle_type frame_;
    bool closing_;
    bool busy_ = false;
    bool in_flight_ = false;
  };

  /// What `co_await gen.next()` awaits: yields std::optional<T>.
  class next_awaiter : public step_awaiter {
   public:
    std::optional<T> await_resume() {
      this->in_flight_ = false;
      this->check_not_busy();
      if (!this->frame_) return std::nullopt;
      promise_type& p = this->frame_.promise();
      if (p.state != detail::generator_state::suspended) {  // finished
        this->rethrow_error(p);
        this->free_if_orphaned(p);
        return std::nullopt;
      }
      struct release_after {  // an orphaned frame is freed once the value is out (or failed to come out)
        next_awaiter* self;
        promise_type* p;
        ~release_after() { self->free_if_orphaned(*p); }
      } guard{this, &p};
      if constexpr (std::is_copy_constructible_v<T>) {
        if (p.copy_out) return std::optional<T>(std::in_place, static_cast<const T&>(*p.yielded));
      }
      return std::optional<T>(std::in_place, std::move(*p.yielded));
    }

   private:
    friend class async_generator;
    explicit next_awaiter(handle_type frame) noexcept : step_awaiter(frame, false) {}
  };

  /// What `co_await gen.aclose()` awaits.
  class aclose_awaiter : public step_awaiter {
   public:
    void await_resume() {
      this->in_flight_ = false;
      this->check_not_busy();
      if (!this->frame_) return;
      promise_type& p = this->frame_.promise();
      p.closing = false;
      if (p.state == detail::generator_state::suspended) {  // it yielded instead of ending
        this->free_if_orphaned(p);
        throw std::runtime_error("aclose(): the async generator ignored generator_exit (it yielded a value)");
      }
      if (p.state == detail::generator_state::finished && p.error) {
        std::exception_ptr e = std::exchange(p.error, nullptr);
        if (!is_generator_exit(e)) {
          this->free_if_orphaned(p);
          std::rethrow_exception(e);
        }
      }
      // Finished (or never started): closed for good, the frame can go now.
      step_awaiter::destroy_frame(std::exchange(this->frame_, {}));
    }

   private:
    friend class async_generator;
    explicit aclose_awaiter(handle_type frame) noexcept : step_awaiter(frame, true) {}
    static bool is_generator_exit(const std::exception_ptr& e) noexcept {
      try {
        std::rethrow_exception(e);
      } catch (const generator_exit&) {
        return true;
      } catch (...) {
        return false;
      }
    }
  };

  /// `anext(gen)`: the next value, std::nullopt at the end.
  [[nodiscard]] next_awaiter next() noexcept { return next_awaiter(frame_); }
  /// `gen.aclose()`: ends the generator, running its cleanup (see the class comment).
  [[nodiscard]] aclose_awaiter aclose() noexcept { return aclose_awaiter(frame_); }

 private:
  void release() noexcept {
    if (!frame_) return;
    handle_type h = std::exchange(frame_, {});
    if (h.promise().state == detail::generator_state::running) {
      h.promise().owner = nullptr;  // the next() in progress frees it when it is done
      return;
    }
    h.destroy();
  }

  handle_type frame_;
};

template <class T>
async_generator<T> detail::generator_promise<T>::get_return_object() noexcept {
  return async_generator<T>(std::coroutine_handle<generator_promise>::from_promise(*this));
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

// The counting operator new of the tests (testing::counting_allocations, test_support.hpp).
#if defined(ASYNC_UTILS_TESTS_MAIN) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#if !defined(__has_feature)
#define ASYNC_UTILS_COUNT_ALLOCATIONS
#elif !__has_feature(address_sanitizer) && !__has_feature(thread_sanitizer) && !__has_feature(memory_sanitizer)
#define ASYNC_UTILS_COUNT_ALLOCATIONS
#endif
#endif
#ifdef ASYNC_UTILS_COUNT_ALLOCATIONS
[[gnu::weak]] void* operator new(std::size_t n) {
  if (codestare::async_utils::testing::counting_allocations) ++codestare::async_utils::testing::allocations_counted;
  for (;;) {
    if (void* p = std::malloc(n ? n : 1)) return p;
    std::new_handler handler = std::get_new_handler();
    if (!handler) throw std::bad_alloc();
    handler();
  }
}
[[gnu::weak]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::weak]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#undef ASYNC_UTILS_COUNT_ALLOCATIONS
#endif

// Types and generators of the tests live in a named namespace: coroutine frames that hold types
// of an anonymous namespace draw a -Wsubobject-linkage warning from g++ in a header.
namespace async_generator_tests {
using namespace codestare::async_utils;
using namespace std::chrono_literals;

inline int alive = 0;  // live `tracked` objects
struct tracked {
  tracked() { ++alive; }
  tracked(const tracked&) = delete;
  ~tracked() { --alive; }
};

/// Yields 0..n-1, each after a sleep of `pause` (a bare yield to the loop for 0s).
inline async_generator<int> counting(int n, std::chrono::milliseconds pause, std::vector<std::string>* log = nullptr) {
  tracked t;
  for (int i = 0; i < n; ++i) {
    co_await sleep(pause);
    if (log) log->push_back("yield " + std::to_string(i));
    co_yield i;
  }
  if (log) log->push_back("end");
}

inline async_generator<int> fails_after(int n) {
  for (int i = 0; i < n; ++i) co_yield i;
  throw std::domain_error("generator failed");
}

/// Logs how it ended; cleans up asynchronously after generator_exit, as a Python finally would.
inline async_generator<std::string> with_cleanup(std::vector<std::string>& log) {
  tracked t;
  std::exception_ptr ended;
  try {
    co_yield "a";
    co_yield "b";
  } catch (const generator_exit&) {
    log.push_back("generator_exit");
    ended = std::current_exception();
  }
  co_await sleep(1ms);  // asynchronous cleanup
  log.push_back("cleaned up");
  if (ended) std::rethrow_exception(ended);
}

inline async_generator<int> ignores_exit() {
  for (int i = 0;; ++i) {
    try {
      co_yield i;
    } catch (const generator_exit&) {
    }
  }
}

inline async_generator<int> cleanup_fails() {
  try {
    co_yield 1;
  } catch (const generator_exit&) {
  }
  throw std::domain_error("cleanup failed");
}

inline async_generator<std::unique_ptr<int>> owned(int n) {
  for (int i = 0; i < n; ++i) {
    auto p = std::make_unique<int>(i);
    if (i % 2) co_yield std::move(p);
    else co_yield std::make_unique<int>(i);
  }
}

inline async_generator<std::reference_wrapper<int>> references(std::vector<std::string>& log) {
  int slot = 1;
  co_yield std::ref(slot);
  log.push_back("slot is " + std::to_string(slot));  // the consumer wrote through the reference
}

inline async_generator<long> numbers(long n) {
  for (long i = 0; i < n; ++i) co_yield i;
}
inline async_generator<std::string> words(long n) {
  std::string w = "word";  // short: no allocation of its own
  for (long i = 0; i < n; ++i) {
    co_await sleep(0s);
    co_yield w;
  }
}

}  // namespace async_generator_tests

TEST_SUITE("async_generator") {
  using namespace async_generator_tests;

  TEST_CASE("yields interleaved with awaits; std::nullopt at the end and on every later call") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> log;
      auto gen = counting(3, 1ms, &log);
      CHECK_FALSE(gen.done());
      CHECK(alive == 0);  // lazy: the body has not started
      std::vector<int> got;
      while (auto v = co_await gen.next()) {
        log.push_back("got " + std::to_string(*v));
        got.push_back(*v);
      }
      CHECK(got == std::vector<int>{0, 1, 2});
      CHECK(log == std::vector<std::string>{"yield 0", "got 0", "yield 1", "got 1", "yield 2", "got 2", "end"});
      CHECK(gen.done());
      CHECK(alive == 0);  // the body's locals are gone once it ended
      CHECK_FALSE(co_await gen.next());
      CHECK_FALSE(co_await gen.next());
      gen = counting(1, 0ms);  // move assignment frees the old frame
      CHECK(alive == 0);
      CHECK(*co_await gen.next() == 0);
      auto moved = std::move(gen);
      CHECK(gen.done());
      CHECK_FALSE(co_await gen.next());  // a moved-from generator is at its end
      CHECK_FALSE(co_await moved.next());
      async_generator<int> empty;
      CHECK(empty.done());
      CHECK_FALSE(co_await empty.next());
      co_await empty.aclose();
    }());
    CHECK(alive == 0);
  }

  TEST_CASE("a generator that throws: the exception leaves through next(), then it is finished") {
    testing::run_bounded([]() -> coroutine<void> {
      auto gen = fails_after(2);
      CHECK(*co_await gen.next() == 0);
      CHECK(*co_await gen.next() == 1);
      try {
        co_await gen.next();
        FAIL("no exception");
      } catch (const std::domain_error& e) {
        CHECK(std::string(e.what()) == "generator failed");
      }
      CHECK(gen.done());
      CHECK_FALSE(co_await gen.next());
      co_await gen.aclose();  // finished: nothing to do, and nothing thrown again
      auto at_once = fails_after(0);
      CHECK_THROWS_AS(co_await at_once.next(), std::domain_error);
    }());
  }

  TEST_CASE("abandoned mid-way, unstarted, or finished: the frame's destructors run, nothing leaks") {
    testing::run_bounded([]() -> coroutine<void> {
      {
        auto gen = counting(10, 1ms);
        CHECK(*co_await gen.next() == 0);
        CHECK(alive == 1);
      }
      CHECK(alive == 0);
      {
        auto gen = counting(10, 0ms);  // never started
      }
      CHECK(alive == 0);
      {
        auto gen = counting(1, 0ms);
        while (co_await gen.next()) {
        }
      }
      CHECK(alive == 0);
      // A temporary generator: its frame goes at the end of the full expression.
      CHECK(*co_await counting(5, 0ms).next() == 0);
      CHECK(alive == 0);
    }());
  }

  TEST_CASE("next() while another next() or aclose() is in progress throws invalid_state_error") {
    testing::run_bounded([]() -> coroutine<void> {
      auto gen = counting(3, 5ms);
      auto first = create_task(gen.next());
      co_await sleep(0s);  // first is now inside the generator's sleep
      CHECK(gen.running());
      try {
        co_await gen.next();
        FAIL("no exception");
      } catch (const invalid_state_error& e) {
        CHECK(std::string(e.what()).find("already running") != std::string::npos);
      }
      CHECK_THROWS_AS(co_await gen.aclose(), invalid_state_error);
      auto second = create_task(gen.next());  // from another task as well
      CHECK_THROWS_AS(co_await second, invalid_state_error);
      CHECK(*co_await first == 0);  // the first one was not disturbed
      CHECK_FALSE(gen.running());
      CHECK(*co_await gen.next() == 1);
    }());
  }

  TEST_CASE("cancelling the consumer while the generator sleeps: cancelled_error through next()") {
    testing::run_bounded([]() -> coroutine<void> {
      auto slow = counting(3, std::chrono::milliseconds(3600000));
      auto consumer = create_task([](async_generator<int>& g) -> coroutine<void> {
        CHECK_THROWS_AS(co_await g.next(), cancelled_error);
        throw cancelled_error("seen");
      }(slow));
      co_await sleep(1ms);
      CHECK(slow.running());
      CHECK(alive == 1);
      consumer.cancel();
      co_await wait_done(consumer);
      CHECK(consumer.cancelled());
      CHECK(slow.done());  // the cancellation ended the generator and unwound its locals
      CHECK(alive == 0);
      CHECK_FALSE(co_await slow.next());
      // wait_for around a running next(): the deadline cancels the generator's await. (Started
      // first: a deadline that passes before a new task's first step cancels it unstarted.)
      auto late = counting(3, std::chrono::milliseconds(3600000));
      auto pending = create_task(late.next());
      co_await sleep(0s);
      CHECK(late.running());
      CHECK_THROWS_AS(co_await wait_for(pending, 2ms), timeout_error);
      CHECK(late.done());
      CHECK_FALSE(co_await late.next());
    }());
    CHECK(alive == 0);
  }

  TEST_CASE("aclose() on a suspended generator runs its cleanup, awaits included") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> log;
      auto gen = with_cleanup(log);
      CHECK(*co_await gen.next() == "a");
      co_await gen.aclose();
      CHECK(log == std::vector<std::string>{"generator_exit", "cleaned up"});
      CHECK(alive == 0);  // closed for good: the frame is gone already
      CHECK(gen.done());
      CHECK_FALSE(co_await gen.next());
      co_await gen.aclose();  // again: nothing
      CHECK(log.size() == 2);
    }());
  }

  TEST_CASE("aclose() on an unstarted or finished generator does not run it") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> log;
      auto fresh = with_cleanup(log);
      co_await fresh.aclose();
      CHECK(log.empty());
      CHECK(fresh.done());
      CHECK_FALSE(co_await fresh.next());
      auto finished = counting(1, 0ms, &log);
      while (co_await finished.next()) {
      }
      CHECK(log.size() == 2);
      co_await finished.aclose();
      CHECK(log.size() == 2);
      CHECK(alive == 0);
    }());
  }

  TEST_CASE("aclose(): a generator that yields again, or fails in its cleanup") {
    testing::run_bounded([]() -> coroutine<void> {
      auto stubborn = ignores_exit();
      CHECK(*co_await stubborn.next() == 0);
      CHECK_THROWS_AS(co_await stubborn.aclose(), std::runtime_error);
      CHECK_FALSE(stubborn.done());  // stopped at the next co_yield, as in Python
      CHECK(*co_await stubborn.next() == 2);
      auto failing = cleanup_fails();
      CHECK(*co_await failing.next() == 1);
      CHECK_THROWS_AS(co_await failing.aclose(), std::domain_error);
      CHECK(failing.done());
      CHECK_FALSE(co_await failing.next());
    }());
  }

  TEST_CASE("cancelling the task that awaits aclose() while the cleanup sleeps") {
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<std::string> log;
      auto gen = with_cleanup(log);
      CHECK(*co_await gen.next() == "a");
      auto closer = create_task([](async_generator<std::string>& g) -> coroutine<void> { co_await g.aclose(); }(gen));
      co_await sleep(0s);
      closer.cancel();
      co_await wait_done(closer);
      CHECK(closer.cancelled());
      CHECK(log == std::vector<std::string>{"generator_exit"});
      CHECK(gen.done());
    }());
    CHECK(alive == 0);
  }

  TEST_CASE("move-only values, and references as std::reference_wrapper") {
    testing::run_bounded([]() -> coroutine<void> {
      auto gen = owned(4);
      int expected = 0;
      while (auto p = co_await gen.next()) CHECK(**p == expected++);
      CHECK(expected == 4);
      std::vector<std::string> log;
      auto refs = references(log);
      auto r = co_await refs.next();
      CHECK(r->get() == 1);
      r->get() = 7;  // valid until the next call of next()
      CHECK_FALSE(co_await refs.next());
      CHECK(log == std::vector<std::string>{"slot is 7"});
      static_assert(!std::is_copy_constructible_v<async_generator<int>>);
      static_assert(std::is_nothrow_move_constructible_v<async_generator<int>>);
      static_assert(std::is_same_v<await_result_t<decltype(gen.next())>, std::optional<std::unique_ptr<int>>>);
    }());
  }

  TEST_CASE("a million values without suspending: no stack growth, no allocation per value") {
    testing::run_bounded(
        []() -> coroutine<void> {
          auto gen = numbers(1000000);
          auto words_gen = words(1000);
          CHECK(*co_await gen.next() == 0);  // the frame exists from here on
          CHECK(*co_await words_gen.next() == "word");
          const std::size_t probe_before = testing::allocations_counted;
          testing::counting_allocations = true;
          ::operator delete(::operator new(8));  // a direct call: the compiler may not elide it
          const bool counts = testing::allocations_counted != probe_before;
          const std::size_t before = testing::allocations_counted;
          long sum = 0;
          while (auto v = co_await gen.next()) sum += *v;
          long letters = 0;
          while (auto w = co_await words_gen.next()) letters += static_cast<long>(w->size());  // sleep(0s) between values
          const std::size_t allocated = testing::allocations_counted - before;
          testing::counting_allocations = false;
          CHECK(sum == 1000000L * 999999L / 2);
          CHECK(letters == 999 * 4);
          if (counts) CHECK(allocated == 0);
          else MESSAGE("allocations are not counted in this build (sanitizer, or no ASYNC_UTILS_TESTS_MAIN here)");
        }(),
        std::chrono::seconds(60));
  }

  TEST_CASE("the consumer's loop closes while next() waits inside the generator") {
    testing::log_capture quiet;  // "Task was destroyed but it is pending"
    {
      event_loop loop;
      auto gen = counting(3, std::chrono::milliseconds(3600000));
      auto t = loop.create_task([](async_generator<int>& g) -> coroutine<void> { co_await g.next(); }(gen));
      loop.run_until_complete(sleep(1ms));
      CHECK(gen.running());
      CHECK(alive == 1);
      loop.close();  // destroys the consumer's frame, and with it the generator's
      CHECK(t.cancelled());
      CHECK(alive == 0);
      CHECK(gen.done());
    }
    CHECK(alive == 0);
  }

  TEST_CASE("the generator destroyed while a next() of another task is in progress") {
    testing::run_bounded([]() -> coroutine<void> {
      auto gen = std::make_unique<async_generator<int>>(counting(3, 2ms));
      auto t = create_task(gen->next());
      co_await sleep(0s);
      CHECK(gen->running());
      gen.reset();  // the next() in progress keeps the frame, delivers its value, then frees it
      CHECK(alive == 1);
      CHECK(*co_await t == 0);
      CHECK(alive == 0);
    }());
  }
}
#endif
