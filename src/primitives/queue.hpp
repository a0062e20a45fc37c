// queue<T>: asyncio.Queue, a FIFO queue for producer and consumer tasks, with task_done/join.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../platform/log.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/intrusive_list.hpp"
#include "../runtime/event_loop.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/run.hpp"
#include "waiter.hpp"

#include <coroutine>
#include <cstddef>
#include <deque>
#include <stdexcept>
#include <utility>

namespace codestare::async_utils {

template <class T>
class queue;

namespace detail {

/// co_await queue.get(). A woken getter holds a claim on one item, which stays in the queue
/// until the getter resumes and takes the front item; cancelled first, it drops the claim and
/// the next getter is woken instead.
template <class T>
struct queue_get : parked_task {
  queue<T>* q;

  explicit queue_get(queue<T>& owner) noexcept : q(&owner) {}
  queue_get(queue_get&&) noexcept = default;
  bool await_ready() const noexcept { return !q->empty(); }
  void await_suspend(std::coroutine_handle<> h) {
    bind("queue.get()");
    cancel = &withdraw_hook;
    park(q->getters_, h);
  }
  T await_resume() {
    if (task) {
      unlink();
      throw_if_abandoned();
      const bool claimed = std::exchange(woken, false);
      if (claimed) --q->claimed_items_;
      try {
        check_cancelled();
      } catch (...) {
        if (claimed) q->wake_getters();
        throw;
      }
    }
    return q->take();
  }
  ~queue_get() {
    unlink();
    if (woken) {  // destroyed between wake-up and resumption (loop closing)
      --q->claimed_items_;
      from_destructor("queue: waking the next getter failed", [this] { q->wake_getters(); });
    }
  }
};

/// co_await queue.put(item). Holds the item; a woken putter holds a claim on one free slot.
/// A cancelled put puts nothing.
template <class T>
struct queue_put : parked_task {
  queue<T>* q;
  T item;

  queue_put(queue<T>& owner, T&& value) : q(&owner), item(std::move(value)) {}
  queue_put(queue_put&&) noexcept(std::is_nothrow_move_constructible_v<T>) = default;
  bool await_ready() const noexcept { return !q->full(); }
  void await_suspend(std::coroutine_handle<> h) {
    bind("queue.put()");
    cancel = &withdraw_hook;
    park(q->putters_, h);
  }
  void await_resume() {
    if (task) {
      unlink();
      throw_if_abandoned();
      const bool claimed = std::exchange(woken, false);
      if (claimed) --q->claimed_slots_;
      try {
        check_cancelled();
      } catch (...) {
        if (claimed) q->wake_putters();
        throw;
      }
    }
    q->store(std::move(item));
  }
  ~queue_put() {
    unlink();
    if (woken) {
      --q->claimed_slots_;
      from_destructor("queue: waking the next putter failed", [this] { q->wake_putters(); });
    }
  }
};

/// co_await queue.join(): parks until the count of unfinished items drops to zero.
struct queue_join : parked_task {
  const std::size_t* unfinished;
  intrusive_list<parked_task>* joiners;

  queue_join(const std::size_t& count, intrusive_list<parked_task>& list) noexcept : unfinished(&count), joiners(&list) {}

  bool await_ready() const noexcept { return *unfinished == 0; }
  void await_suspend(std::coroutine_handle<> h) {
    bind("queue.join()");
    cancel = &withdraw_hook;
    park(*joiners, h);
  }
  void await_resume() {
    if (task) {
      unlink();
      check_cancelled();
    }
  }
};

}  // namespace detail

/// asyncio.Queue: items come out in the order they went in; get() waits while the queue is
/// empty, put() while it is full (maxsize > 0). Waiters are served first come first served:
/// an item (or free slot) promised to a woken waiter is no longer offered to anybody else, so
/// qsize(), empty() and full() describe what a newcomer can get or put. Loop thread only.
template <class T>
class queue {
 public:
  using value_type = T;

  /// Queue(maxsize): maxsize <= 0 means unbounded.
  explicit queue(std::ptrdiff_t maxsize = 0) noexcept : maxsize_(maxsize) {}
  queue(const queue&) = delete;
  queue& operator=(const queue&) = delete;
  /// Every wait still pending (get, put, join; woken or not) ends with cancelled_error.
  ~queue() {
    detail::abandon_all(getters_);
    detail::abandon_all(putters_);
    detail::abandon_all(joiners_);
    detail::abandon_all(woken_);
  }

