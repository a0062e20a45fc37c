// run_in_executor under load (built by `make stress` once src/runtime/executor.hpp exists):
// jobs on the default executor that themselves hammer call_soon_threadsafe, awaited by tasks of
// which some are cancelled mid-wait. Every job's result arrives exactly once, every posted
// callback runs, and run() ends with no extra thread and no task left.
#include "stress_common.hpp"

#include <thread>

#include <atomic>
#include <dirent.h>
#include <random>
#include <vector>

using namespace codestare::async_utils;
using namespace std::chrono_literals;

namespace {

int thread_count() {
  DIR* dir = ::opendir("/proc/self/task");
  if (!dir) return -1;
  int n = 0;
  while (dirent* e = ::readdir(dir))
    if (e->d_name[0] != '.') ++n;
  ::closedir(dir);
  return n;
}

constexpr long posts_per_job = 64;

coroutine<long> submit(long i, long& callbacks_run) {
  event_loop& loop = event_loop::current();
  co_return co_await loop.run_in_executor(
      [&loop, &callbacks_run](long x) {
        for (long p = 0; p < posts_per_job; ++p) loop.call_soon_threadsafe([&callbacks_run] { ++callbacks_run; });
        return x * 2;
      },
      i);
}

}  // namespace

int main(int argc, char** argv) {
  stress::fail_on_library_errors();
  const long jobs = stress::quick(argc, argv) ? 5000 : 50000;
  const int fds_before = stress::open_fds();
  // A sanitizer runtime (TSan) starts a helper thread of its own on the first thread creation:
  // create one first, so the count before includes it and compares only our threads.
  std::thread([] {}).join();
  const int threads_before = thread_count();
  stress::stopwatch watch;
  long callbacks_run = 0, completed = 0, cancelled = 0;

  run([&]() -> coroutine<void> {
    std::mt19937 rng(20240603);
    std::vector<task<long>> tasks;
    for (long i = 0; i < jobs; ++i) tasks.push_back(create_task(submit(i, callbacks_run)));
    co_await sleep(1ms);
    for (auto& t : tasks)
      if (rng() % 4 == 0) t.cancel();
    for (auto& t : tasks) co_await wait_done(t);
    for (long i = 0; i < jobs; ++i) {
      auto& t = tasks[static_cast<std::size_t>(i)];
      if (t.cancelled()) {
        ++cancelled;
      } else {
        STRESS_CHECK(t.result() == 2 * i);
        ++completed;
      }
    }
    STRESS_CHECK(all_tasks().size() == 1);
  }());  // run() shuts the executor down: every job has finished and posted by now

  STRESS_CHECK(completed + cancelled == jobs);
  STRESS_CHECK(completed > 0);
  STRESS_CHECK(callbacks_run <= jobs * posts_per_job);  // a job cancelled before it started posts nothing
  STRESS_CHECK(callbacks_run >= completed * posts_per_job);
  STRESS_CHECK(thread_count() == threads_before);
  STRESS_CHECK(stress::open_fds() == fds_before);
  stress::report("run_in_executor + threadsafe",
                 std::to_string(jobs) + " jobs (" + std::to_string(cancelled) + " awaits cancelled), " + std::to_string(callbacks_run) +
                     " cross-thread callbacks",
                 watch);
  return 0;
}
