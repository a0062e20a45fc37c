// Shutdown handling (codestare.async_utils.nursery): setup_shutdown_handling, handle_exception
// and shutdown. Ctrl+C (SIGINT), SIGTERM, SIGHUP or a failing nursery task closes every
// nursery gracefully, stops every other task, then stops the loop.
//
// With run(main()): shutdown stops the nurseries first (every entered context exits once),
// then cancels and awaits every other task — the main task included — and calls loop.stop()
// only once they are all done, so run() never sees "event loop stopped before the future
// completed". What run() then reports is how main ended:
//   - main waited for its nurseries (`co_await wait_done(nursery.sentinel_task())`, or the
//     end of `async_with(nursery, ...)` after such a wait): their sentinels end in the first
//     step, main returns normally and run() returns its result — the clean exit;
//   - main was awaiting something else: it is cancelled like every other task and run()
//     rethrows cancelled_error whose message names the reason ("shutdown: SIGINT"), as
//     asyncio.run raises CancelledError there; catch it around run() for a quiet exit.
// A shutdown runs once per loop: further signals and errors while it runs, or after it ended,
// start nothing (a burst of Ctrl+C shuts down once). A nursery created after a finished shutdown
// re-arms it. The signal handlers stay installed until the loop closes (close() removes them and
// restores the previous dispositions), so late signals are absorbed instead of killing the
// process half-way through its cleanup.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../platform/log.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/future_core.hpp"
#include "../runtime/any_task.hpp"
#include "../runtime/event_loop.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/wait_for.hpp"
#include "../runtime/run.hpp"
#include "../runtime/signals.hpp"
#include "../primitives/lock.hpp"
#include "task_nursery.hpp"

#if ASYNC_UTILS_DEFINITIONS
#include <algorithm>
#endif
#include <csignal>
#if ASYNC_UTILS_DEFINITIONS
#include <map>
#endif
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

ASYNC_UTILS_USER_TYPES_IN_FRAMES_BEGIN

namespace codestare::async_utils {
namespace detail {

/// The shutdown handling of one loop: installed once, found by the loop's address.
struct loop_shutdown {
  enum class phase { idle, running, done };
  event_loop* loop = nullptr;
  phase state = phase::idle;
  bool start_pending = false;     // a shutdown task was created and has not started yet
  bool installed = false;         // setup_shutdown_handling ran for this loop
  std::vector<int> signals;       // the signals whose handlers we installed
  std::vector<std::weak_ptr<nursery_state>> nurseries;

