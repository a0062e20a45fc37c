// Shared by the C++ benchmark programs (ours and Boost.Asio): a clock, a counting global
// operator new, resident-set readings, the fixed pseudo-random delays of W6, and the one-line
// JSON result the driver (run_bench.py) reads. Include it in exactly one translation unit per
// program: it defines the replaced global allocation functions.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <unistd.h>
#include <vector>

namespace bench {

using clock = std::chrono::steady_clock;

inline std::atomic<bool> counting{false};
inline std::atomic<unsigned long long> allocations{0};
inline std::atomic<unsigned long long> allocated_bytes{0};

/// Counts heap allocations while alive: wrap exactly the measured section in one.
struct alloc_scope {
  unsigned long long start_allocs, start_bytes;
  alloc_scope() : start_allocs(allocations.load()), start_bytes(allocated_bytes.load()) { counting.store(true); }
  ~alloc_scope() { counting.store(false); }
  unsigned long long allocs() const { return allocations.load() - start_allocs; }
  unsigned long long bytes() const { return allocated_bytes.load() - start_bytes; }
};

/// Resident bytes of this process (/proc/self/statm, second field).
inline long resident_bytes() {
  long size = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &size, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return resident * ::sysconf(_SC_PAGESIZE);
}

/// W6 delays in microseconds, 0..50,000: the same 32-bit LCG in every language
/// (x = x * 1664525 + 1013904223 mod 2^32, seed 42; delay = (x >> 8) % 50001).
inline std::vector<long> timer_delays_us(long n) {
  std::vector<long> out;
  out.reserve(static_cast<std::size_t>(n));
  std::uint32_t x = 42;
  for (long i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    out.push_back(static_cast<long>((x >> 8) % 50001u));
  }
  return out;
}

inline double ns_between(clock::time_point a, clock::time_point b) {
  return std::chrono::duration<double, std::nano>(b - a).count();
}

/// The line the driver parses. allocs < 0: not counted.
inline void report(const char* workload, const char* impl, long n, double per_op_ns, double allocs_per_op,
                   const std::string& extra = "{}", const std::string& note = "") {
  std::printf("{\"workload\":\"%s\",\"impl\":\"%s\",\"n\":%ld,\"per_op_ns\":%.3f,\"allocs_per_op\":%s,\"extra\":%s,\"note\":\"%s\"}\n",
              workload, impl, n, per_op_ns, allocs_per_op < 0 ? "null" : std::to_string(allocs_per_op).c_str(), extra.c_str(),
              note.c_str());
  std::fflush(stdout);
}

}  // namespace bench

void* operator new(std::size_t n) {
  if (bench::counting.load(std::memory_order_relaxed)) {
    bench::allocations.fetch_add(1, std::memory_order_relaxed);
    bench::allocated_bytes.fetch_add(n, std::memory_order_relaxed);
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return ::operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