  /// Queue.maxsize, as given.
  std::ptrdiff_t maxsize() const noexcept { return maxsize_; }
  /// Queue.qsize(): items a getter could take now (those promised to woken getters excluded).
  std::size_t qsize() const noexcept { return items_.size() - claimed_items_; }
  /// Queue.empty(): true when get_nowait() would throw queue_empty.
  bool empty() const noexcept { return qsize() == 0; }
  /// Queue.full(): true when put_nowait() would throw queue_full.
  bool full() const noexcept {
    return maxsize_ > 0 && items_.size() + claimed_slots_ >= static_cast<std::size_t>(maxsize_);
  }

  /// Queue.put(item): `co_await q.put(item)` waits for a free slot, then appends. Cancelled,
  /// it puts nothing (the item, held by the awaiter, is dropped).
  [[nodiscard]] detail::queue_put<T> put(const T& item) { return detail::queue_put<T>(*this, T(item)); }
  [[nodiscard]] detail::queue_put<T> put(T&& item) { return detail::queue_put<T>(*this, std::move(item)); }
  /// Queue.get(): `co_await q.get()` waits for an item and yields it.
  [[nodiscard]] detail::queue_get<T> get() noexcept { return detail::queue_get<T>(*this); }

  /// Queue.put_nowait(item): throws queue_full when full (an rvalue item is then left intact).
  void put_nowait(const T& item) {
    if (full()) throw queue_full();
    store(T(item));
  }
  void put_nowait(T&& item) {
    if (full()) throw queue_full();
    store(std::move(item));
  }
  /// Queue.get_nowait(): throws queue_empty when empty.
  T get_nowait() {
    if (empty()) throw queue_empty();
    return take();
  }

  /// Queue.task_done(): one item taken earlier is fully processed. Throws
  /// std::invalid_argument when called more times than items were put.
  void task_done() {
    if (unfinished_ == 0) throw std::invalid_argument("queue.task_done() called too many times");
    if (--unfinished_ == 0) {
      while (detail::parked_task* w = joiners_.pop_front()) w->wake_up();
    }
  }
  /// Queue.join(): `co_await q.join()` waits until every item put has had its task_done().
  [[nodiscard]] detail::queue_join join() noexcept {
    return detail::queue_join(unfinished_, joiners_);
  }

 private:
  friend struct detail::queue_get<T>;
  friend struct detail::queue_put<T>;

  void store(T&& item) {
    items_.push_back(std::move(item));
    ++unfinished_;
    wake_getters();
  }
  T take() {
    T item = std::move(items_.front());
    items_.pop_front();
    wake_putters();
    return item;
  }
  void wake_getters() {
    while (qsize() > 0 && !getters_.empty()) {
      ++claimed_items_;
      detail::parked_task* w = getters_.pop_front();
      woken_.push_back(*w);  // reachable until it resumes, for the destructor
      w->wake_up();
    }
  }
  void wake_putters() {
    while (!full() && !putters_.empty()) {
      ++claimed_slots_;
      detail::parked_task* w = putters_.pop_front();
      woken_.push_back(*w);
      w->wake_up();
    }
  }

  std::ptrdiff_t maxsize_;
  std::deque<T> items_;
  std::size_t claimed_items_ = 0;  // items promised to woken getters
  std::size_t claimed_slots_ = 0;  // free slots promised to woken putters
  std::size_t unfinished_ = 0;     // put but not yet task_done()
  detail::intrusive_list<detail::parked_task> getters_;
  detail::intrusive_list<detail::parked_task> putters_;
  detail::intrusive_list<detail::parked_task> joiners_;
  detail::intrusive_list<detail::parked_task> woken_;  // getters and putters not yet resumed
};

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("queue") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("put_nowait, get_nowait, sizes, FIFO order, and the queue_full / queue_empty errors") {
    queue<int> q(2);
    CHECK(q.maxsize() == 2);
    CHECK(q.empty());
    CHECK_FALSE(q.full());
    CHECK_THROWS_AS(q.get_nowait(), queue_empty);
    q.put_nowait(1);
    q.put_nowait(2);
    CHECK(q.qsize() == 2);
    CHECK(q.full());
    CHECK_THROWS_AS(q.put_nowait(3), queue_full);
    CHECK(q.qsize() == 2);
    CHECK(q.get_nowait() == 1);
    CHECK_FALSE(q.full());
    CHECK(q.get_nowait() == 2);
    CHECK(q.empty());
    CHECK_THROWS_AS(q.get_nowait(), queue_empty);

    queue<int> unbounded(-1);
    CHECK(unbounded.maxsize() == -1);
    for (int i = 0; i < 1000; ++i) unbounded.put_nowait(i);
    CHECK_FALSE(unbounded.full());
    for (int i = 0; i < 1000; ++i) CHECK(unbounded.get_nowait() == i);
  }