  std::vector<std::shared_ptr<nursery_state>> live_nurseries();
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::vector<std::shared_ptr<nursery_state>> loop_shutdown::live_nurseries() {
  std::vector<std::shared_ptr<nursery_state>> out;
  std::erase_if(nurseries, [](const std::weak_ptr<nursery_state>& w) { return w.expired(); });
  for (auto& w : nurseries)
    if (auto s = w.lock()) out.push_back(std::move(s));
  return out;
}
#endif  // ASYNC_UTILS_DEFINITIONS

// Defined only where the definitions are compiled: user TUs of the split mode need no <map>.
struct loop_shutdown_table;
ASYNC_UTILS_LINK loop_shutdown_table& shutdown_table();

#if ASYNC_UTILS_DEFINITIONS
struct loop_shutdown_table {
  std::mutex mutex;  // loops of several threads register here
  std::map<event_loop*, std::shared_ptr<loop_shutdown>> entries;
};

ASYNC_UTILS_LINK loop_shutdown_table& shutdown_table() {
  static loop_shutdown_table table;
  return table;
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// Removes the table entry when the last holder goes. The holders are the signal handlers and
/// the exception handler we install (gone when the loop closes or is destroyed) and the nurseries
/// of the loop: so a new loop that reuses the address of a dead one never finds its entry.
struct loop_shutdown_guard {
  std::shared_ptr<loop_shutdown> entry;
  explicit loop_shutdown_guard(std::shared_ptr<loop_shutdown> e) : entry(std::move(e)) {}
  loop_shutdown_guard(const loop_shutdown_guard&) = delete;
  loop_shutdown_guard& operator=(const loop_shutdown_guard&) = delete;
  ~loop_shutdown_guard();
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK loop_shutdown_guard::~loop_shutdown_guard() {
  auto& table = shutdown_table();
  std::lock_guard lock(table.mutex);
  auto it = table.entries.find(entry->loop);
  if (it != table.entries.end() && it->second == entry) table.entries.erase(it);
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// The entry of `loop` and the guard that keeps it listed (created when missing).
ASYNC_UTILS_LINK std::shared_ptr<loop_shutdown_guard> shutdown_guard_of(event_loop& loop);
/// The entry of `loop`, or null when it has no shutdown handling.
ASYNC_UTILS_LINK std::shared_ptr<loop_shutdown> find_shutdown(event_loop& loop);
ASYNC_UTILS_LINK std::string signal_name(int sig);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::shared_ptr<loop_shutdown_guard> shutdown_guard_of(event_loop& loop) {
  auto& table = shutdown_table();
  std::lock_guard lock(table.mutex);
  static std::map<loop_shutdown*, std::weak_ptr<loop_shutdown_guard>> guards_by_entry;  // under table.mutex
  std::erase_if(guards_by_entry, [](const auto& kv) { return kv.second.expired(); });
  auto& slot = table.entries[&loop];
  if (!slot) {
    slot = std::make_shared<loop_shutdown>();
    slot->loop = &loop;
  }
  auto& weak = guards_by_entry[slot.get()];
  if (auto guard = weak.lock()) return guard;
  auto guard = std::make_shared<loop_shutdown_guard>(slot);
  weak = guard;
  return guard;
}

ASYNC_UTILS_LINK std::shared_ptr<loop_shutdown> find_shutdown(event_loop& loop) {
  auto& table = shutdown_table();
  std::lock_guard lock(table.mutex);
  auto it = table.entries.find(&loop);
  return it == table.entries.end() ? nullptr : it->second;
}

ASYNC_UTILS_LINK std::string signal_name(int sig) {
  switch (sig) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    case SIGHUP: return "SIGHUP";
    default: return "signal " + std::to_string(sig);
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS


/// Creates the shutdown task unless a shutdown is pending, running or done.
ASYNC_UTILS_LINK void start_shutdown(event_loop& loop, std::string reason, std::optional<any_task> sentinel);
/// Stops the sentinels of `nurseries` together, then waits until each has shut down.
ASYNC_UTILS_LINK coroutine<void> stop_nurseries(std::vector<std::shared_ptr<nursery_state>> nurseries);
ASYNC_UTILS_LINK coroutine<void> run_shutdown(event_loop& loop, std::string reason, std::optional<any_task> sentinel, std::shared_ptr<loop_shutdown_guard> guard);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void start_shutdown(event_loop& loop, std::string reason, std::optional<any_task> sentinel) {
  if (loop.is_closed()) return;
  auto guard = shutdown_guard_of(loop);
  auto& entry = *guard->entry;
  if (entry.start_pending || entry.state != loop_shutdown::phase::idle) return;
  entry.start_pending = true;
  std::string name = "shutdown(" + reason + ")";
  try {
    loop.create_task(run_shutdown(loop, std::move(reason), std::move(sentinel), guard), std::move(name));
  } catch (...) {
    entry.start_pending = false;
    throw;
  }
}

ASYNC_UTILS_LINK coroutine<void> stop_nurseries(std::vector<std::shared_ptr<nursery_state>> nurseries) {
  for (auto& n : nurseries)
    if (n->sentinel && !n->sentinel.done() && !n->sentinel_woke) n->sentinel.cancel();
  for (auto& n : nurseries) {
    if (n->sentinel) co_await wait_done(n->sentinel);
    bool cancelled = false;
    co_await task_nursery::finish_close(n, cancelled);
    if (cancelled) throw cancelled_error("shutdown cancelled");
  }
}

ASYNC_UTILS_LINK coroutine<void> run_shutdown(event_loop& loop, std::string reason, std::optional<any_task> sentinel, std::shared_ptr<loop_shutdown_guard> guard) {
  if (!guard) guard = shutdown_guard_of(loop);  // keeps the entry listed while we run
  loop_shutdown* entry = guard->entry.get();
  entry->start_pending = false;
  if (entry->state != loop_shutdown::phase::idle) co_return;  // once per loop
  entry->state = loop_shutdown::phase::running;
  log(log_level::info, "Shutting down (" + reason + ")...");
  // 1. The failing nursery (found by its sentinel), or every nursery for a signal.
  auto all = entry->live_nurseries();
  std::vector<std::shared_ptr<nursery_state>> first, rest;
  for (auto& n : all) {
    const bool failing = sentinel && n->sentinel && n->sentinel == *sentinel;
    (sentinel && !failing ? rest : first).push_back(n);
  }
  if (sentinel && first.empty() && *sentinel && !sentinel->done()) co_await stop_task(*sentinel);
  co_await stop_nurseries(std::move(first));
  // 2. The other nurseries, so that their contexts exit before the tasks using them are cancelled.
  co_await stop_nurseries(std::move(rest));
  // Tasks that waited for the nurseries (main awaiting a sentinel, say) may now finish on
  // their own: let them, while that makes progress, rather than cancel them half-way.
  for (std::size_t before = 0, round = 0; round < 100; ++round) {
    std::size_t now = 0;
    loop.for_each_task([&](future_core&) { ++now; });
    if (round > 0 && now >= before) break;
    before = now;
    co_await sleep(std::chrono::seconds(0));
  }
  // 3. Every other task (main included), cancelled and awaited, until none is left.
  const auto me = current_task();
  for (;;) {
    std::vector<any_task> others;
    loop.for_each_task([&](future_core& core) {
      any_task t(&core);
      if (!(me && *me == t)) others.push_back(std::move(t));
    });
    if (others.empty()) break;
    log(log_level::info, "Cancelling " + std::to_string(others.size()) + " outstanding task(s)");
    for (auto& t : others) t.cancel("shutdown: " + reason);
    for (auto& t : others) co_await wait_done(t);
  }
  entry->state = loop_shutdown::phase::done;
  loop.stop();
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace detail

/// codestare's handle_exception: the default handler logs the context, then a shutdown starts
/// (as a task named "shutdown(<message>)"; once per loop). Installed by setup_shutdown_handling
/// on loops that have no exception handler.
ASYNC_UTILS_LINK void handle_exception(event_loop& loop, const exception_context& context);
/// codestare's shutdown(loop, signal=...): stops every nursery of the loop (their sentinels),
/// then every other task but the current one, then the loop. Does nothing when a shutdown of
/// the loop already runs or ran.
ASYNC_UTILS_LINK coroutine<void> shutdown(event_loop& loop, int signal);
/// codestare's shutdown(loop, context=...): stops the nursery whose sentinel is
/// context.sentinel (every nursery when there is none), then the other nurseries and every
/// other task, then the loop.
ASYNC_UTILS_LINK coroutine<void> shutdown(event_loop& loop, exception_context context);
/// codestare's setup_shutdown_handling: SIGHUP, SIGTERM and SIGINT start shutdown(loop, signal);
/// handle_exception becomes the exception handler if the loop has none. A signal that another
/// loop of the process already handles is skipped with a warning.
ASYNC_UTILS_LINK void setup_shutdown_handling(event_loop& loop);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void handle_exception(event_loop& loop, const exception_context& context) {
  loop.default_exception_handler(context);
  if (loop.is_closed()) return;
  detail::start_shutdown(loop, context.message.empty() ? std::string("exception") : context.message, context.sentinel);
}

ASYNC_UTILS_LINK coroutine<void> shutdown(event_loop& loop, int signal) {
  return detail::run_shutdown(loop, detail::signal_name(signal), std::nullopt, nullptr);
}
ASYNC_UTILS_LINK coroutine<void> shutdown(event_loop& loop, exception_context context) {
  return detail::run_shutdown(loop, context.message.empty() ? std::string("exception") : context.message, context.sentinel, nullptr);
}

ASYNC_UTILS_LINK void setup_shutdown_handling(event_loop& loop) {
  loop.check_open();
  auto guard = detail::shutdown_guard_of(loop);
  auto& entry = *guard->entry;
  for (int sig : {SIGHUP, SIGTERM, SIGINT}) {
    try {
      loop.add_signal_handler(sig, [&loop, sig, guard] { detail::start_shutdown(loop, detail::signal_name(sig), std::nullopt); });
      if (std::find(entry.signals.begin(), entry.signals.end(), sig) == entry.signals.end()) entry.signals.push_back(sig);
    } catch (const std::runtime_error& e) {
      log(log_level::warning, "shutdown handling: " + detail::signal_name(sig) + " is not handled on this loop: " + e.what());
    }
  }
  if (!loop.get_exception_handler())
    loop.set_exception_handler([guard](event_loop& l, const exception_context& context) { handle_exception(l, context); });
  entry.installed = true;
}

ASYNC_UTILS_LINK void task_nursery::add_shutdown_handling(event_loop& loop) {
  auto entry = detail::find_shutdown(loop);
  if (entry && entry->installed) return;
  setup_shutdown_handling(loop);
}

ASYNC_UTILS_LINK void detail::attach_nursery(event_loop& loop, const std::shared_ptr<nursery_state>& state) {
  task_nursery::add_shutdown_handling(loop);
  auto guard = shutdown_guard_of(loop);
  auto& entry = *guard->entry;
  if (entry.state == loop_shutdown::phase::done) entry.state = loop_shutdown::phase::idle;  // re-armed
  entry.live_nurseries();  // prunes
  entry.nurseries.push_back(state);
  state->shutdown_guard = std::move(guard);
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils

ASYNC_UTILS_USER_TYPES_IN_FRAMES_END

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("shutdown") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  /// Journals its exits (each context must exit exactly once).
  struct shutdown_probe {
    std::vector<std::string>* journal;
    std::string name;
    coroutine<void> aenter() { co_return; }
    coroutine<bool> aexit(std::exception_ptr) {
      co_await sleep(0s);
      journal->push_back("exit " + name);
      co_return false;
    }
  };
  inline coroutine<void> shutdown_sleeper(std::vector<std::string>* journal, std::string name) {
    try {
      co_await sleep(1h);
    } catch (const cancelled_error&) {
      journal->push_back("cancelled " + name);
      throw;
    }
  }
  inline coroutine<void> shutdown_fails() {
    co_await sleep(1ms);
    throw std::runtime_error("child failed");
  }
  inline std::size_t pending_tasks(event_loop& loop) {
    std::size_t n = 0;
    loop.for_each_task([&](detail::future_core&) { ++n; });
    return n;
  }
  inline std::size_t count(const std::vector<std::string>& v, const std::string& x) { return static_cast<std::size_t>(std::count(v.begin(), v.end(), x)); }
  inline std::size_t occurrences(const std::string& text, const std::string& x) {
    std::size_t n = 0;
    for (auto at = text.find(x); at != std::string::npos; at = text.find(x, at + 1)) ++n;
    return n;
  }
  /// Two nurseries, each with an entered context and a long-running child.
  inline coroutine<void> two_nurseries(std::vector<std::string>* journal, task_nursery& a, task_nursery& b) {
    shutdown_probe pa{journal, a.name()}, pb{journal, b.name()};  // named first (g++ 12 and co_await)
    co_await a.enter_async_context(std::move(pa));
    co_await b.enter_async_context(std::move(pb));
    a.create_task(shutdown_sleeper(journal, "child of " + a.name()), "child");
    b.create_task(shutdown_sleeper(journal, "child of " + b.name()), "child");
    co_await sleep(0s);
  }
  inline bool handles_sigint(event_loop& loop) {
    auto entry = detail::find_shutdown(loop);
    return entry && std::find(entry->signals.begin(), entry->signals.end(), SIGINT) != entry->signals.end();
  }

  TEST_CASE("installed once per loop, removed when the loop closes, never found by a later loop") {
    struct sigaction before {};
    sigaction(SIGINT, nullptr, &before);
    std::optional<event_loop> loop;
    for (int round = 0; round < 2; ++round) {
      loop.emplace();  // the same address each round
      CHECK(detail::find_shutdown(*loop) == nullptr);
      CHECK_FALSE(loop->get_exception_handler());
      loop->run_until_complete([](event_loop& l) -> coroutine<void> {
        task_nursery n("first", l);
        auto entry = detail::find_shutdown(l);
        REQUIRE(entry);
        CHECK(entry->installed);
        CHECK(entry->signals.size() == 3);
        CHECK(static_cast<bool>(l.get_exception_handler()));
        task_nursery m("second", l);
        CHECK(detail::find_shutdown(l) == entry);  // once
        co_await n.aclose();
        co_await m.aclose();
      }(*loop));
      loop->close();
      loop.reset();
      CHECK(detail::shutdown_table().entries.empty());
    }
    struct sigaction after {};
    sigaction(SIGINT, nullptr, &after);
    CHECK((after.sa_handler == before.sa_handler));
    // A loop with its own exception handler keeps it.
    event_loop own;
    bool called = false;
    own.set_exception_handler([&](event_loop&, const exception_context&) { called = true; });
    own.run_until_complete([](event_loop& l) -> coroutine<void> {
      task_nursery n("kept", l);
      l.call_exception_handler({"ping", nullptr, std::nullopt, std::nullopt});
      co_await n.aclose();
    }(own));
    CHECK(called);
  }

  TEST_CASE("a failing child shuts every nursery down gracefully, then stops the loop") {
    testing::log_capture log;
    std::vector<std::string> journal;
    event_loop loop;
    bool timed_out = false;
    auto guard = loop.call_later(10s, [&] {
      timed_out = true;
      loop.stop();
    });
    auto main = loop.create_task([](std::vector<std::string>* journal) -> coroutine<void> {
      task_nursery a("A"), b("B");
      co_await two_nurseries(journal, a, b);
      a.create_task(shutdown_fails(), "failing");
      co_await sleep(1h);
    }(&journal), "main");
    loop.run_forever();
    CHECK_FALSE(timed_out);
    INFO(log.text());
    CHECK(count(journal, "exit A") == 1);
    CHECK(count(journal, "exit B") == 1);
    CHECK(count(journal, "cancelled child of A") == 1);
    CHECK(count(journal, "cancelled child of B") == 1);
    // A shuts down first, completely, then B.
    CHECK(std::find(journal.begin(), journal.end(), "exit A") < std::find(journal.begin(), journal.end(), "cancelled child of B"));
    CHECK(main.cancelled());
    CHECK(pending_tasks(loop) == 0);
    CHECK(log.text().find("(task failing:A): child failed") != std::string::npos);
    CHECK(occurrences(log.text(), "Shutting down") == 1);
    guard.cancel();
    loop.close();
  }

  TEST_CASE("a shutdown runs once however often it is asked for") {
    testing::log_capture log;
    std::vector<std::string> journal;
    event_loop loop;
    auto guard = loop.call_later(10s, [&] { loop.stop(); });
    loop.create_task([](std::vector<std::string>* journal) -> coroutine<void> {
      event_loop& l = event_loop::current();
      task_nursery a("once-a"), b("once-b");
      co_await two_nurseries(journal, a, b);
      for (int i = 0; i < 100; ++i) handle_exception(l, {"boom " + std::to_string(i), nullptr, std::nullopt, a.sentinel_task()});
      auto again = create_task(shutdown(l, SIGTERM));
      co_await sleep(1h);
    }(&journal));
    loop.run_forever();
    INFO(log.text());
    CHECK(count(journal, "exit once-a") == 1);
    CHECK(count(journal, "exit once-b") == 1);
    CHECK(occurrences(log.text(), "Shutting down") == 1);
    CHECK(pending_tasks(loop) == 0);
    guard.cancel();
    loop.close();
  }

  TEST_CASE("raise(SIGINT) x1000 with nurseries: a graceful shutdown, once; run() returns") {
    testing::log_capture log;
    static std::vector<std::string> journal;
    journal.clear();
    auto main = []() -> coroutine<int> {
      task_nursery a("int-a"), b("int-b");
      co_await two_nurseries(&journal, a, b);
      if (!handles_sigint(event_loop::current())) co_return -1;  // never raise unhandled
      any_task sa = a.sentinel_task(), sb = b.sentinel_task();  // they become empty
      for (int i = 0; i < 1000; ++i) std::raise(SIGINT);
      co_await wait_done(sa);  // main waits for its nurseries: the clean exit
      co_await wait_done(sb);
      journal.push_back("main returns");
      co_return 7;
    };
    CHECK(run(wait_for(main(), 10s)) == 7);
    INFO(log.text());
    CHECK(count(journal, "exit int-a") == 1);
    CHECK(count(journal, "exit int-b") == 1);
    CHECK(count(journal, "cancelled child of int-a") == 1);
    CHECK(count(journal, "cancelled child of int-b") == 1);
    CHECK(journal.back() == "main returns");
    CHECK(occurrences(log.text(), "Shutting down (SIGINT)") == 1);
  }

  TEST_CASE("SIGINT while main awaits something else: run() rethrows cancelled_error") {
    testing::log_capture log;
    static std::vector<std::string> journal;
    journal.clear();
    auto main = []() -> coroutine<void> {
      task_nursery a("busy-a"), b("busy-b");
      co_await two_nurseries(&journal, a, b);
      if (!handles_sigint(event_loop::current())) co_return;
      std::raise(SIGINT);
      co_await sleep(1h);
    };
    try {
      run(main());
      FAIL("no exception");
    } catch (const cancelled_error& e) {
      CHECK(std::string(e.what()) == "shutdown: SIGINT");
    }
    CHECK(count(journal, "exit busy-a") == 1);
    CHECK(count(journal, "exit busy-b") == 1);
  }
}
#endif
