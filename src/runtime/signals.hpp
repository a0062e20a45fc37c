// Signals: asyncio's loop.add_signal_handler / remove_signal_handler on top of signal_source.
#pragma once

#include "../platform/config.hpp"
#include "../platform/signal_source.hpp"
#include "test_support.hpp"
#include "any_task.hpp"
#include "handle.hpp"
#include "event_loop.hpp"
#include "sleep.hpp"
#include "run.hpp"
#include "executor.hpp"

#include <functional>
#include <memory>
#include <vector>

namespace codestare::async_utils {
namespace detail {

/// A loop's signal handlers. The source's descriptor is watched permanently; what arrives is
/// turned into ordinary callbacks with call_soon, so user code never runs in signal context.
/// Arrivals coalesce: while a call is queued and has not run yet, further arrivals add nothing.
struct signal_registry {
  struct entry {
    int sig;
    std::function<void()> fn;
    bool queued = false;
    handle call;  // the queued call, cancelled on removal
  };

  explicit signal_registry(event_loop& l) : loop(l) { loop.watch_internal(source.fd(), &on_readable, this); }
  signal_registry(const signal_registry&) = delete;
  signal_registry& operator=(const signal_registry&) = delete;
  ~signal_registry();

  std::shared_ptr<entry>* find(int sig) noexcept;

  void add(int sig, std::function<void()> fn);

  bool remove(int sig) noexcept;

  static void on_readable(void* self) noexcept;

  void arrived(int sig);

  event_loop& loop;
  signal_source source;
  std::vector<std::shared_ptr<entry>> entries;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK signal_registry::~signal_registry() {
  for (auto& e : entries) e->call.cancel();
  loop.unwatch_internal(source.fd());
  // source's destructor then restores every disposition and mask bit.
}

ASYNC_UTILS_LINK std::shared_ptr<signal_registry::entry>* signal_registry::find(int sig) noexcept {
  for (auto& e : entries) {
    if (e->sig == sig) return &e;
  }
  return nullptr;
}

ASYNC_UTILS_LINK void signal_registry::add(int sig, std::function<void()> fn) {
  if (auto* e = find(sig)) {
    (*e)->fn = std::move(fn);  // a queued call runs the new handler
    return;
  }
  auto e = std::make_shared<entry>();
  e->sig = sig;
  e->fn = std::move(fn);
  entries.reserve(entries.size() + 1);
  source.add(sig);  // throws with nothing changed
  entries.push_back(std::move(e));
}

ASYNC_UTILS_LINK bool signal_registry::remove(int sig) noexcept {
  auto* e = find(sig);
  if (!e) return false;
  (*e)->call.cancel();
  source.remove(sig);
  entries.erase(entries.begin() + (e - entries.data()));
  return true;
}

ASYNC_UTILS_LINK void signal_registry::on_readable(void* self) noexcept {
  auto* reg = static_cast<signal_registry*>(self);
  try {
    reg->source.drain([reg](int sig) { reg->arrived(sig); });
  } catch (...) {
    reg->loop.call_exception_handler({"Error while reading signals", std::current_exception(), std::nullopt, std::nullopt});
  }
}

ASYNC_UTILS_LINK void signal_registry::arrived(int sig) {
  auto* found = find(sig);
  if (!found || (*found)->queued) return;
  std::shared_ptr<entry> e = *found;
  // Weak: the entry holds the call's handle, so a strong capture would be a cycle.
  e->call = loop.call_soon([weak = std::weak_ptr<entry>(e)] {
    auto self = weak.lock();
    if (!self) return;
    self->queued = false;
    auto fn = self->fn;  // a handler may replace or remove itself while it runs
    fn();
  });
  e->queued = true;
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace detail

/// asyncio's loop.add_signal_handler: runs fn on this loop's thread, as an ordinary callback,
/// after sig arrives (several arrivals before it runs coalesce into one call). Replaces an
/// earlier handler for sig. Call it on the thread that runs the loop.
///
/// Throws std::invalid_argument for a bad number, SIGKILL, SIGSTOP or an empty fn, and
/// std::runtime_error when the loop is closed or when another loop of the process already
/// handles sig: a signal sent to the process reaches one thread only, so one loop owns it
/// until it removes it (two loops may own different signals; each gets its own wherever the
/// kernel delivers it). On Linux/epoll sig is blocked in the loop's thread and read from a
/// signalfd; a handler re-sends it there if the kernel picks another thread. Elsewhere a
/// sigaction handler writes to a self-pipe (poll) or kqueue records it (EVFILT_SIGNAL).
/// With signalfd, processes forked from the loop's thread inherit the blocked bit while the
/// handler is installed (as with any signalfd user): unblock it in the child before exec.
#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void event_loop::add_signal_handler(int sig, std::function<void()> fn) {
  check_open();
  detail::check_signal_number(sig);
  if (!fn) throw std::invalid_argument("add_signal_handler: empty callback");
  if (!signals_) {
    signals_ = detail::erased_ptr<detail::signal_registry>(new detail::signal_registry(*this),
                                                           [](detail::signal_registry* r) { delete r; });
  }
  signals_->add(sig, std::move(fn));
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// asyncio's loop.remove_signal_handler: false when sig had no handler here. Restores the
/// disposition (and, with signalfd, the thread's mask bit) that sig had before; arrivals not
/// yet delivered are dropped. Throws std::invalid_argument for a bad number.
#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK bool event_loop::remove_signal_handler(int sig) {
  detail::check_signal_number(sig);
  return signals_ && signals_->remove(sig);
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <thread>

TEST_SUITE("signals") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  namespace {
  std::atomic<int> foreign_handler_calls{0};
  void foreign_handler(int) { foreign_handler_calls.fetch_add(1); }

  bool blocked_here(int sig) {
    sigset_t now;
    pthread_sigmask(SIG_BLOCK, nullptr, &now);
    return sigismember(&now, sig) == 1;
  }
  }  // namespace

  TEST_CASE("a raised signal runs its handler later, on the loop thread") {
    testing::run_bounded([]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      int calls = 0;
      bool raising = false, ran_during_raise = false;
      std::thread::id where;
      loop.add_signal_handler(SIGUSR1, [&] {
        ++calls;
        where = std::this_thread::get_id();
        ran_during_raise = raising;
      });
      raising = true;
      std::raise(SIGUSR1);
      raising = false;
      CHECK(calls == 0);  // never inline: the callback is scheduled
      co_await testing::wait_until([&] { return calls > 0; });
      CHECK(calls == 1);
      CHECK_FALSE(ran_during_raise);
      CHECK(where == std::this_thread::get_id());
      CHECK(loop.remove_signal_handler(SIGUSR1));
      CHECK_FALSE(loop.remove_signal_handler(SIGUSR1));
    }());
  }

