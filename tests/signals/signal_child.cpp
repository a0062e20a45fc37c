// A real process for run.sh: handles SIGINT, SIGTERM and SIGHUP on its event loop, reports the
// thread each handler ran on, and exits 0 once all three have arrived.
// Usage: signal_child [main|thread]  ("thread": the loop runs in a second thread while the main
// thread waits in join, so a signal the kernel hands to the main thread must be re-routed).
#include "async_utils.hpp"

#include <cstdio>
#include <cstring>
#include <thread>
#include <unistd.h>

namespace au = codestare::async_utils;

namespace {

void say(const char* text) {
  std::printf("%s\n", text);
  std::fflush(stdout);
}

au::coroutine<int> serve() {
  au::event_loop& loop = au::event_loop::current();
  const auto loop_thread = std::this_thread::get_id();
  int seen = 0;
  auto handler = [&](const char* name) {
    return [&, name] {
      char line[96];
      const bool right = std::this_thread::get_id() == loop_thread;
      std::snprintf(line, sizeof line, "got %s on %s", name, right ? "loop thread" : "WRONG thread");
      say(line);
      ++seen;
    };
  };
  loop.add_signal_handler(SIGINT, handler("SIGINT"));
  loop.add_signal_handler(SIGTERM, handler("SIGTERM"));
  loop.add_signal_handler(SIGHUP, handler("SIGHUP"));
  char ready[64];
  std::snprintf(ready, sizeof ready, "ready %ld", static_cast<long>(::getpid()));
  say(ready);
  for (int i = 0; i < 20000 && seen < 3; ++i) co_await au::sleep(std::chrono::milliseconds(1));
  loop.remove_signal_handler(SIGINT);
  loop.remove_signal_handler(SIGTERM);
  loop.remove_signal_handler(SIGHUP);
  co_return seen == 3 ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  const bool in_thread = argc > 1 && std::strcmp(argv[1], "thread") == 0;
  int status = 1;
  if (in_thread) {
    std::thread loop_thread([&] { status = au::run(serve()); });
    loop_thread.join();
  } else {
    status = au::run(serve());
  }
  say(status == 0 ? "done" : "timed out waiting for signals");
  return status;
}
