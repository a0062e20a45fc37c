// run_in_executor and the loop's default executor: asyncio's loop.run_in_executor,
// set_default_executor and shutdown_default_executor.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../platform/log.hpp"
#include "../platform/signal_source.hpp"
#include "../platform/thread_pool.hpp"
#include "test_support.hpp"
#include "job_queue.hpp"
#include "future_core.hpp"
#include "any_task.hpp"
#include "event_loop.hpp"
#include "task_steps.hpp"
#include "coroutine.hpp"
#include "sleep.hpp"
#include "task.hpp"
#include "io.hpp"  // before the tests: g++ 12 rejects io.hpp's event_loop::sock_* definitions after them

#if ASYNC_UTILS_DEFINITIONS
#include <algorithm>
#endif
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace codestare::async_utils {
namespace detail {

/// How executor threads reach a loop: its thread-safe queue, behind a lock that the loop cuts
/// when its executor part goes away, so a late job (of an executor that does not join) never
/// touches a dead loop.
struct loop_link {
  explicit loop_link(event_loop* l) noexcept : loop(l) {}
  bool post(job j);
  void cut() noexcept;
  std::mutex mutex;
  event_loop* loop;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK bool loop_link::post(job j) {
  std::lock_guard guard(mutex);  // held: cut(), which the loop's close() calls, waits for us
  return loop && loop->post_held(j);
}

ASYNC_UTILS_LINK void loop_link::cut() noexcept {
  std::lock_guard guard(mutex);
  loop = nullptr;
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// One run_in_executor call, shared by the thread that runs it and the loop that waits for
/// it. Counted atomically, since either side may hold the last reference (a cancelled awaiter
/// leaves first). Fields are split: the worker writes only the outcome, before posting; the
/// loop reads it only after the posted completion ran. future_core is never touched off-loop.
class executor_call {
 public:
  explicit executor_call(event_loop* l) noexcept : loop(l) {}
  executor_call(const executor_call&) = delete;
  executor_call& operator=(const executor_call&) = delete;
  void add_ref() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }
  void release() noexcept;

  /// Executor thread: runs the job, stores its outcome, posts the completion to the loop. The
  /// caller's reference goes with the completion, so that the executor thread holds none once
  /// the loop may see the outcome: the last release (and with it the outcome, an exception
  /// the awaiter may still be reading included) always happens on the loop thread.
  void execute(loop_link& link) noexcept;

  // Loop side.
  event_loop* const loop;
  bool done = false;
  bool consumed = false;
  future_core* waiting = nullptr;  // the suspended task, if any
  const void* awaiter = nullptr;   // which awaiter it suspended in

 protected:
  virtual ~executor_call() = default;
  virtual void invoke() noexcept = 0;
  std::exception_ptr error_;  // written by the executor thread, read by the loop

 private:
  static void complete(void* self, bool run) noexcept;
  std::atomic<std::uint32_t> refs_{1};
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void executor_call::release() noexcept {
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
}

ASYNC_UTILS_LINK void executor_call::execute(loop_link& link) noexcept {
  invoke();
  if (!link.post({&complete, this})) release();  // the loop is gone: nobody is waiting
}

ASYNC_UTILS_LINK void executor_call::complete(void* self, bool run) noexcept {
  auto* call = static_cast<executor_call*>(self);
  call->loop->expected_post_arrived();
  if (run) {
    call->done = true;
    call->awaiter = nullptr;
    if (future_core* task = std::exchange(call->waiting, nullptr)) task->wake();
  }
  call->release();
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// The typed outcome: the value (or error) the awaiter takes.
template <class R>
class executor_result : public executor_call {
 public:
  using executor_call::executor_call;
  R take() {
    if (error_) std::rethrow_exception(error_);
    if (consumed) throw invalid_state_error("run_in_executor: the result was already taken");
    consumed = true;
    if constexpr (!std::is_void_v<R>) return R(std::move(*value_));
  }

 protected:
  struct nothing {};
  std::optional<std::conditional_t<std::is_void_v<R>, nothing, R>> value_;
};

template <class R, class Fn>
class executor_job final : public executor_result<R> {
 public:
  executor_job(event_loop* l, Fn fn) : executor_result<R>(l), fn_(std::move(fn)) {}

 private:
  void invoke() noexcept override {
    try {
      if constexpr (std::is_void_v<R>) fn_();
      else this->value_.emplace(fn_());
    } catch (...) {
      this->error_ = std::current_exception();
    }
  }
  Fn fn_;
};

/// A counted reference to an executor_call, copyable so that it fits a std::function job.
template <class T>
class call_ref {
 public:
  call_ref() noexcept = default;
  call_ref(T* p, bool adopt) noexcept : p_(p) {
    if (p_ && !adopt) p_->add_ref();
  }
  call_ref(const call_ref& other) noexcept : call_ref(other.p_, false) {}
  call_ref(call_ref&& other) noexcept : p_(std::exchange(other.p_, nullptr)) {}
  call_ref& operator=(call_ref other) noexcept {
    std::swap(p_, other.p_);
    return *this;
  }
  ~call_ref() {
    if (p_) p_->release();
  }
  T* operator->() const noexcept { return p_; }
  T* get() const noexcept { return p_; }
  explicit operator bool() const noexcept { return p_ != nullptr; }
  /// Gives the reference up to the caller, who releases it.
  T* release() noexcept { return std::exchange(p_, nullptr); }

 private:
  T* p_ = nullptr;
};

/// A loop's executor part: the default executor (made on first use), replaced ones still
/// finishing, helper threads of shutdown_default_executor, and the link jobs post through.
struct executor_slot {
  explicit executor_slot(event_loop* loop) : link(std::make_shared<loop_link>(loop)) {}
  executor_slot(const executor_slot&) = delete;
  executor_slot& operator=(const executor_slot&) = delete;
  ~executor_slot();

  executor& get();

  void submit(executor_call& call);

  /// Blocks until every job has run and every thread is joined.
  void shutdown_now() noexcept;
  static void stop(executor& e) noexcept;

  std::shared_ptr<executor> current;
  std::vector<std::shared_ptr<executor>> retired;
  std::shared_ptr<loop_link> link;
  std::vector<std::thread> helpers;
  bool shutdown_called = false;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK executor_slot::~executor_slot() {
  shutdown_now();
  link->cut();
}

ASYNC_UTILS_LINK executor& executor_slot::get() {
  if (shutdown_called) throw std::runtime_error("Executor shutdown has been called");
  if (!current) current = std::make_shared<thread_pool_executor>();
  return *current;
}

ASYNC_UTILS_LINK void executor_slot::submit(executor_call& call) {
  executor& e = get();
  // The job hands its reference to execute(); one never run (dropped by an executor of the
  // user's) releases it when destroyed.
  e.submit([ref = call_ref<executor_call>(&call, false), l = link]() mutable { ref.release()->execute(*l); });
  call.loop->expect_post();
}

ASYNC_UTILS_LINK void executor_slot::shutdown_now() noexcept {
  shutdown_called = true;
  for (auto& t : helpers) t.join();
  helpers.clear();
  for (auto& e : retired) stop(*e);
  retired.clear();
  if (current) stop(*current);
}

ASYNC_UTILS_LINK void executor_slot::stop(executor& e) noexcept {
  try {
    e.shutdown(true);
  } catch (...) {
    try {
      log(log_level::error, "executor shutdown failed: " + describe(std::current_exception()));
    } catch (...) {
    }
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

ASYNC_UTILS_LINK executor_slot& slot_of(event_loop& loop);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK executor_slot& slot_of(event_loop& loop) {
  auto& slot = loop.executor_slot();
  if (!slot) slot = erased_ptr<executor_slot>(new executor_slot(&loop), [](executor_slot* s) { delete s; });
  return *slot;
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace detail

/// What run_in_executor returns: an awaitable (asyncio's wrapped concurrent future) yielding
/// the job's result or rethrowing its exception. The job was submitted already; awaiting is
/// optional. Cancelling the awaiting task throws cancelled_error at once; the job runs on and
/// its result is dropped. Await it once, from a task of the loop it came from.
template <class R>
class [[nodiscard]] executor_future : detail::cancel_hook {
 public:
  using value_type = R;
  explicit executor_future(detail::executor_result<R>* call) noexcept : call_(call, true) {}
  executor_future(executor_future&& other) noexcept : call_(std::move(other.call_)) {}
  executor_future& operator=(executor_future&&) = delete;
  ~executor_future() {
    if (call_ && call_->awaiter == this) {
      call_->awaiter = nullptr;
      call_->waiting = nullptr;
    }
  }

  /// True once the result (or the exception) has reached the loop.
  bool done() const noexcept { return call_ && call_->done; }

  bool await_ready() const noexcept { return done(); }
  void await_suspend(std::coroutine_handle<> h) {
    if (!call_) throw invalid_state_error("run_in_executor: empty (moved-from) result");
    task_ = &detail::current_task_core("run_in_executor");
    if (task_->loop() != call_->loop) throw std::runtime_error("run_in_executor: awaited from another event loop");
    if (call_->waiting) throw invalid_state_error("run_in_executor: already awaited by another task");
    cancel = [](detail::cancel_hook* c) {
      auto* self = static_cast<executor_future*>(c);
      self->call_->waiting = nullptr;
      self->call_->awaiter = nullptr;
      self->withdrawn_ = true;
      self->task_->wake();
      return true;
    };
    call_->waiting = task_;
    call_->awaiter = this;
    task_->suspend_on(this, h);
  }
  R await_resume() {
    if (!call_) throw invalid_state_error("run_in_executor: empty (moved-from) result");
    if (task_) task_->throw_if_cancelled(withdrawn_);
    return call_->take();
  }

 private:
  detail::call_ref<detail::executor_result<R>> call_;
  detail::future_core* task_ = nullptr;
  bool withdrawn_ = false;
};

namespace detail {
/// What both run_in_executor overloads do: fn(args...) with everything moved into a job, the
/// future owning the job's creation reference, and `submit(job)` handing it to an executor.
template <class Submit, class F, class... Args>
auto start_executor_job(event_loop* loop, Submit submit, F fn, Args... args) {
  static_assert(std::is_invocable_v<F&&, Args&&...>, "run_in_executor: fn cannot be called with these arguments");
  using R = std::remove_cvref_t<std::invoke_result_t<F&&, Args&&...>>;
  static_assert(std::is_void_v<R> || std::is_move_constructible_v<R>, "run_in_executor: the result must be movable");
  auto work = [f = std::move(fn), ... a = std::move(args)]() mutable -> R { return std::invoke(std::move(f), std::move(a)...); };
  auto* call = new executor_job<R, decltype(work)>(loop, std::move(work));
  executor_future<R> result(call);  // owns the creation reference
  submit(call);
  return result;
}
}  // namespace detail

/// asyncio's loop.run_in_executor(None, fn, *args): runs fn(args...) on the default executor
/// (a thread_pool_executor made on first use). fn and args are moved or copied into the job,
/// never referenced: pass std::ref explicitly to share. Throws std::runtime_error after
/// shutdown_default_executor() or when the loop is closed.
///
/// g++ 12 bug: a lambda with non-trivially-copyable captures written inside a co_await
/// expression (`co_await run_in_executor([p] {...})`) is copied bitwise and destroyed twice by
/// the compiler, whatever the callee does. Pass such values as args, or name the lambda first.
template <class F, class... Args>
  requires(!std::is_base_of_v<executor, std::remove_cvref_t<F>>)
auto event_loop::run_in_executor(F fn, Args... args) {
  check_open();
  return detail::start_executor_job(this, [this](auto* call) { detail::slot_of(*this).submit(*call); }, std::move(fn), std::move(args)...);
}

/// loop.run_in_executor(executor, fn, *args): as above on the given executor, which must
/// outlive the job (the loop neither owns nor shuts it down). Its submit() errors propagate.
template <class F, class... Args>
auto event_loop::run_in_executor(executor& where, F fn, Args... args) {
  check_open();
  auto submit = [this, &where](auto* call) {
    where.submit([ref = detail::call_ref<detail::executor_call>(call, false), l = detail::slot_of(*this).link]() mutable {
      ref.release()->execute(*l);
    });
    expect_post();
  };
  return detail::start_executor_job(this, submit, std::move(fn), std::move(args)...);
}

/// asyncio's loop.set_default_executor. Takes any executor implementation (shared with the
/// caller) or a worker count for a new thread_pool_executor (std::invalid_argument for 0). A
/// replaced executor is not stopped at once: its jobs finish and the loop's shutdown (run(),
/// close(), shutdown_default_executor) shuts it down and joins it, as it does the current one.

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void event_loop::set_default_executor(std::shared_ptr<executor> e) {
  if (!e) throw std::invalid_argument("set_default_executor: null executor");
  check_open();
  detail::executor_slot& slot = detail::slot_of(*this);
  slot.retired.reserve(slot.retired.size() + 1);
  if (slot.current) slot.retired.push_back(std::move(slot.current));
  slot.current = std::move(e);
}
ASYNC_UTILS_LINK void event_loop::set_default_executor(std::size_t max_workers) {
  set_default_executor(std::make_shared<thread_pool_executor>(max_workers));
}

/// asyncio's loop.shutdown_default_executor: a helper thread waits for the running and queued
/// jobs and joins the workers while the loop keeps running; later run_in_executor calls throw
/// std::runtime_error. Cancelling the await leaves the helper to be joined at close().
ASYNC_UTILS_LINK coroutine<void> event_loop::shutdown_default_executor() {
  check_open();
  detail::executor_slot& slot = detail::slot_of(*this);
  slot.shutdown_called = true;
  std::vector<std::shared_ptr<executor>> all = slot.retired;
  if (slot.current) all.push_back(slot.current);
  if (all.empty()) co_return;
  auto work = [all] {
    for (auto& e : all) detail::executor_slot::stop(*e);
  };
  auto* call = new detail::executor_job<void, decltype(work)>(this, std::move(work));
  executor_future<void> done(call);
  std::thread& helper = slot.helpers.emplace_back();
  try {
    helper = detail::start_thread_without_signals(
        [ref = detail::call_ref<detail::executor_call>(call, false), l = slot.link]() mutable { ref.release()->execute(*l); });
  } catch (...) {
    slot.helpers.pop_back();
    throw;
  }
  const auto id = helper.get_id();
  co_await done;
  // The helper has posted its completion and is about to return: joining it is short.
  auto it = std::find_if(slot.helpers.begin(), slot.helpers.end(), [id](const std::thread& t) { return t.get_id() == id; });
  if (it != slot.helpers.end()) {
    it->join();
    slot.helpers.erase(it);
  }
}

/// Blocking form, used by run() and close(): waits for every job and joins every thread.
ASYNC_UTILS_LINK void event_loop::shutdown_default_executor_now() {
  if (executor_) executor_->shutdown_now();
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// loop.run_in_executor(None, fn, *args) on the running loop.
template <class F, class... Args>
  requires(!std::is_base_of_v<executor, std::remove_cvref_t<F>>)
auto run_in_executor(F fn, Args... args) {
  return event_loop::current().run_in_executor(std::move(fn), std::move(args)...);
}

/// asyncio.to_thread(fn, *args): fn(args...) on the running loop's default executor, awaited
/// for its result. Arguments are moved or copied in (std::ref to share).
template <class F, class... Args>
  requires(!std::is_base_of_v<executor, std::remove_cvref_t<F>>)
auto to_thread(F fn, Args... args) {
  return event_loop::current().run_in_executor(std::move(fn), std::move(args)...);
}

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <latch>

namespace codestare::async_utils::testing {
/// Sleeps in steps of 1 ms until done() or about two seconds have passed.
inline coroutine<void> wait_until(std::function<bool()> done) {
  for (int i = 0; i < 2000 && !done(); ++i) co_await sleep(std::chrono::milliseconds(1));
}
}  // namespace codestare::async_utils::testing

TEST_SUITE("executor") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("results come back on the loop thread; arguments are moved or copied in") {
    testing::run_bounded([]() -> coroutine<void> {
      const auto me = std::this_thread::get_id();
      std::thread::id worker;
      co_await run_in_executor([&] { worker = std::this_thread::get_id(); });
      CHECK(worker != me);
      CHECK(worker != std::thread::id{});
      std::string text = "x";
      auto pending = run_in_executor([](std::string s, int n) { return s + std::to_string(n); }, text, 4);
      text = "changed";  // the job holds its own copy
      CHECK(co_await std::move(pending) == "x4");
      auto owned = std::make_unique<int>(7);
      CHECK(co_await event_loop::current().run_in_executor([](std::unique_ptr<int> p) { return *p * 6; }, std::move(owned)) == 42);
      CHECK(std::this_thread::get_id() == me);
    }());
  }

  TEST_CASE("to_thread, and run_in_executor on an executor of the caller's") {
    testing::run_bounded([]() -> coroutine<void> {
      const auto me = std::this_thread::get_id();
      auto where = [] { return std::this_thread::get_id(); };
      CHECK(co_await to_thread(where) != me);
      CHECK(co_await to_thread([](int a, int b) { return a * b; }, 6, 7) == 42);
      auto fails = to_thread([] { throw std::domain_error("in thread"); });
      CHECK_THROWS_AS(co_await fails, std::domain_error);
      thread_pool_executor pool(1);
      auto first = event_loop::current().run_in_executor(pool, where);
      auto second = event_loop::current().run_in_executor(pool, [](std::string s) { return s + "!"; }, std::string("own"));
      const auto worker = co_await first;
      CHECK(worker != me);
      CHECK(co_await second == "own!");
      CHECK(co_await event_loop::current().run_in_executor(pool, where) == worker);  // one worker: the same thread
      pool.shutdown(true);
      CHECK_THROWS_AS((void)event_loop::current().run_in_executor(pool, where), std::runtime_error);  // a stopped executor refuses
    }());
  }

  TEST_CASE("exceptions reach the awaiter; a result is taken once") {
    testing::run_bounded([]() -> coroutine<void> {
      auto fails = run_in_executor([]() -> int { throw std::domain_error("in job"); });
      CHECK_THROWS_AS(co_await fails, std::domain_error);
      auto once = run_in_executor([] { return 1; });
      CHECK(co_await once == 1);
      CHECK_THROWS_AS(co_await once, invalid_state_error);
    }());
  }

  TEST_CASE("cancelling the awaiter throws at once; the job finishes and its result is dropped") {
    static std::atomic<int> alive{0};
    static std::atomic<bool> job_finished{false};
    struct tracked {
      std::vector<int> payload = std::vector<int>(1000, 1);
      tracked() { ++alive; }
      tracked(tracked&& other) noexcept : payload(std::move(other.payload)) { ++alive; }
      ~tracked() { --alive; }
    };
    auto release = std::make_shared<std::latch>(1);
    testing::run_bounded([release]() -> coroutine<void> {
      // Parameters, not captures: the lambda object is gone when the task runs.
      auto waiter = create_task([](std::shared_ptr<std::latch> release) -> coroutine<int> {
        // The latch goes in as an argument: see the g++ 12 note at run_in_executor.
        tracked t = co_await run_in_executor(
            [](std::shared_ptr<std::latch> latch) {
              latch->wait();
              tracked result;
              job_finished = true;
              return result;
            },
            release);
        co_return static_cast<int>(t.payload.size());
      }(release));
      co_await sleep(5ms);
      const auto before = std::chrono::steady_clock::now();
      waiter.cancel();
      CHECK_THROWS_AS(co_await waiter, cancelled_error);
      CHECK(std::chrono::steady_clock::now() - before < 1s);
      CHECK_FALSE(job_finished);  // still blocked in the pool
      release->count_down();
      co_await testing::wait_until([] { return job_finished && alive == 0; });
      CHECK(job_finished);
      CHECK(alive == 0);
    }());
    CHECK(alive == 0);
  }

  TEST_CASE("a cancelled awaiter whose loop ends before the job: run() joins, nothing leaks") {
    static std::atomic<bool> finished{false};
    const int threads_before = testing::threads();
    testing::run_bounded([]() -> coroutine<void> {
      auto t = create_task([]() -> coroutine<void> {
        co_await run_in_executor([] {
          std::this_thread::sleep_for(30ms);
          finished = true;
          return std::string(100, 'x');
        });
      }());
      co_await sleep(1ms);
      t.cancel();
      CHECK_THROWS_AS(co_await t, cancelled_error);
    }());
    CHECK(finished);
    CHECK(testing::threads_after_join(threads_before) == threads_before);
  }

  TEST_CASE("10,000 jobs in flight") {
    testing::run_bounded(
        []() -> coroutine<void> {
          std::vector<executor_future<long>> pending;
          pending.reserve(10000);
          for (long i = 0; i < 10000; ++i) pending.push_back(run_in_executor([](long x) { return x * 2; }, i));
          long sum = 0;
          for (auto& f : pending) sum += co_await f;
          CHECK(sum == 2 * (10000L * 9999L / 2));
          // And as many tasks each waiting on its own job.
          std::vector<task<int>> tasks;
          for (int i = 0; i < 10000; ++i)
            tasks.push_back(create_task([](int x) -> coroutine<int> { co_return co_await run_in_executor([x] { return x; }); }(i)));
          long total = 0;
          for (auto& t : tasks) total += co_await t;
          CHECK(total == 10000L * 9999L / 2);
        }(),
        std::chrono::seconds(60));
  }

  TEST_CASE("shutdown_default_executor waits for running jobs without blocking the loop") {
    const int threads_before = testing::threads();
    testing::run_bounded([]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      std::atomic<int> finished{0};
      std::atomic<int> ticks{0};
      std::vector<executor_future<void>> jobs;
      // The jobs end once the loop has ticked three times (or after 5 s, when the check below
      // fails): a blocked loop shows, however slow the machine.
      for (int i = 0; i < 4; ++i) jobs.push_back(run_in_executor([&finished, &ticks] {
        for (int waited = 0; ticks.load() < 3 && waited < 5000; ++waited) std::this_thread::sleep_for(1ms);
        ++finished;
      }));
      auto ticker = create_task([](std::atomic<int>& count) -> coroutine<void> {
        for (;;) {
          co_await sleep(2ms);
          ++count;
        }
      }(ticks));
      co_await loop.shutdown_default_executor();
      CHECK(finished == 4);
      CHECK(ticks >= 3);  // the loop kept running while the helper thread waited
      for (auto& j : jobs) co_await j;  // their completions were delivered
      CHECK_THROWS_AS((void)run_in_executor([] {}), std::runtime_error);
      co_await loop.shutdown_default_executor();  // again: nothing to do
      ticker.cancel();
    }());
    CHECK(testing::threads_after_join(threads_before) == threads_before);
  }

  TEST_CASE("no executor thread outlives run(), even with jobs still running") {
    const int threads_before = testing::threads();
    static std::atomic<int> finished{0};
    testing::run_bounded([threads_before]() -> coroutine<void> {
      event_loop::current().set_default_executor(8);
      for (int i = 0; i < 8; ++i) (void)run_in_executor([] {
        std::this_thread::sleep_for(20ms);
        ++finished;
      });
      co_await sleep(1ms);
      CHECK(testing::threads() > threads_before);
    }());
    CHECK(finished == 8);
    CHECK(testing::threads_after_join(threads_before) == threads_before);
  }

  TEST_CASE("set_default_executor: a worker count or any executor implementation") {
    struct counting : executor {
      std::shared_ptr<thread_pool_executor> pool = std::make_shared<thread_pool_executor>(2);
      std::atomic<int> submitted{0};
      bool shut = false;
      void submit(std::function<void()> job) override {
        ++submitted;
        pool->submit(std::move(job));
      }
      void shutdown(bool wait) override {
        shut = true;
        pool->shutdown(wait);
      }
    };
    auto mine = std::make_shared<counting>();
    testing::run_bounded([mine]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      CHECK_THROWS_AS(loop.set_default_executor(0), std::invalid_argument);
      CHECK_THROWS_AS(loop.set_default_executor(std::shared_ptr<executor>()), std::invalid_argument);
      loop.set_default_executor(2);
      std::atomic<int> running{0}, most{0};
      std::vector<executor_future<void>> jobs;
      for (int i = 0; i < 8; ++i) jobs.push_back(run_in_executor([&] {
        int now = ++running;
        int seen = most.load();
        while (now > seen && !most.compare_exchange_weak(seen, now)) {
        }
        std::this_thread::sleep_for(2ms);
        --running;
      }));
      for (auto& j : jobs) co_await j;
      CHECK(most <= 2);
      loop.set_default_executor(mine);
      CHECK(co_await run_in_executor([] { return 5; }) == 5);
      CHECK(mine->submitted == 1);
    }());
    CHECK(mine->shut);  // run() shut the default executor down
  }

  TEST_CASE("run_in_executor needs a running, open loop") {
    CHECK_THROWS_AS((void)run_in_executor([] {}), std::runtime_error);
    event_loop loop;
    loop.close();
    CHECK_THROWS_AS((void)loop.run_in_executor([] {}), std::runtime_error);
  }
}
#endif
