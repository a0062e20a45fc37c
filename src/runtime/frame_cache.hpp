// Where coroutine frames and task states live: per-thread chunks carved into blocks of one
// 16-byte size class, and a bounded per-thread free list per class, so that a spawn loop asks
// the system for memory once per chunk, and in steady state not at all.
#pragma once

#include "../platform/config.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <new>
#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// Huge chunks: a class that has gone through every growth step (a thread that really spawns at
// scale) takes its next chunks as 2 MiB-aligned 2 MiB regions of their own, marked for transparent
// huge pages, so that the kernel maps each with one fault instead of 512 (a million new tasks spend
// most of their time on first touches of fresh pages otherwise, and more so in a virtual machine).
// The trade-off: up to 2 MiB of resident memory per heavily used size class while it has live
// blocks (a huge page is resident whole once touched). ASYNC_UTILS_NO_HUGE_PAGES keeps every chunk
// on the allocator, and the ready queue's buffers too (job_queue.hpp). Linux only; elsewhere, or
// when the mapping fails, chunks come from the allocator anyway.
#if !defined(ASYNC_UTILS_NO_HUGE_PAGES) && defined(__linux__) && defined(MADV_HUGEPAGE)
#define ASYNC_UTILS_HUGE_CHUNKS 1
#endif

