// The loop's ready queue: a ring buffer of two-word jobs, so scheduling never allocates once warm.
#pragma once

#include "../platform/config.hpp"
#include "frame_cache.hpp"

#if ASYNC_UTILS_DEFINITIONS
#include <algorithm>
#endif
#include <cstddef>
#include <vector>

namespace codestare::async_utils::detail {

/// A unit of ready work: fn(arg, true) runs it, fn(arg, false) discards it (releasing what arg
/// holds) when the loop closes before running it.
struct job {
  void (*fn)(void* arg, bool run);
  void* arg;
};

class job_queue {
 public:
  job_queue() noexcept = default;
  job_queue(const job_queue&) = delete;
  job_queue& operator=(const job_queue&) = delete;
  ~job_queue() { release(buffer_, capacity_, mapped_); }

  bool empty() const noexcept { return head_ == tail_; }
  std::size_t size() const noexcept { return tail_ - head_; }

  void push(job j) {
    if (tail_ - head_ == capacity_) [[unlikely]]
      grow();
    buffer_[tail_++ & (capacity_ - 1)] = j;
  }
  job pop() noexcept { return buffer_[head_++ & (capacity_ - 1)]; }

  /// Appends every job of `other` (emptied), keeping order.
  void splice(job_queue& other) {
    while (!other.empty()) push(other.pop());
  }

 private:
  [[gnu::noinline]] void grow() {
    const std::size_t bigger = capacity_ == 0 ? 64 : capacity_ * 2;
    bool mapped = false;
    job* fresh = acquire(bigger, mapped);
    const std::size_t n = size();
    // The live jobs in order: from head_ to the end of the buffer, then from its start.
    const std::size_t first = capacity_ == 0 ? 0 : head_ & (capacity_ - 1);
    const std::size_t run = std::min(n, capacity_ - first);
    std::copy(buffer_ + first, buffer_ + first + run, fresh);
    std::copy(buffer_, buffer_ + (n - run), fresh + run);
    release(buffer_, capacity_, mapped_);
    buffer_ = fresh;
    mapped_ = mapped;
    capacity_ = bigger;
    head_ = 0;
    tail_ = n;
  }
  /// A buffer of huge_chunk_bytes or more is a region of huge pages of its own where the frame
  /// cache takes them (a million jobs scheduled at once: faults on 4 KiB pages of fresh memory
  /// cost more than the jobs), else from operator new.
  static job* acquire(std::size_t n, [[maybe_unused]] bool& mapped) {
#ifdef ASYNC_UTILS_HUGE_CHUNKS
    if (n * sizeof(job) >= huge_chunk_bytes) {
      if (void* region = map_huge_region(n * sizeof(job))) {
        mapped = true;
        return static_cast<job*>(region);
      }
    }
#endif
    return new job[n];
  }
  static void release(job* buffer, [[maybe_unused]] std::size_t n, bool mapped) noexcept {
#ifdef ASYNC_UTILS_HUGE_CHUNKS
    if (mapped) {
      (void)::munmap(static_cast<void*>(buffer), n * sizeof(job));
      return;
    }
#endif
    (void)mapped;
    delete[] buffer;
  }
  job* buffer_ = nullptr;
  std::size_t capacity_ = 0;  // zero or a power of two
  std::size_t head_ = 0;      // monotonic; masked on access
  std::size_t tail_ = 0;
  bool mapped_ = false;       // buffer_ came from map_huge_region
};

}  // namespace codestare::async_utils::detail

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("job_queue") {
  TEST_CASE("FIFO across growth and wrap-around") {
    using namespace codestare::async_utils::detail;
    job_queue q;
    std::vector<std::size_t> seen;
    auto fn = +[](void* arg, bool) { (void)arg; };
    std::size_t next_in = 0, next_out = 0;
    for (int round = 0; round < 50; ++round) {
      for (int i = 0; i < 37; ++i) q.push({fn, reinterpret_cast<void*>(next_in++)});
      for (int i = 0; i < 30; ++i) CHECK(reinterpret_cast<std::size_t>(q.pop().arg) == next_out++);
    }
    while (!q.empty()) CHECK(reinterpret_cast<std::size_t>(q.pop().arg) == next_out++);
    CHECK(next_in == next_out);
  }

  TEST_CASE("FIFO across growth into buffers of huge pages, wrapped around") {
    using namespace codestare::async_utils::detail;
    job_queue q;
    auto fn = +[](void* arg, bool) { (void)arg; };
    std::size_t next_in = 0, next_out = 0;
    bool in_order = true;
    auto push = [&](std::size_t k) {
      for (std::size_t i = 0; i < k; ++i) q.push({fn, reinterpret_cast<void*>(next_in++)});
    };
    auto pop = [&](std::size_t k) {
      for (std::size_t i = 0; i < k; ++i) in_order = in_order && reinterpret_cast<std::size_t>(q.pop().arg) == next_out++;
    };
    push(200'000);  // 262,144 slots: 4 MiB, past huge_chunk_bytes
    pop(150'000);
    push(250'000);  // wraps around, then grows with the live jobs in two runs
    CHECK(q.size() == 300'000);
    pop(300'000);
    CHECK(in_order);
    CHECK(q.empty());
  }
}
#endif
