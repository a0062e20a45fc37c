// Timers in a binary min-heap whose nodes know their position, so cancelling removes at once.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace codestare::async_utils::detail {

using clock = std::chrono::steady_clock;

/// A timer lives in whoever waits (a sleeping frame, a call_later handle); the heap only points.
struct timer_node {
  clock::time_point when{};
  std::uint64_t seq = 0;  // ties on `when` fire in scheduling order, as asyncio's heap does
  std::size_t index = npos;
  void (*fire)(timer_node*, bool run) = nullptr;  // run=false: the loop closed first
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);
  bool scheduled() const noexcept { return index != npos; }
};

/// The heap keeps each timer's deadline and sequence number beside its pointer, so that sifting
/// compares entries in the vector and touches a node only to record its new position.
class timer_heap {
 public:
  bool empty() const noexcept { return heap_.empty(); }
  std::size_t size() const noexcept { return heap_.size(); }
  timer_node& top() noexcept { return *heap_.front().node; }
  /// The earliest deadline (the heap must not be empty).
  clock::time_point top_when() const noexcept { return heap_.front().when; }

  void push(timer_node& node) {
    node.seq = next_seq_++;
    heap_.push_back({node.when, node.seq, &node});
    node.index = heap_.size() - 1;
    sift_up(node.index, heap_.back());
  }
  /// Removes a scheduled node in O(log n); cancelled timers never pile up.
  void remove(timer_node& node) noexcept {
    std::size_t i = node.index;
    if (i == timer_node::npos) return;
    node.index = timer_node::npos;
    const entry last = heap_.back();
    heap_.pop_back();
    if (last.node == &node) return;
    // The last entry fills the hole, then moves whichever way restores the order.
    if (i > 0 && before(last, heap_[(i - 1) / 2])) sift_up(i, last);
    else sift_down(i, last);
  }
  timer_node& pop() noexcept {
    timer_node& node = top();
    remove(node);
    return node;
  }

 private:
  struct entry {
    clock::time_point when;
    std::uint64_t seq;
    timer_node* node;
  };
  static bool before(const entry& a, const entry& b) noexcept {
    return a.when < b.when || (a.when == b.when && a.seq < b.seq);
  }
  void place(std::size_t i, const entry& e) noexcept {
    heap_[i] = e;
    e.node->index = i;
  }
  /// Puts `e` at hole i or above it.
  void sift_up(std::size_t i, const entry e) noexcept {
    while (i > 0) {
      std::size_t parent = (i - 1) / 2;
      if (!before(e, heap_[parent])) break;
      place(i, heap_[parent]);
      i = parent;
    }
    place(i, e);
  }
  /// Puts `e` at hole i or below it.
  void sift_down(std::size_t i, const entry e) noexcept {
    const std::size_t n = heap_.size();
    for (;;) {
      std::size_t child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && before(heap_[child + 1], heap_[child])) ++child;
      if (!before(heap_[child], e)) break;
      place(i, heap_[child]);
      i = child;
    }
    place(i, e);
  }
  std::vector<entry> heap_;
  std::uint64_t next_seq_ = 0;
};

}  // namespace codestare::async_utils::detail

#ifdef ASYNC_UTILS_TESTS
#include <random>
TEST_SUITE("timer_heap") {
  TEST_CASE("pops in deadline order, ties in insertion order, removal anywhere") {
    using namespace codestare::async_utils::detail;
    std::mt19937 rng(7);
    std::vector<timer_node> nodes(500);
    timer_heap heap;
    const auto base = clock::now();
    for (auto& n : nodes) {
      n.when = base + std::chrono::milliseconds(rng() % 50);
      heap.push(n);
    }
    for (std::size_t i = 0; i < nodes.size(); i += 3) heap.remove(nodes[i]);
    heap.remove(nodes[0]);  // removing twice is harmless
    CHECK(heap.size() == nodes.size() - (nodes.size() + 2) / 3);
    const timer_node* prev = nullptr;
    while (!heap.empty()) {
      timer_node& n = heap.pop();
      CHECK_FALSE(n.scheduled());
      if (prev) CHECK((prev->when < n.when || (prev->when == n.when && prev->seq < n.seq)));
      prev = &n;
    }
  }
}
#endif
