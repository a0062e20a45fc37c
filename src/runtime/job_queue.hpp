// The loop's ready queue: a ring buffer of two-word jobs, so scheduling never allocates once warm.
#pragma once

#include <cstddef>
#include <utility>
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
  bool empty() const noexcept { return head_ == tail_; }
  std::size_t size() const noexcept { return tail_ - head_; }

  void push(job j) {
    if (size() == buffer_.size()) grow();
    buffer_[tail_++ & (buffer_.size() - 1)] = j;
  }
  job pop() noexcept { return buffer_[head_++ & (buffer_.size() - 1)]; }

  /// Appends every job of `other` (emptied), keeping order.
  void splice(job_queue& other) {
    while (!other.empty()) push(other.pop());
  }

 private:
  void grow() {
    std::vector<job> bigger(buffer_.empty() ? 64 : buffer_.size() * 2);
    std::size_t n = size();
    for (std::size_t i = 0; i < n; ++i) bigger[i] = pop();
    buffer_ = std::move(bigger);
    head_ = 0;
    tail_ = n;
  }
  std::vector<job> buffer_;  // size is zero or a power of two
  std::size_t head_ = 0;     // monotonic; masked on access
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