  TEST_CASE("a burst of 100 signals runs the handler at least once, never in signal context") {
    testing::run_bounded([]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      int calls = 0;
      bool raising = false, ran_during_raise = false, on_other_thread = false;
      const auto me = std::this_thread::get_id();
      loop.add_signal_handler(SIGUSR1, [&] {
        ++calls;
        ran_during_raise |= raising;
        on_other_thread |= std::this_thread::get_id() != me;
      });
      raising = true;
      for (int i = 0; i < 100; ++i) std::raise(SIGUSR1);  // the loop is busy: we do not yield
      raising = false;
      co_await testing::wait_until([&] { return calls > 0; });
      co_await sleep(5ms);
      CHECK(calls >= 1);
      CHECK(calls <= 100);
      CHECK_FALSE(ran_during_raise);
      CHECK_FALSE(on_other_thread);
      loop.remove_signal_handler(SIGUSR1);
    }());
  }

  TEST_CASE("removing restores the previous disposition and signal mask") {
    struct sigaction mine{}, before{};
    mine.sa_handler = &foreign_handler;
    sigemptyset(&mine.sa_mask);
    mine.sa_flags = SA_RESTART;
    REQUIRE(sigaction(SIGUSR2, &mine, &before) == 0);
    foreign_handler_calls = 0;

    SUBCASE("signal unblocked before") {
      REQUIRE_FALSE(blocked_here(SIGUSR2));
      testing::run_bounded([]() -> coroutine<void> {
        event_loop& loop = event_loop::current();
        int calls = 0;
        loop.add_signal_handler(SIGUSR2, [&] { ++calls; });
        std::raise(SIGUSR2);
        co_await testing::wait_until([&] { return calls > 0; });
        CHECK(calls == 1);
        CHECK(foreign_handler_calls == 0);
        CHECK(loop.remove_signal_handler(SIGUSR2));
        struct sigaction now{};
        sigaction(SIGUSR2, nullptr, &now);
        CHECK((now.sa_handler == &foreign_handler));
        CHECK((now.sa_flags & SA_RESTART) != 0);
        CHECK_FALSE(blocked_here(SIGUSR2));
        std::raise(SIGUSR2);  // the old handler again, not ours
        CHECK(foreign_handler_calls == 1);
        co_await sleep(2ms);
        CHECK(calls == 1);
      }());
    }
    SUBCASE("signal blocked before stays blocked") {
      sigset_t one;
      sigemptyset(&one);
      sigaddset(&one, SIGUSR2);
      pthread_sigmask(SIG_BLOCK, &one, nullptr);
      testing::run_bounded([]() -> coroutine<void> {
        event_loop& loop = event_loop::current();
        loop.add_signal_handler(SIGUSR2, [] {});
        co_await sleep(0ms);
        CHECK(loop.remove_signal_handler(SIGUSR2));
        CHECK(blocked_here(SIGUSR2));
      }());
      pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
    }
    SUBCASE("closing the loop restores too") {
      testing::run_bounded([]() -> coroutine<void> {
        event_loop::current().add_signal_handler(SIGUSR2, [] {});
        co_return;
      }());
      struct sigaction now{};
      sigaction(SIGUSR2, nullptr, &now);
      CHECK((now.sa_handler == &foreign_handler));
      CHECK_FALSE(blocked_here(SIGUSR2));
    }
    sigaction(SIGUSR2, &before, nullptr);
  }

