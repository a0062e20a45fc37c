// Timers in a 4-ary min-heap whose nodes know their position, so cancelling removes at once.
#pragma once

#include "../platform/config.hpp"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <ratio>
#include <type_traits>
#include <vector>

namespace codestare::async_utils::detail {

using clock = std::chrono::steady_clock;

// ---- Saturating time arithmetic: one place for every deadline ------------------------------
// A duration of any rep and period becomes clock::duration clamped to its range (hours::max()
// must not wrap to a negative count), and a deadline past the clock's range is
// clock::time_point::max(), which means "never": such a timer never fires and makes no backend
// wait compute a timeout.

/// `d` in the clock's unit, clamped to clock::duration's range (a NaN counts as zero).
template <class Rep, class Period>
constexpr clock::duration to_clock_duration(std::chrono::duration<Rep, Period> d) noexcept {
  using target = clock::duration;
  static_assert(std::is_arithmetic_v<Rep>, "to_clock_duration: the duration's rep must be arithmetic");
  if constexpr (std::is_floating_point_v<Rep>) {
    if (d.count() != d.count()) return target::zero();
  }
  // Decide the range in long double, which neither overflows nor wraps.
  using ratio = std::ratio_divide<Period, target::period>;
  const long double exact = static_cast<long double>(d.count()) * static_cast<long double>(ratio::num) /
                            static_cast<long double>(ratio::den);
  if (exact >= static_cast<long double>(target::max().count())) return target::max();
  if (exact <= static_cast<long double>(target::min().count())) return target::min();
  // In range: integral counts are converted exactly where duration_cast cannot overflow on the way.
  if constexpr (std::is_integral_v<Rep> && (ratio::den == 1 || ratio::num == 1)) {
    return std::chrono::duration_cast<target>(d);
  } else {
    return target(static_cast<target::rep>(exact));
  }
}

inline constexpr clock::time_point never = clock::time_point::max();

/// `when + delay`, clamped to `never`; a negative delay counts as zero (asyncio).
constexpr clock::time_point saturating_add(clock::time_point when, clock::duration delay) noexcept {
  if (delay <= clock::duration::zero()) return when;
  if (when >= never - delay) return never;  // never - delay cannot overflow: delay > 0
  return when + delay;
}

/// The deadline `delay` from now, saturated: duration::max() (of any unit) means never.
template <class Rep, class Period>
clock::time_point saturating_deadline(std::chrono::duration<Rep, Period> delay) noexcept {
  return saturating_add(clock::now(), to_clock_duration(delay));
}

/// Time left until `when`, never negative; a huge value for `never` (callers test for it first).
ASYNC_UTILS_LINK clock::duration time_until(clock::time_point when, clock::time_point now) noexcept;

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK clock::duration time_until(clock::time_point when, clock::time_point now) noexcept {
  if (when <= now) return clock::duration::zero();
  if (now < clock::time_point{} && when > now + clock::duration::max()) return clock::duration::max();
  return when - now;
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// A timer lives in whoever waits (a sleeping frame, a call_later handle); the heap only points.
struct timer_node {
  clock::time_point when{};
  std::uint64_t seq = 0;  // ties on `when` fire in scheduling order, as asyncio's heap does
  std::size_t index = npos;
  void (*fire)(timer_node*, bool run) = nullptr;  // run=false: the loop closed first
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);
  bool scheduled() const noexcept { return index != npos; }
};

/// A 4-ary min-heap: half the depth of a binary one, so a pop or a removal moves half as many
/// entries, and each move writes the moved node's position (a cache miss into a task's frame,
/// the main cost with 100,000 sleepers: W6). The heap keeps each timer's deadline and sequence
/// number beside its pointer, so that sifting compares entries in the vector (a node's four
/// children are adjacent) and touches a node only to record its new position.
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
    if (i > 0 && before(last, heap_[parent_of(i)])) sift_up(i, last);
    else sift_down(i, last);
  }
  timer_node& pop() noexcept {
    timer_node& node = top();
    remove(node);
    return node;
  }

 private:
  static constexpr std::size_t arity = 4;
  struct entry {
    clock::time_point when;
    std::uint64_t seq;
    timer_node* node;
  };
  static std::size_t parent_of(std::size_t i) noexcept { return (i - 1) / arity; }
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
      std::size_t parent = parent_of(i);
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
      const std::size_t first = arity * i + 1;
      if (first >= n) break;
      const std::size_t end = first + arity < n ? first + arity : n;
      std::size_t child = first;
      for (std::size_t c = first + 1; c < end; ++c)
        if (before(heap_[c], heap_[child])) child = c;
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
#include <limits>
#include <random>
#include <set>
#include <utility>
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

  TEST_CASE("random pushes, removals and pops agree with a sorted reference (ties: insertion order)") {
    using namespace codestare::async_utils::detail;
    std::mt19937 rng(11);
    std::vector<timer_node> nodes(3000);
    std::set<std::pair<clock::time_point, std::uint64_t>> reference;  // (when, seq) of those in the heap
    timer_heap heap;
    const auto base = clock::now();
    for (int round = 0; round < 20000; ++round) {
      timer_node& n = nodes[rng() % nodes.size()];
      const unsigned what = rng() % 3;
      if (what == 0 && !n.scheduled()) {
        n.when = base + std::chrono::microseconds(rng() % 64);  // many ties
        heap.push(n);
        reference.insert({n.when, n.seq});
      } else if (what == 1 && n.scheduled()) {
        reference.erase({n.when, n.seq});
        heap.remove(n);
      } else if (what == 2 && !heap.empty()) {
        timer_node& top = heap.pop();
        REQUIRE(!reference.empty());
        CHECK(reference.begin()->first == top.when);
        CHECK(reference.begin()->second == top.seq);
        reference.erase(reference.begin());
      }
      REQUIRE(heap.size() == reference.size());
    }
    while (!heap.empty()) {
      timer_node& top = heap.pop();
      CHECK(reference.begin()->second == top.seq);
      reference.erase(reference.begin());
    }
  }

  TEST_CASE("deadline arithmetic saturates: any unit, huge, negative, NaN") {
    using namespace codestare::async_utils::detail;
    using namespace std::chrono;
    using ns = clock::duration;
    // Regression: duration_cast<nanoseconds>(hours::max()) wrapped to a negative count.
    CHECK(to_clock_duration(hours::max()) == ns::max());
    CHECK(to_clock_duration(hours::min()) == ns::min());
    CHECK(to_clock_duration(seconds::max()) == ns::max());
    CHECK(to_clock_duration(ns::max()) == ns::max());
    CHECK(to_clock_duration(duration<double>(1e300)) == ns::max());
    CHECK(to_clock_duration(duration<double>(-1e300)) == ns::min());
    CHECK(to_clock_duration(duration<double>(std::numeric_limits<double>::infinity())) == ns::max());
    CHECK(to_clock_duration(duration<double>(std::numeric_limits<double>::quiet_NaN())) == ns::zero());
    CHECK(to_clock_duration(duration<std::uint64_t, std::milli>(~std::uint64_t{0})) == ns::max());
    // In range: exact, as duration_cast would be.
    CHECK(to_clock_duration(seconds(5)) == ns(5000000000));
    CHECK(to_clock_duration(hours(-2)) == -hours(2));
    CHECK(to_clock_duration(duration<double>(0.25)) == milliseconds(250));
    CHECK(to_clock_duration(duration<long long, std::pico>(1500)) == ns(1));
    CHECK(to_clock_duration(duration<long long, std::ratio<1, 3>>(3)) == seconds(1));
    CHECK(to_clock_duration(hours(2562047)) == hours(2562047));  // just below the limit (~292 years)
    CHECK(to_clock_duration(hours(2562048)) == ns::max());       // just above it
    static_assert(to_clock_duration(minutes::max()) == ns::max());
    // Deadlines: past the range is never; negative delays count as zero.
    const auto now = clock::now();
    CHECK(saturating_add(now, ns::max()) == never);
    CHECK(saturating_add(now, ns(-5)) == now);
    CHECK(saturating_add(now, ns::min()) == now);
    CHECK(saturating_add(now, seconds(1)) == now + seconds(1));
    CHECK(saturating_add(never, ns(1)) == never);
    CHECK(saturating_deadline(hours::max()) == never);
    const auto before = clock::now();
    const auto soon = saturating_deadline(seconds(-3));
    CHECK((soon >= before && soon <= clock::now()));
    CHECK(time_until(never, now) == never - now);
    CHECK(time_until(now, now + seconds(1)) == ns::zero());
    CHECK(time_until(clock::time_point::max(), clock::time_point(ns(-10))) == ns::max());
  }
}
#endif
