// 4 threads hammer call_soon_threadsafe while the loop runs tasks of its own; some handles are
// cancelled from the posting thread. Every callback not cancelled runs exactly once, a
// cancelled one at most once, and the loop ends with no task and no descriptor left.
#include "stress_common.hpp"

#include <atomic>
#include <thread>
#include <vector>

using namespace codestare::async_utils;
using namespace std::chrono_literals;

int main(int argc, char** argv) {
  stress::fail_on_library_errors();
  constexpr int threads = 4;
  const long per_thread = stress::quick(argc, argv) ? 100000 : 1000000;
  const int fds_before = stress::open_fds();
  stress::stopwatch watch;
  // Loop-thread counters (only callbacks touch them); cancelled counts live with each poster.
  long ran_plain = 0, ran_cancelled = 0, loop_ticks = 0;
  long cancelled[threads] = {};

  run([&]() -> coroutine<void> {
    event_loop& loop = event_loop::current();
    auto all_posted = loop.create_future<void>();
    int threads_done = 0;
    std::vector<std::thread> posters;
    for (int t = 0; t < threads; ++t) {
      posters.emplace_back([&, t] {
        for (long i = 0; i < per_thread; ++i) {
          if (i % 16 == 0) {
            auto h = loop.call_soon_threadsafe([&] { ++ran_cancelled; });
            h.cancel();  // races with the loop: it runs at most once
            ++cancelled[t];
          } else {
            loop.call_soon_threadsafe([&] { ++ran_plain; });
          }
        }
        // One queue, FIFO: this runs after every callback this thread posted.
        loop.call_soon_threadsafe([&] {
          if (++threads_done == threads) all_posted.set_result();
        });
      });
    }
    // The loop keeps a task of its own going meanwhile.
    // (A parameter, not a capture: the lambda object is gone once create_task returns.)
    auto ticker = create_task([](long& ticks) -> coroutine<void> {
      for (;;) {
        // Alternately busy and asleep, so that posts also have to wake a sleeping loop.
        co_await sleep(++ticks % 2 ? 0us : 50us);
      }
    }(loop_ticks));
    co_await all_posted;
    for (auto& p : posters) p.join();
    ticker.cancel();
    co_await wait_done(ticker);
    STRESS_CHECK(all_tasks().size() == 1);
  }());

  long total_cancelled = 0;
  for (long c : cancelled) total_cancelled += c;
  STRESS_CHECK(ran_plain == threads * per_thread - total_cancelled);
  STRESS_CHECK(ran_cancelled <= total_cancelled);
  STRESS_CHECK(loop_ticks > 0);
  STRESS_CHECK(stress::open_fds() == fds_before);
  stress::report("call_soon_threadsafe: 4 threads",
                 std::to_string(threads * per_thread) + " posts (" + std::to_string(total_cancelled) + " cancelled, " +
                     std::to_string(ran_cancelled) + " of those ran first), " + std::to_string(loop_ticks) + " loop ticks",
                 watch);
  return 0;
}