  TEST_CASE("arrivals not yet delivered are dropped by remove, not sent to the old disposition") {
    // SIGUSR1's default action would end the test run.
    testing::run_bounded([]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      int calls = 0;
      loop.add_signal_handler(SIGUSR1, [&] { ++calls; });
      std::raise(SIGUSR1);
      CHECK(loop.remove_signal_handler(SIGUSR1));
      co_await sleep(2ms);
      CHECK(calls == 0);
    }());
  }

#ifdef ASYNC_UTILS_SIGNALS_SIGNALFD
  TEST_CASE("a forward still on its way while the handler is removed never reaches the old disposition") {
    // A process-directed signal runs the forwarding handler on a thread that does not block
    // it, which sends it on to the loop thread. Here such a handler is held in flight
    // (handlers_running) while the loop thread removes its handler, and forwards late: the
    // forward must be dropped with the handler, not delivered to the disposition restored
    // (found by a kill-while-removing stress written with the schedule fuzzer's op_signal;
    // SIG_DFL would end the process).
    struct sigaction counting{}, before{};
    counting.sa_handler = &foreign_handler;
    sigemptyset(&counting.sa_mask);
    sigaction(SIGUSR1, &counting, &before);
    foreign_handler_calls = 0;
    testing::run_bounded([]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      int calls = 0;
      loop.add_signal_handler(SIGUSR1, [&] { ++calls; });
      const pthread_t loop_thread = pthread_self();
      auto& g = detail::signal_state();
      g.handlers_running.fetch_add(1);  // a handler on another thread has read the target
      std::thread late([&g, loop_thread] {
        std::this_thread::sleep_for(20ms);  // the loop thread is inside remove_signal_handler
        ::pthread_kill(loop_thread, SIGUSR1);
        g.handlers_running.fetch_sub(1);
      });
      CHECK(loop.remove_signal_handler(SIGUSR1));
      late.join();
      co_await sleep(2ms);
      CHECK(calls == 0);
      CHECK(foreign_handler_calls == 0);
    }());
    sigaction(SIGUSR1, &before, nullptr);
  }