namespace codestare::async_utils::detail {

/// Blocks up to max_cached_size bytes, in classes of frame_granule. A block is a 16-byte header
/// (its chunk and class) and the bytes asked for, rounded up to the class: nothing else, so a
/// lazy coroutine costs its frame and 16 bytes (in a huge chunk, no header: its frame only). Chunks hold about chunk_target_bytes of blocks
/// of one class; a chunk goes back to the system when its last block is given back to it.
/// A freed block first goes to the free list of its class on the freeing thread (at most
/// max_cached_per_class blocks), and to its chunk after that, or when the thread exits or an
/// event loop closes (frame_cache_trim). Larger blocks go to and from the system.
/// ASYNC_UTILS_NO_FRAME_CACHE turns all of it off (AddressSanitizer builds turn it off by themselves).
inline constexpr std::size_t frame_granule = __STDCPP_DEFAULT_NEW_ALIGNMENT__;
inline constexpr std::size_t max_cached_size = 1024;
inline constexpr std::size_t frame_classes = max_cached_size / frame_granule;
inline constexpr unsigned max_cached_per_class = 256;
inline constexpr std::size_t chunk_target_bytes = 8192;
inline constexpr std::size_t min_blocks_per_chunk = 8;
/// Each new chunk of a class is twice the size of the one before, up to 32 times the first
/// (256 KiB); frame_cache_trim starts over. Big chunks are paged in with one system call.
inline constexpr unsigned max_chunk_growth = 5;
inline constexpr std::size_t prefault_from_bytes = 64 * 1024;
/// After a chunk of every growth step, a class's next chunks are huge chunks (see
/// ASYNC_UTILS_NO_HUGE_PAGES above): huge_chunk_bytes each, aligned to their size. Their blocks
/// have no header: a process-wide bitmap (huge_chunk_map) tells whether an address lies in a huge
/// chunk, the chunk is then found by masking the address, and the class by the size the block
/// is freed with (every caller frees with the size it asked for).
inline constexpr std::size_t huge_chunk_bytes = std::size_t{2} << 20;
inline constexpr unsigned huge_chunk_shift = 21;
static_assert(huge_chunk_bytes == std::size_t{1} << huge_chunk_shift);
/// Huge chunks are used only below this address (all of a 47-bit user address space), so that
/// the bitmap has one bit per huge_chunk_bytes of it: 8 MiB of address space, mapped on first
/// use and paged in where a bit is set (one page per 64 GiB of addresses).
inline constexpr std::uintptr_t huge_chunk_limit = std::uintptr_t{1} << 47;

/// A chunk counts the blocks not given back to it: carved and in use, in some thread's free
/// list, or not carved yet by the thread that owns the chunk. Any thread may give a block back.
struct frame_chunk {
  std::atomic<std::size_t> live;
  std::size_t mapped_bytes;  // 0: from operator new; else a region of its own, unmapped when empty
};
inline constexpr std::size_t chunk_header_size = (sizeof(frame_chunk) + frame_granule - 1) / frame_granule * frame_granule;

struct alignas(frame_granule) block_header {
  frame_chunk* chunk;  // null: the block came from the system on its own
  std::size_t size_class;
};
static_assert(sizeof(block_header) == frame_granule);

struct free_block {
  free_block* next;
};

/// Trivially destructible, so it stays usable after the thread's reaper ran: blocks freed by
/// later thread_local or static destructors then go straight back to their chunks.
struct frame_cache_state {
  free_block* heads[frame_classes];
  unsigned counts[frame_classes];
  std::byte* carve[frame_classes];        // the next uncarved block of the class's current chunk
  std::size_t uncarved[frame_classes];    // blocks left in it
  frame_chunk* current[frame_classes];
  std::uint8_t growth[frame_classes];     // chunks made for the class so far, up to max_chunk_growth + 1
  bool huge[frame_classes];               // the current chunk is a huge one: blocks without a header
  bool reaper_armed;
  bool closed;
};
inline constinit thread_local frame_cache_state frame_cache_tls{};

#ifdef ASYNC_UTILS_TESTS
/// Chunks allocated and not yet returned to the system, all threads (tests read it).
inline std::atomic<long> frame_chunks_alive{0};
#endif

inline std::size_t frame_class_of(std::size_t n) noexcept { return (n + frame_granule - 1) / frame_granule - 1; }
/// What a block for `n` bytes takes out of its chunk, header included.
inline constexpr std::size_t cached_block_size(std::size_t n) noexcept {
  return frame_granule + (n + frame_granule - 1) / frame_granule * frame_granule;
}
/// Blocks in the first chunk of a class (later ones hold up to 2^max_chunk_growth times more).
inline constexpr std::size_t blocks_per_chunk(std::size_t size_class, unsigned growth = 0) noexcept {
  const std::size_t block = frame_granule * (size_class + 2);
  const std::size_t first = chunk_target_bytes / block > min_blocks_per_chunk ? chunk_target_bytes / block : min_blocks_per_chunk;
  return first << (growth < max_chunk_growth ? growth : max_chunk_growth);
}

#ifdef ASYNC_UTILS_HUGE_CHUNKS
/// One bit per huge_chunk_bytes below huge_chunk_limit, set while a huge chunk is there; null
/// until the first huge chunk of the process. Never unmapped (8 MiB of address space).
inline std::atomic<std::atomic<std::uint64_t>*> huge_chunk_map{nullptr};

/// The bitmap, mapped on first use; null if that fails (then there are no huge chunks).
inline std::atomic<std::uint64_t>* huge_chunk_map_now() noexcept {
  if (auto* map = huge_chunk_map.load(std::memory_order_acquire)) return map;
  const std::size_t bytes = (huge_chunk_limit >> huge_chunk_shift) / 8;
  void* raw = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  auto* fresh = static_cast<std::atomic<std::uint64_t>*>(raw);  // zero pages: all bits clear
  std::atomic<std::uint64_t>* expected = nullptr;
  if (huge_chunk_map.compare_exchange_strong(expected, fresh, std::memory_order_acq_rel)) return fresh;
  (void)::munmap(raw, bytes);  // another thread was first
  return expected;
}

inline void mark_huge_chunk(std::atomic<std::uint64_t>* map, void* chunk, bool on) noexcept {
  const std::uintptr_t i = reinterpret_cast<std::uintptr_t>(chunk) >> huge_chunk_shift;
  const std::uint64_t bit = std::uint64_t{1} << (i & 63);
  if (on) map[i >> 6].fetch_or(bit, std::memory_order_release);
  else map[i >> 6].fetch_and(~bit, std::memory_order_release);
}
#endif

/// The huge chunk that `p` lies in, or null when it has a block_header in front of it.
inline frame_chunk* huge_chunk_of([[maybe_unused]] const void* p) noexcept {
#ifdef ASYNC_UTILS_HUGE_CHUNKS
  const auto* map = huge_chunk_map.load(std::memory_order_acquire);
  const auto at = reinterpret_cast<std::uintptr_t>(p);
  if (!map || at >= huge_chunk_limit) return nullptr;
  const std::uintptr_t i = at >> huge_chunk_shift;
  if (!((map[i >> 6].load(std::memory_order_acquire) >> (i & 63)) & 1)) return nullptr;
  return reinterpret_cast<frame_chunk*>(at & ~(std::uintptr_t{huge_chunk_bytes} - 1));
#else
  return nullptr;
#endif
}

/// The chunk of a cached block.
inline frame_chunk* chunk_of_block(void* p) noexcept {
  if (frame_chunk* huge = huge_chunk_of(p)) return huge;
  return reinterpret_cast<block_header*>(static_cast<std::byte*>(p) - frame_granule)->chunk;
}

// The cold paths, out of line in the split build (declared only where the definitions are not
// compiled: g++ rejects `noinline` on an inline declaration).
#if !ASYNC_UTILS_DEFINITIONS
/// Frees `chunk`, whose last block came back.
void free_chunk(frame_chunk* chunk) noexcept;
/// Returns every block cached by this thread to its chunk, and the uncarved rest of this
/// thread's current chunks: chunks with nothing in use go back to the system (the cache stays
/// usable).
void frame_cache_trim() noexcept;
[[gnu::cold]] void arm_frame_cache_reaper_now(frame_cache_state& c);
void* allocate_uncached_block(std::size_t n);
/// A new chunk for class k; the class's previous chunk is fully carved by now.
void* carve_from_new_chunk(frame_cache_state& c, std::size_t k);
#ifdef ASYNC_UTILS_HUGE_CHUNKS
/// `bytes` (a multiple of huge_chunk_bytes) of fresh memory aligned to huge_chunk_bytes and
/// marked for transparent huge pages, or null. Given back with munmap.
void* map_huge_region(std::size_t bytes) noexcept;
#endif
#endif

#if ASYNC_UTILS_DEFINITIONS
[[gnu::noinline]] ASYNC_UTILS_LINK void free_chunk(frame_chunk* chunk) noexcept {
  const std::size_t mapped = chunk->mapped_bytes;
  chunk->~frame_chunk();
#ifdef ASYNC_UTILS_HUGE_CHUNKS
  if (mapped) {
    // The bit goes first: once unmapped, the addresses may come back from anywhere.
    mark_huge_chunk(huge_chunk_map.load(std::memory_order_acquire), chunk, false);
    ::munmap(static_cast<void*>(chunk), mapped);
  } else
#endif
    ::operator delete(static_cast<void*>(chunk));
  (void)mapped;
#ifdef ASYNC_UTILS_TESTS
  frame_chunks_alive.fetch_sub(1, std::memory_order_relaxed);
#endif
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// Gives `count` blocks back to `chunk`; the last one frees it.
inline void release_to_chunk(frame_chunk* chunk, std::size_t count) noexcept {
  if (chunk->live.fetch_sub(count, std::memory_order_acq_rel) == count) free_chunk(chunk);
}

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void frame_cache_trim() noexcept {
  frame_cache_state& c = frame_cache_tls;
  for (std::size_t k = 0; k < frame_classes; ++k) {
    while (free_block* b = c.heads[k]) {
      c.heads[k] = b->next;
      release_to_chunk(chunk_of_block(b), 1);
    }
    c.counts[k] = 0;
    c.growth[k] = 0;
    if (frame_chunk* chunk = c.current[k]) {
      const std::size_t left = c.uncarved[k];
      c.current[k] = nullptr;
      c.carve[k] = nullptr;
      c.uncarved[k] = 0;
      c.huge[k] = false;
      if (left) release_to_chunk(chunk, left);
    }
  }
}

struct frame_cache_reaper {
  ~frame_cache_reaper() {
    frame_cache_trim();
    frame_cache_tls.closed = true;
  }
};

[[gnu::noinline, gnu::cold]] ASYNC_UTILS_LINK void arm_frame_cache_reaper_now(frame_cache_state& c) {
  c.reaper_armed = true;
  thread_local frame_cache_reaper reaper;  // first use registers the thread-exit drain
  (void)reaper;
}
[[gnu::noinline]] ASYNC_UTILS_LINK void* allocate_uncached_block(std::size_t n) {
  auto* header = ::new (::operator new(frame_granule + n)) block_header{nullptr, 0};
  return reinterpret_cast<std::byte*>(header) + frame_granule;
}

#ifdef ASYNC_UTILS_HUGE_CHUNKS
ASYNC_UTILS_LINK void* map_huge_region(std::size_t bytes) noexcept {
  // huge_chunk_bytes more, then the unaligned ends cut off: the kernel aligns nothing by itself.
  const std::size_t span = bytes + huge_chunk_bytes;
  void* raw = ::mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto at = reinterpret_cast<std::uintptr_t>(raw);
  const auto begin = (at + huge_chunk_bytes - 1) & ~(std::uintptr_t{huge_chunk_bytes} - 1);
  if (begin > at) (void)::munmap(raw, begin - at);
  if (const std::size_t tail = at + span - (begin + bytes)) (void)::munmap(reinterpret_cast<void*>(begin + bytes), tail);
  (void)::madvise(reinterpret_cast<void*>(begin), bytes, MADV_HUGEPAGE);  // best effort
  return reinterpret_cast<void*>(begin);
}
#endif

#endif  // ASYNC_UTILS_DEFINITIONS

inline void arm_frame_cache_reaper(frame_cache_state& c) {
  if (!c.reaper_armed) arm_frame_cache_reaper_now(c);
}

#if ASYNC_UTILS_DEFINITIONS
/// Makes `raw` the current chunk of class k, with `count` blocks `stride` bytes apart (mapped:
/// its mapping's size, 0 for operator new), and returns its first block, already taken.
inline std::byte* start_chunk(frame_cache_state& c, std::size_t k, void* raw, std::size_t count, std::size_t stride,
                              std::size_t mapped) noexcept {
  auto* chunk = ::new (raw) frame_chunk{count, mapped};
#ifdef ASYNC_UTILS_TESTS
  frame_chunks_alive.fetch_add(1, std::memory_order_relaxed);
#endif
  std::byte* first = static_cast<std::byte*>(raw) + chunk_header_size;
  c.current[k] = chunk;
  c.carve[k] = first + stride;
  c.uncarved[k] = count - 1;
  c.huge[k] = mapped != 0;
  return first;
}

[[gnu::noinline]] ASYNC_UTILS_LINK void* carve_from_new_chunk(frame_cache_state& c, std::size_t k) {
  if (c.closed) return allocate_uncached_block((k + 1) * frame_granule);  // no reaper left to retire a chunk
  arm_frame_cache_reaper(c);
  const std::size_t block = frame_granule * (k + 2);
#ifdef ASYNC_UTILS_HUGE_CHUNKS
  if (c.growth[k] > max_chunk_growth) {
    if (auto* map = huge_chunk_map_now()) {
      void* raw = map_huge_region(huge_chunk_bytes);
      if (raw && reinterpret_cast<std::uintptr_t>(raw) >= huge_chunk_limit) {
        (void)::munmap(raw, huge_chunk_bytes);
        raw = nullptr;
      }
      if (raw) {
        const std::size_t stride = block - frame_granule;  // no header
        const std::size_t count = (huge_chunk_bytes - chunk_header_size) / stride;
        mark_huge_chunk(map, raw, true);
        return start_chunk(c, k, raw, count, stride, huge_chunk_bytes);
      }
    }
  }
#endif
  const std::size_t count = blocks_per_chunk(k, c.growth[k]);
  if (c.growth[k] <= max_chunk_growth) ++c.growth[k];
  const std::size_t bytes = chunk_header_size + count * block;
  void* raw = ::operator new(bytes);
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  // A burst of spawns: page the chunk in at once rather than one fault per page (which is most
  // of the cost of a million new tasks, and more so in a virtual machine). Best effort.
  if (bytes >= prefault_from_bytes) {
    const auto page = static_cast<std::uintptr_t>(4096);
    const auto begin = (reinterpret_cast<std::uintptr_t>(raw) + page - 1) & ~(page - 1);
    const auto end = (reinterpret_cast<std::uintptr_t>(raw) + bytes) & ~(page - 1);
    if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
  }
#endif
  std::byte* first = start_chunk(c, k, raw, count, block, 0);
  ::new (static_cast<void*>(first)) block_header{c.current[k], k};
  return first + frame_granule;
}
#endif  // ASYNC_UTILS_DEFINITIONS

inline void* cached_allocate(std::size_t n) {
#ifndef ASYNC_UTILS_NO_FRAME_CACHE
  if (n - 1 < max_cached_size) {
    frame_cache_state& c = frame_cache_tls;
    const std::size_t k = frame_class_of(n);
    if (free_block* b = c.heads[k]) {
      c.heads[k] = b->next;
      --c.counts[k];
      return b;
    }
    if (c.uncarved[k] == 0) return carve_from_new_chunk(c, k);
    std::byte* at = c.carve[k];
    --c.uncarved[k];
    if (c.huge[k]) {
      c.carve[k] = at + frame_granule * (k + 1);
      return at;
    }
    c.carve[k] = at + frame_granule * (k + 2);
    ::new (static_cast<void*>(at)) block_header{c.current[k], k};
    return at + frame_granule;
  }
  return allocate_uncached_block(n);
#else
  return ::operator new(n);
#endif
}

/// Takes back a block of cached_allocate, from any thread. `n` is the size it was asked for.
inline void cached_free(void* p, [[maybe_unused]] std::size_t n) noexcept {
#ifndef ASYNC_UTILS_NO_FRAME_CACHE
  frame_chunk* chunk = huge_chunk_of(p);
  std::size_t k;
  if (chunk) {
    k = frame_class_of(n);
  } else {
    auto* header = reinterpret_cast<block_header*>(static_cast<std::byte*>(p) - frame_granule);
    chunk = header->chunk;
    if (!chunk) {
      ::operator delete(static_cast<void*>(header));
      return;
    }
    k = header->size_class;
  }
  frame_cache_state& c = frame_cache_tls;
  if (!c.closed && c.counts[k] < max_cached_per_class) {
    arm_frame_cache_reaper(c);  // the block may come from another thread's chunk
    c.heads[k] = ::new (p) free_block{c.heads[k]};
    ++c.counts[k];
    return;
  }
  release_to_chunk(chunk, 1);
#else
  ::operator delete(p);
#endif
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

  TEST_CASE("blocks are carved from chunks with nothing but a 16-byte header each; a chunk goes back when empty") {
    using namespace codestare::async_utils::detail;
    frame_cache_trim();
#ifndef ASYNC_UTILS_NO_FRAME_CACHE
    const long chunks_before = frame_chunks_alive.load();
    std::vector<std::byte*> blocks;
    const std::size_t count = blocks_per_chunk(frame_class_of(72)) + 1;  // spills into a second chunk
    for (std::size_t i = 0; i < count; ++i) blocks.push_back(static_cast<std::byte*>(cached_allocate(72)));
    CHECK(cached_block_size(72) == 16 + 80);
    CHECK(blocks[1] - blocks[0] == static_cast<std::ptrdiff_t>(cached_block_size(72)));
    CHECK(frame_chunks_alive.load() == chunks_before + 2);
    for (std::byte* b : blocks) cached_free(b, 72);
    CHECK(frame_chunks_alive.load() == chunks_before + 2);  // held by the free list and the uncarved rest
    frame_cache_trim();
    CHECK(frame_chunks_alive.load() == chunks_before);
    // Past the bound of the free list a block goes straight back to its chunk.
    blocks.clear();
    for (unsigned i = 0; i < max_cached_per_class + 100; ++i) blocks.push_back(static_cast<std::byte*>(cached_allocate(40)));
    for (std::byte* b : blocks) cached_free(b, 40);
    CHECK(frame_cache_tls.counts[frame_class_of(40)] == max_cached_per_class);
    frame_cache_trim();
    CHECK(frame_chunks_alive.load() == chunks_before);
#endif
  }

  TEST_CASE("a class that went through every growth step takes 2 MiB-aligned huge chunks, given back when empty") {
    using namespace codestare::async_utils::detail;
    frame_cache_trim();
#ifndef ASYNC_UTILS_NO_FRAME_CACHE
    auto chunk_of = [](void* p) { return chunk_of_block(p); };
    constexpr std::size_t n = 1008;  // blocks of 1024 bytes: 8 in the first chunk
    std::size_t before_huge = 0;
    for (unsigned g = 0; g <= max_chunk_growth; ++g) before_huge += blocks_per_chunk(frame_class_of(n), g);
    for (int round = 0; round < 2; ++round) {
      const long chunks_before = frame_chunks_alive.load();
      std::vector<void*> blocks;
      for (std::size_t i = 0; i < before_huge; ++i) blocks.push_back(cached_allocate(n));
      for (void* p : blocks) CHECK(chunk_of(p)->mapped_bytes == 0);  // small programs never map one
      for (void* p : blocks) CHECK(huge_chunk_of(p) == nullptr);
      CHECK(frame_chunks_alive.load() == chunks_before + long(max_chunk_growth) + 1);
      const std::size_t huge_count = (huge_chunk_bytes - chunk_header_size) / (cached_block_size(n) - frame_granule);
      for (std::size_t i = 0; i < huge_count + 1; ++i) blocks.push_back(cached_allocate(n));  // spills into a second one
      frame_chunk* first_huge = chunk_of(blocks[before_huge]);
      frame_chunk* second_huge = chunk_of(blocks.back());
      (void)first_huge;
      (void)second_huge;
#ifdef ASYNC_UTILS_HUGE_CHUNKS
      CHECK(first_huge->mapped_bytes == huge_chunk_bytes);
      CHECK(reinterpret_cast<std::uintptr_t>(first_huge) % huge_chunk_bytes == 0);
      // Blocks without a header: the first right after the chunk's own, the next a class apart.
      CHECK(static_cast<std::byte*>(blocks[before_huge]) == reinterpret_cast<std::byte*>(first_huge) + chunk_header_size);
      CHECK(static_cast<std::byte*>(blocks[before_huge + 1]) - static_cast<std::byte*>(blocks[before_huge]) ==
            static_cast<std::ptrdiff_t>(cached_block_size(n) - frame_granule));
      CHECK(huge_chunk_of(blocks[before_huge + huge_count - 1]) == first_huge);
      CHECK(chunk_of(blocks[before_huge + huge_count - 1]) == first_huge);
      CHECK(second_huge != first_huge);
      CHECK(reinterpret_cast<std::uintptr_t>(second_huge) % huge_chunk_bytes == 0);
      CHECK(frame_chunks_alive.load() == chunks_before + long(max_chunk_growth) + 3);
#endif
      for (void* p : blocks) static_cast<char*>(p)[n - 1] = 1;  // every byte of a block is usable
      if (round == 0) {
        // Freed here, then trimmed: every chunk goes back, the mapped ones unmapped.
        for (void* p : blocks) cached_free(p, n);
        frame_cache_trim();
      } else {
        // Freed on another thread, whose exit drains its free list; this thread's trim gives
        // back the uncarved rest of the current chunk.
        std::thread([&] {
          for (void* p : blocks) cached_free(p, n);
        }).join();
        frame_cache_trim();
      }
      CHECK(frame_chunks_alive.load() == chunks_before);
#ifdef ASYNC_UTILS_HUGE_CHUNKS
      CHECK(huge_chunk_of(first_huge) == nullptr);  // unmapped, and its bit cleared first
      CHECK(huge_chunk_of(second_huge) == nullptr);
#endif
    }
#endif
  }

  TEST_CASE("blocks freed on a thread are drained when it exits") {
    using namespace codestare::async_utils::detail;
    std::thread([] {
      for (int i = 0; i < 10; ++i) cached_free(cached_allocate(48), 48);
    }).join();  // LeakSanitizer/valgrind would report the block if the exit drain failed
    CHECK(true);
  }

  TEST_CASE("blocks allocated on one thread and freed on another, both orders of thread exit") {
    using namespace codestare::async_utils::detail;
    frame_cache_trim();
#ifndef ASYNC_UTILS_NO_FRAME_CACHE
    const long chunks_before = frame_chunks_alive.load();
#endif
    for (int round = 0; round < 2; ++round) {
      std::vector<void*> blocks;
      std::thread maker([&] {
        for (int i = 0; i < 1000; ++i) blocks.push_back(cached_allocate(200));
        for (std::size_t i = 0; i < blocks.size(); i += 2) cached_free(blocks[i], 200);  // half freed at home
      });
      maker.join();  // its chunks outlive it: the other half is still in use
      std::thread freer([&] {
        for (std::size_t i = 1; i < blocks.size(); i += 2) cached_free(blocks[i], 200);
        // The freer reuses them for its own blocks of the class, then gives those back too.
        for (int i = 0; i < 300; ++i) cached_free(cached_allocate(200), 200);
      });
      freer.join();
      // This thread takes and frees blocks of the same class meanwhile: its own list is untouched.
      void* mine = cached_allocate(200);
      static_cast<char*>(mine)[0] = 1;
      cached_free(mine, 200);
    }
    frame_cache_trim();
#ifndef ASYNC_UTILS_NO_FRAME_CACHE
    CHECK(frame_chunks_alive.load() == chunks_before);  // every chunk went back to the system
#endif
  }
}
#endif
