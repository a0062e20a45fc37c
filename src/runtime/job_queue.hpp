// The loop's ready queue: a ring buffer of two-word jobs, so scheduling never allocates once warm.
#pragma once

#include "../platform/config.hpp"

#include <algorithm>
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
  ~job_queue() { delete[] buffer_; }

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
    job* fresh = new job[bigger];
    const std::size_t n = size();
    // The live jobs in order: from head_ to the end of the buffer, then from its start.
    const std::size_t first = capacity_ == 0 ? 0 : head_ & (capacity_ - 1);
    const std::size_t run = std::min(n, capacity_ - first);
    std::copy(buffer_ + first, buffer_ + first + run, fresh);
    std::copy(buffer_, buffer_ + (n - run), fresh + run);
    delete[] buffer_;
    buffer_ = fresh;
    capacity_ = bigger;
    head_ = 0;
    tail_ = n;
  }
  job* buffer_ = nullptr;
  std::size_t capacity_ = 0;  // zero or a power of two
  std::size_t head_ = 0;      // monotonic; masked on access
  std::size_t tail_ = 0;
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
}
#endif
