// Recycles coroutine frames and task states: a per-thread free list per 16-byte size class,
// so a spawn loop in steady state asks the system for no memory at all.
#pragma once

#include "../platform/config.hpp"

#include <cstddef>
#include <new>

// Under AddressSanitizer every frame goes to and from the system, so that a use of a freed
// frame is reported instead of landing in a recycled block.
#ifndef ASYNC_UTILS_NO_FRAME_CACHE
#if defined(__SANITIZE_ADDRESS__)
#define ASYNC_UTILS_NO_FRAME_CACHE
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ASYNC_UTILS_NO_FRAME_CACHE
#endif
#endif
#endif

namespace codestare::async_utils::detail {

/// Blocks up to max_cached_size bytes, in classes of frame_granule; each class keeps at most
/// max_cached_per_class blocks (about 1 MiB in all per thread at worst). Larger blocks and the
/// overflow go to the system. ASYNC_UTILS_NO_FRAME_CACHE turns recycling off (AddressSanitizer
/// builds turn it off by themselves).
inline constexpr std::size_t frame_granule = __STDCPP_DEFAULT_NEW_ALIGNMENT__;
inline constexpr std::size_t max_cached_size = 1024;
inline constexpr std::size_t frame_classes = max_cached_size / frame_granule;
inline constexpr unsigned max_cached_per_class = 256;

struct free_block {
  free_block* next;
};

/// Trivially destructible, so it stays usable after the thread's reaper ran: blocks freed by
/// later thread_local or static destructors then go straight to the system.
struct frame_cache_state {
  free_block* heads[frame_classes];
  unsigned counts[frame_classes];
  bool reaper_armed;
  bool closed;
};
inline constinit thread_local frame_cache_state frame_cache_tls{};

/// Returns every cached block of this thread to the system (the cache stays usable).
inline void frame_cache_trim() noexcept {
  frame_cache_state& c = frame_cache_tls;
  for (std::size_t i = 0; i < frame_classes; ++i) {
    while (free_block* b = c.heads[i]) {
      c.heads[i] = b->next;
      ::operator delete(static_cast<void*>(b));
    }
    c.counts[i] = 0;
  }
}

struct frame_cache_reaper {
  ~frame_cache_reaper() {
    frame_cache_trim();
    frame_cache_tls.closed = true;
  }
};

inline std::size_t frame_class_of(std::size_t n) noexcept { return (n + frame_granule - 1) / frame_granule - 1; }

inline void* cached_allocate(std::size_t n) {
#ifndef ASYNC_UTILS_NO_FRAME_CACHE
  if (n - 1 < max_cached_size) {
    frame_cache_state& c = frame_cache_tls;
    std::size_t k = frame_class_of(n);
    if (free_block* b = c.heads[k]) {
      c.heads[k] = b->next;
      --c.counts[k];
      return b;
    }
    return ::operator new((k + 1) * frame_granule);
  }
#endif
  return ::operator new(n);
}

inline void cached_free(void* p, std::size_t n) noexcept {
#ifndef ASYNC_UTILS_NO_FRAME_CACHE
  if (n - 1 < max_cached_size) {
    frame_cache_state& c = frame_cache_tls;
    std::size_t k = frame_class_of(n);
    if (!c.closed && c.counts[k] < max_cached_per_class) {
      if (!c.reaper_armed) {
        c.reaper_armed = true;
        thread_local frame_cache_reaper reaper;  // first use registers the thread-exit drain
        (void)reaper;
      }
      auto* b = ::new (p) free_block{c.heads[k]};
      c.heads[k] = b;
      ++c.counts[k];
      return;
    }
  }
#else
  (void)n;
#endif
  ::operator delete(p);
}

}  // namespace codestare::async_utils::detail

#ifdef ASYNC_UTILS_TESTS
#include <thread>
#include <vector>
TEST_SUITE("frame_cache") {
  TEST_CASE("a freed block is reused for the same size class, bounded per class, trimmed on demand") {
    using namespace codestare::async_utils::detail;
    frame_cache_trim();
    void* a = cached_allocate(100);
    cached_free(a, 100);
#ifndef ASYNC_UTILS_NO_FRAME_CACHE
    CHECK(cached_allocate(112) == a);  // same class as 100
    cached_free(a, 112);
    std::vector<void*> many;
    for (unsigned i = 0; i < max_cached_per_class + 10; ++i) many.push_back(cached_allocate(64));
    for (void* p : many) cached_free(p, 64);
    CHECK(frame_cache_tls.counts[frame_class_of(64)] == max_cached_per_class);
#endif
    void* big = cached_allocate(max_cached_size + 1);  // not cached: straight to the system
    cached_free(big, max_cached_size + 1);
    frame_cache_trim();
    CHECK(frame_cache_tls.counts[frame_class_of(64)] == 0);
  }
  TEST_CASE("blocks freed on a thread are drained when it exits") {
    using namespace codestare::async_utils::detail;
    std::thread([] {
      for (int i = 0; i < 10; ++i) cached_free(cached_allocate(48), 48);
    }).join();  // LeakSanitizer/valgrind would report the block if the exit drain failed
    CHECK(true);
  }
}
#endif
