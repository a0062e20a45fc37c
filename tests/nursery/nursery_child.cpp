// A real process for run.sh: two task_nurseries, each with an entered async context and
// long-running tasks, shut down by a signal from outside or by a failing child task.
// Usage: nursery_child run|forever|fail|burst
//   run      run(main()); main waits for its nurseries' sentinels, so a signal ends it cleanly
//   forever  the loop runs with run_forever(); shutdown's loop.stop() ends it
//   fail     a child task of nursery A throws; main awaits something else and is cancelled
//   burst    as run, with SIGINT ignored once the loop is closed (a burst outlives the loop)
// Prints markers (enter/exit per context, stopped per task, summary lines) for run.sh.
#include "async_utils.hpp"

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>
#include <unistd.h>

namespace au = codestare::async_utils;
using namespace std::chrono_literals;

namespace {

void say(const std::string& text) {
  std::printf("%s\n", text.c_str());
  std::fflush(stdout);
}

/// An entered context: prints its enter and exit.
struct marker {
  std::string name;
  au::coroutine<void> aenter() {
    say("enter " + name);
    co_return;
  }
  au::coroutine<bool> aexit(std::exception_ptr) {
    co_await au::sleep(1ms);  // an exit that awaits, as a real one would
    say("exit " + name);
    co_return false;
  }
};

au::coroutine<void> long_running(std::string name) {
  try {
    for (;;) co_await au::sleep(10ms);
  } catch (const au::cancelled_error&) {
    say("stopped " + name);
    throw;
  }
}

au::coroutine<void> explode() {
  co_await au::sleep(50ms);
  throw std::runtime_error("worker exploded");
}

/// Tasks pending on this loop besides the caller and the shutdown task.
std::size_t others_pending() {
  std::size_t n = 0;
  const auto me = au::current_task();
  for (auto& t : au::all_tasks())
    if (!(me && *me == t) && t.name().rfind("shutdown(", 0) != 0) ++n;
  return n;
}

au::coroutine<int> amain(bool fail) {
  au::task_nursery a("A"), b("B");
  marker ma{"A"}, mb{"B"};  // named first: g++ 12 and temporaries in co_await
  co_await a.enter_async_context(std::move(ma));
  co_await b.enter_async_context(std::move(mb));
  for (int i = 1; i <= 2; ++i) {
    a.create_task(long_running("A" + std::to_string(i)), "loop" + std::to_string(i));
    b.create_task(long_running("B" + std::to_string(i)), "loop" + std::to_string(i));
  }
  if (fail) a.create_task(explode(), "worker");
  au::any_task sa = a.sentinel_task(), sb = b.sentinel_task();
  say("ready " + std::to_string(::getpid()));
  if (fail) {
    co_await au::sleep(1h);  // cancelled by the shutdown
    co_return 1;
  }
  co_await au::wait_done(sa);
  co_await au::wait_done(sb);
  say("remaining " + std::to_string(others_pending()));
  say("main returned");
  co_return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "run";
  if (mode == "burst") std::signal(SIGINT, SIG_IGN);  // restored when the loop closes
  int status = 1;
  if (mode == "forever") {
    au::event_loop loop;
    auto main_task = loop.create_task(amain(false), "main");
    loop.run_forever();
    std::size_t left = 0;
    loop.for_each_task([&](au::detail::future_core&) { ++left; });
    say("after loop: pending " + std::to_string(left));
    status = main_task.done() && !main_task.cancelled() ? main_task.result() : 3;
    loop.close();
  } else {
    try {
      status = au::run(amain(mode == "fail"));
    } catch (const au::cancelled_error& e) {
      say(std::string("main cancelled: ") + e.what());
      status = mode == "fail" ? 0 : 4;
    }
  }
  say(status == 0 ? "done" : "status " + std::to_string(status));
  return status;
}
