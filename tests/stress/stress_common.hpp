// Shared by the stress programs: the quick switch, timing, peak RSS, checks that abort loudly.
#pragma once

// The committed single header (another one can be named, to try a program against a branch).
#ifndef ASYNC_UTILS_STRESS_HEADER
#define ASYNC_UTILS_STRESS_HEADER "../../async_utils.hpp"
#endif
#include ASYNC_UTILS_STRESS_HEADER

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <string>
#include <sys/resource.h>

namespace stress {

/// `prog --quick` runs the short CI version.
inline bool quick(int argc, char** argv) { return argc > 1 && std::strcmp(argv[1], "--quick") == 0; }

/// Aborts with a message: a stress program has no test framework, and must never pass silently.
#define STRESS_CHECK(cond)                                                                       \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);              \
      std::abort();                                                                              \
    }                                                                                            \
  } while (0)

inline double peak_rss_mib() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}

inline int open_fds() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (!dir) return -1;
  int n = 0;
  while (dirent* e = ::readdir(dir))
    if (e->d_name[0] != '.') ++n;
  ::closedir(dir);
  return n - 1;
}

/// Wall time since construction, printed with the figures of one scenario.
class stopwatch {
 public:
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

/// One line per scenario, the same shape everywhere (tests/stress/RESULTS.md collects them).
inline void report(const char* scenario, const std::string& counts, const stopwatch& watch) {
  std::printf("RESULT %-28s %s; %.2f s; peak RSS %.1f MiB\n", scenario, counts.c_str(), watch.seconds(), peak_rss_mib());
  std::fflush(stdout);
}

/// Fails the program on any library log line at warning level or above (internal errors such
/// as "woken twice", tasks destroyed while pending, unretrieved exceptions).
inline void fail_on_library_errors() {
  codestare::async_utils::set_log_handler([](codestare::async_utils::log_level level, std::string_view message) {
    std::fprintf(stderr, "async_utils log: %.*s\n", static_cast<int>(message.size()), message.data());
    if (level >= codestare::async_utils::log_level::warning) std::abort();
  });
}

}  // namespace stress