#endif

  TEST_CASE("invalid numbers, SIGKILL and SIGSTOP throw std::invalid_argument and change nothing") {
    testing::run_bounded([]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      for (int sig : {0, -1, detail::signal_limit, 1000, int(SIGKILL), int(SIGSTOP)}) {
        CHECK_THROWS_AS(loop.add_signal_handler(sig, [] {}), std::invalid_argument);
        CHECK_THROWS_AS(loop.remove_signal_handler(sig), std::invalid_argument);
      }
      CHECK_THROWS_AS(loop.add_signal_handler(SIGUSR1, {}), std::invalid_argument);
      CHECK_FALSE(loop.remove_signal_handler(SIGUSR1));
      struct sigaction now{};
      sigaction(SIGUSR1, nullptr, &now);
      CHECK((now.sa_handler == SIG_DFL));
      co_return;
    }());
  }

  TEST_CASE("a second add for the same signal replaces the handler") {
    testing::run_bounded([]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      int first = 0, second = 0;
      loop.add_signal_handler(SIGUSR1, [&] { ++first; });
      loop.add_signal_handler(SIGUSR1, [&] { ++second; });
      std::raise(SIGUSR1);
      co_await testing::wait_until([&] { return second > 0; });
      CHECK(first == 0);
      CHECK(second == 1);
      // A handler may remove itself while it runs.
      loop.add_signal_handler(SIGUSR1, [&] {
        ++first;
        loop.remove_signal_handler(SIGUSR1);
      });
      std::raise(SIGUSR1);
      co_await testing::wait_until([&] { return first > 0; });
      CHECK(first == 1);
      CHECK_FALSE(loop.remove_signal_handler(SIGUSR1));
    }());
  }

  TEST_CASE("two loops in two threads: one owner per signal, delivered to the owner's thread") {
    const int fds_before = testing::open_fds();
    const int threads_before = testing::threads();
    std::atomic<bool> owner_ready{false}, done{false};
    std::atomic<int> owner_calls{0};
    std::atomic<bool> owner_on_its_thread{false};
    std::thread owner([&] {
      testing::run_bounded([&]() -> coroutine<void> {
        event_loop& loop = event_loop::current();
        const auto me = std::this_thread::get_id();
        loop.add_signal_handler(SIGUSR1, [&, me] {
          owner_on_its_thread = std::this_thread::get_id() == me;
          ++owner_calls;
        });
        owner_ready = true;
        co_await testing::wait_until([&] { return done.load(); });
        loop.remove_signal_handler(SIGUSR1);
      }(), std::chrono::milliseconds(10000), false);
    });
    int mine = 0;
    bool mine_on_my_thread = false;
    testing::run_bounded([&]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      co_await testing::wait_until([&] { return owner_ready.load(); });
      REQUIRE(owner_ready);
      CHECK_THROWS_AS(loop.add_signal_handler(SIGUSR1, [] {}), std::runtime_error);
      const auto me = std::this_thread::get_id();
      loop.add_signal_handler(SIGUSR2, [&, me] {
        mine_on_my_thread = std::this_thread::get_id() == me;
        ++mine;
      });
      // Process-directed: the kernel picks any thread that does not block the signal.
      ::kill(::getpid(), SIGUSR1);
      ::kill(::getpid(), SIGUSR2);
      co_await testing::wait_until([&] { return mine > 0 && owner_calls > 0; });
      done = true;
    }(), std::chrono::milliseconds(10000), false);  // the counts include the other thread's loop
    done = true;
    owner.join();
    CHECK(testing::open_fds() <= fds_before);  // both loops gone: nothing left behind
    CHECK(testing::threads_after_join(threads_before) <= threads_before);
    CHECK(owner_calls == 1);
    CHECK(owner_on_its_thread);
    CHECK(mine == 1);
    CHECK(mine_on_my_thread);
    // Released by its owner, the signal can be taken by another loop.
    testing::run_bounded([]() -> coroutine<void> {
      event_loop::current().add_signal_handler(SIGUSR1, [] {});
      co_return;
    }());
  }

  TEST_CASE("a failing signal callback goes to the exception handler") {
    testing::run_bounded([]() -> coroutine<void> {
      event_loop& loop = event_loop::current();
      std::string seen;
      loop.set_exception_handler([&](event_loop&, const exception_context& c) { seen = describe(c.exception); });
      loop.add_signal_handler(SIGUSR1, [] { throw std::domain_error("from signal"); });
      std::raise(SIGUSR1);
      co_await testing::wait_until([&] { return !seen.empty(); });
      CHECK(seen.find("from signal") != std::string::npos);
      loop.set_exception_handler({});
    }());
  }
}
#endif