  TEST_CASE("move-only items, through put_nowait and the awaiting put/get") {
    queue<std::unique_ptr<int>> q(1);
    auto item = std::make_unique<int>(1);
    q.put_nowait(std::move(item));
    CHECK(item == nullptr);
    auto spare = std::make_unique<int>(2);
    CHECK_THROWS_AS(q.put_nowait(std::move(spare)), queue_full);
    CHECK(spare != nullptr);  // a refused item stays with the caller
    testing::run_bounded([&]() -> coroutine<void> {
      CHECK(*co_await q.get() == 1);
      co_await q.put(std::make_unique<int>(3));
      CHECK(*q.get_nowait() == 3);
    }());
  }

  TEST_CASE("get waits for put; waiting getters are served in FIFO order with FIFO items") {
    queue<int> q;
    std::vector<std::pair<int, int>> got;  // (getter, item)
    auto getter = [](queue<int>& qu, std::vector<std::pair<int, int>>& log, int id) -> coroutine<void> {
      int v = co_await qu.get();
      log.emplace_back(id, v);
    };
    testing::run_bounded([&]() -> coroutine<void> {
      std::vector<task<void>> tasks;
      for (int i = 1; i <= 3; ++i) tasks.push_back(create_task(getter(q, got, i)));
      co_await sleep(0s);
      CHECK(got.empty());
      q.put_nowait(10);
      CHECK(q.empty());  // promised to getter 1
      CHECK_THROWS_AS(q.get_nowait(), queue_empty);
      co_await q.put(20);
      co_await q.put(30);
      for (auto& t : tasks) co_await t;
      CHECK(got == std::vector<std::pair<int, int>>{{1, 10}, {2, 20}, {3, 30}});
      CHECK(q.empty());
    }());
  }

  TEST_CASE("put waits while full; waiting putters go in FIFO order as items are taken") {
    queue<int> q(1);
    auto putter = [](queue<int>& qu, int v) -> coroutine<void> { co_await qu.put(v); };
    testing::run_bounded([&]() -> coroutine<void> {
      co_await q.put(0);
      std::vector<task<void>> tasks;
      for (int i = 1; i <= 3; ++i) tasks.push_back(create_task(putter(q, i)));
      co_await sleep(0s);
      CHECK(q.full());
      std::vector<int> seen;
      for (int i = 0; i <= 3; ++i) seen.push_back(co_await q.get());
      for (auto& t : tasks) co_await t;
      CHECK(seen == std::vector<int>{0, 1, 2, 3});
      CHECK(q.empty());
      CHECK(q.qsize() == 0);
    }());
  }

  TEST_CASE("a getter cancelled while waiting or after its wake-up loses no item") {
    queue<int> q;
    std::vector<int> got;
    auto getter = [](queue<int>& qu, std::vector<int>& log) -> coroutine<void> { log.push_back(co_await qu.get()); };
    testing::run_bounded([&]() -> coroutine<void> {
      auto t1 = create_task(getter(q, got));
      auto t2 = create_task(getter(q, got));
      auto t3 = create_task(getter(q, got));
      co_await sleep(0s);
      t1.cancel();  // while waiting
      co_await wait_done(t1);
      q.put_nowait(1);  // promised to t2 ...
      t2.cancel();      // ... cancelled before it runs: the item goes to t3
      co_await wait_done(t2);
      CHECK(t1.cancelled());
      CHECK(t2.cancelled());
      co_await t3;
      CHECK(got == std::vector<int>{1});

      auto t4 = create_task(getter(q, got));
      co_await sleep(0s);
      q.put_nowait(2);
      t4.cancel();  // the last getter: the item stays in the queue
      co_await wait_done(t4);
      CHECK(t4.cancelled());
      CHECK(q.qsize() == 1);
      CHECK(q.get_nowait() == 2);
    }());
  }

