// Helpers for the embedded tests only: bounded runs, descriptor and thread counts, log capture.
#pragma once

#include "../platform/config.hpp"
#include "../platform/log.hpp"

#ifdef ASYNC_UTILS_TESTS
#include <dirent.h>
#include <chrono>
#include <cstddef>
#include <new>
#if ASYNC_UTILS_DEFINITIONS
#include <sstream>
#endif
#include <string>
#include <thread>

namespace codestare::async_utils {
template <class T>
class coroutine;
}
namespace codestare::async_utils::testing {

/// Entries in a /proc/self directory (descriptors, threads), -1 where /proc is missing.
inline int count_entries(const char* path, int own = 0) {
  DIR* dir = ::opendir(path);
  if (!dir) return -1;
  int n = 0;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n - own;  // `own`: entries the listing itself adds (opendir's descriptor)
}
inline int open_fds() { return count_entries("/proc/self/fd", 1); }
inline int threads() { return count_entries("/proc/self/task"); }
/// threads() once joined threads are gone: the kernel wakes a joiner before it removes the
/// thread from /proc/self/task, so this waits up to a second for the count to drop to `at_most`.
inline int threads_after_join(int at_most) {
  int n = threads();
  for (int i = 0; i < 1000 && n > at_most; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    n = threads();
  }
  return n;
}

/// run(body) under wait_for(limit), so a bug fails a test instead of hanging the suite.
/// Declared here for the tests of every later part; defined in run.hpp, after run().
/// check_leaks=false for runs that overlap another thread's loop (the counts are per process).
void run_bounded(coroutine<void> body, std::chrono::milliseconds limit = std::chrono::milliseconds(10000), bool check_leaks = true);
/// The children of the combinator tests: `v` after `d`, or runtime_error(what) after `d`.
coroutine<int> after(std::chrono::milliseconds d, int v);
coroutine<int> fail_after(std::chrono::milliseconds d, std::string what);

/// Captures the library log for the lifetime of the object.
class log_capture {
 public:
  log_capture() {
    previous_ = set_log_handler([this](log_level, std::string_view message) {
      text_ += std::string(message);
      text_ += '\n';
    });
  }
  ~log_capture() { set_log_handler(std::move(previous_)); }
  const std::string& text() const { return text_; }

 private:
  std::string text_;
  log_handler previous_;
};

/// Allocations made by this thread while counting_allocations is set; counted by the global
/// operator new that the ASYNC_UTILS_TESTS_MAIN translation unit defines (async_generator.hpp;
/// weakly, so a program's own replacement wins; not under the sanitizers, which bring their own).
inline thread_local bool counting_allocations = false;
inline thread_local std::size_t allocations_counted = 0;
/// Whether allocations are counted in this build (a probe: one direct operator new).
inline bool allocations_are_counted() {
  const std::size_t before = allocations_counted;
  const bool was = counting_allocations;
  counting_allocations = true;
  ::operator delete(::operator new(8));  // a direct call: the compiler may not elide it
  counting_allocations = was;
  const bool counts = allocations_counted != before;
  allocations_counted = before;
  return counts;
}

}  // namespace codestare::async_utils::testing
#endif