  TEST_CASE("a putter cancelled while waiting or after its wake-up puts nothing and passes the slot on") {
    queue<int> q(1);
    auto putter = [](queue<int>& qu, int v) -> coroutine<void> { co_await qu.put(v); };
    testing::run_bounded([&]() -> coroutine<void> {
      q.put_nowait(0);
      auto t1 = create_task(putter(q, 1));
      auto t2 = create_task(putter(q, 2));
      auto t3 = create_task(putter(q, 3));
      co_await sleep(0s);
      t1.cancel();
      co_await wait_done(t1);
      CHECK(q.get_nowait() == 0);  // frees the slot for t2 ...
      CHECK(q.full());             // ... promised to it
      t2.cancel();                 // cancelled before it runs: t3 gets the slot
      co_await wait_done(t2);
      co_await t3;
      CHECK(t1.cancelled());
      CHECK(t2.cancelled());
      CHECK(q.qsize() == 1);
      CHECK(q.get_nowait() == 3);
      CHECK(q.empty());
      CHECK_FALSE(q.full());
      q.task_done();  // 0 and 3 were put; 1 and 2 never were
      q.task_done();
      CHECK_THROWS_AS(q.task_done(), std::invalid_argument);
    }());
  }

  TEST_CASE("join waits until every item put has had task_done") {
    queue<int> q;
    static std::vector<int> processed;
    auto worker = [](queue<int>& qu) -> coroutine<void> {
      for (;;) {
        int v = co_await qu.get();
        co_await sleep(1ms);
        processed.push_back(v);
        qu.task_done();
      }
    };
    CHECK_THROWS_AS(q.task_done(), std::invalid_argument);
    testing::run_bounded([&]() -> coroutine<void> {
      co_await q.join();  // nothing unfinished: returns at once
      auto w1 = create_task(worker(q));
      auto w2 = create_task(worker(q));
      for (int i = 0; i < 6; ++i) co_await q.put(i);
      co_await q.join();
      CHECK(processed.size() == 6);
      CHECK(q.empty());
      CHECK_THROWS_AS(q.task_done(), std::invalid_argument);

      // A cancelled joiner leaves; the others still see the queue finish.
      q.put_nowait(7);
      auto joiner = [](queue<int>& qu) -> coroutine<void> { co_await qu.join(); };
      auto j1 = create_task(joiner(q));
      auto j2 = create_task(joiner(q));
      co_await sleep(0s);
      CHECK_FALSE(j2.done());
      j1.cancel();
      co_await j2;
      co_await wait_done(j1);
      CHECK(j1.cancelled());
      w1.cancel();
      w2.cancel();
      co_await wait_done(w1);
      co_await wait_done(w2);
      CHECK(processed.back() == 7);
    }());
  }

  TEST_CASE("a loop closed between wake-ups and resumptions leaves no item or slot claimed") {
    queue<int> items, slots(1);
    {
      testing::log_capture quiet;
      event_loop loop;
      auto getter = [](queue<int>& q) -> coroutine<void> { (void)co_await q.get(); };
      auto putter = [](queue<int>& q) -> coroutine<void> { co_await q.put(2); };
      auto body = [](queue<int>& a, queue<int>& b, coroutine<void> g, coroutine<void> p) -> coroutine<void> {
        create_task(std::move(g));
        b.put_nowait(1);
        create_task(std::move(p));
        co_await sleep(0s);
        a.put_nowait(1);  // promised to the getter
        CHECK(b.get_nowait() == 1);  // the free slot is promised to the putter
      };
      loop.run_until_complete(body(items, slots, getter(items), putter(slots)));
      CHECK(items.empty());
      CHECK(slots.full());
      loop.close();
    }
    CHECK(items.qsize() == 1);
    CHECK(items.get_nowait() == 1);
    CHECK_FALSE(slots.full());
    CHECK(slots.empty());
  }
}
#endif
