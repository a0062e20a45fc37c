// accessor<T>: shared access to a value, synchronised by a condition (codestare's accessor).
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/completion.hpp"
#include "../runtime/task.hpp"
#include "../runtime/run.hpp"
#include "../primitives/condition.hpp"
#include "awaitable_predicate.hpp"

#include <concepts>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <type_traits>

namespace codestare::async_utils {

template <class T>
class accessor;

/// Keyword arguments of accessor's constructors.
struct accessor_options {
  /// Shared with other accessors when given; a new condition otherwise.
  // (Default member initialisers: designated initialisers may then leave fields out without
  // -Wmissing-field-initializers.)
  std::shared_ptr<async_utils::condition> condition = nullptr;
  /// For debugging and printing.
  std::string name = {};
};

/// Keyword arguments of accessor<T>::get(); see the table there.
template <class T>
struct get_options {
  std::function<bool(const T&)> predicate = {};
  std::optional<bool> wait_for_write = std::nullopt;
};

/// codestare's accessor: get() waits for writes made with set(), through one condition.
///
/// | predicate | wait_for_write  | get() returns                                           |
/// |-----------|-----------------|---------------------------------------------------------|
/// | none      | unset or true   | after the next notification of the condition            |
/// | none      | false           | at once                                                 |
/// | given     | unset or false  | as soon as predicate(value) holds, maybe at once        |
/// | given     | true            | at the first notification after which predicate holds  |
template <class T>
class accessor {
  static_assert(std::is_copy_constructible_v<T>, "accessor<T> hands out copies of the value: T must be copyable");

  // What the coroutines and has_waiting_read share with the accessor; they hold it, so a
  // coroutine still running when the accessor is destroyed never reaches into the accessor.
  // Declared first: has_waiting_read's predicate captures it.
  struct shared_state {
    std::shared_ptr<async_utils::condition> condition;
    std::shared_ptr<async_utils::condition> readers_changed;  // has_waiting_read's condition
    std::size_t waiting_reads = 0;
    std::optional<T> stored;
    bool custom = false;     // fget/fset are the user's: they may point into a destroyed owner
    bool destroyed = false;  // the accessor is gone
  };
  std::shared_ptr<shared_state> state_ = std::make_shared<shared_state>();

  // A call of a destroyed accessor over the user's functions ends with cancelled_error (the
  // rule of every waiting primitive) instead of calling a getter or setter whose owner may be
  // gone; over an internal value it goes on, the value living in the shared state.
  static void check_alive(const shared_state& s) {
    if (s.destroyed && s.custom) throw cancelled_error("accessor destroyed while this call waited");
  }

 public:
  using value_type = T;
  using getter = std::function<T()>;
  using setter = std::function<void(T)>;

  /// An accessor of a value kept inside (default-constructed when T allows, else empty until the
  /// first set(): reading an empty one throws invalid_state_error).
  explicit accessor(accessor_options options = {}) : accessor(nullptr, nullptr, std::move(options), true) {}
  /// An accessor over a getter T() and a setter void(T); empty functions throw
  /// std::invalid_argument (the original's ValueError).
  /// (A template, so that a braced options list never tries to become a getter.)
  template <class Get, class Set>
    requires std::constructible_from<getter, Get> && std::constructible_from<setter, Set>
  accessor(Get get, Set set, accessor_options options = {})
      : accessor(getter(std::move(get)), setter(std::move(set)), std::move(options), false) {}
  accessor(const accessor&) = delete;  // the getter/setter of an internal value point into it
  accessor& operator=(const accessor&) = delete;
  ~accessor() { state_->destroyed = true; }

  getter fget;
  setter fset;

  async_utils::condition& condition() const noexcept { return *state_->condition; }
  const std::shared_ptr<async_utils::condition>& shared_condition() const noexcept { return state_->condition; }
  const std::string& name() const noexcept { return name_; }
  /// The value now, without taking the lock (not synchronised).
  T value() const { return fget(); }

  /// True while at least one get() waits; `co_await acc.has_waiting_read` waits for a reader.
  awaitable_predicate has_waiting_read;

  /// Sets the value with fset and notifies every waiting get(). With wait_for_read, first
  /// waits until some get() is waiting (a write that waits for a read). If fset throws, the
  /// exception leaves set, nobody is notified and the lock is released.
  coroutine<void> set(T value, bool wait_for_read = false) { return set_impl(state_, fset, std::move(value), wait_for_read); }

  /// Returns fget() once the combined predicate holds (see the class table). Exceptions from
  /// fget or the predicate leave get; the waiting-reader count is restored however get ends.
  coroutine<T> get(get_options<T> options = {}) { return get_impl(state_, fget, std::move(options)); }

  friend std::ostream& operator<<(std::ostream& os, const accessor& a) {
    return os << "accessor(name=" << (a.name_.empty() ? "None" : "'" + a.name_ + "'")
              << ", custom_getter=" << (a.custom_ ? "True" : "False") << ", custom_setter=" << (a.custom_ ? "True" : "False")
              << ')';
  }

 private:
  accessor(getter get, setter set, accessor_options options, bool internal)
      : fget(std::move(get)),
        fset(std::move(set)),
        has_waiting_read([s = state_] { return s->waiting_reads > 0; }),
        name_(std::move(options.name)),
        custom_(!internal) {
    if (internal) {
      // The value lives in the shared state; the functions hold it weakly (no cycle).
      if constexpr (std::is_default_constructible_v<T>) state_->stored.emplace();
      std::weak_ptr<shared_state> weak = state_;
      fget = [weak] {
        auto s = weak.lock();
        if (!s || !s->stored) throw invalid_state_error("accessor: no value has been set");
        return *s->stored;
      };
      fset = [weak](T v) {
        if (auto s = weak.lock()) s->stored = std::move(v);
      };
    }
    if (!fget) throw std::invalid_argument("accessor: the getter is empty");
    if (!fset) throw std::invalid_argument("accessor: the setter is empty");
    state_->condition = options.condition ? std::move(options.condition) : std::make_shared<async_utils::condition>();
    state_->readers_changed = has_waiting_read.shared_condition();
    state_->custom = !internal;
  }

  static coroutine<void> set_impl(std::shared_ptr<shared_state> s, setter set, T value, bool wait_for_read) {
    if (wait_for_read) {  // has_waiting_read's wait, on the shared state alone
      auto announce = co_await s->readers_changed->scoped();
      co_await s->readers_changed->wait_for([&s] { return s->waiting_reads > 0; });
    }
    auto guard = co_await s->condition->scoped();
    check_alive(*s);
    set(std::move(value));
    s->condition->notify_all();
  }

  // Counts this get() as a waiting reader for as long as it lives, and tells has_waiting_read.
  struct reader_count {
    std::shared_ptr<shared_state> s;
    explicit reader_count(std::shared_ptr<shared_state> st) : s(std::move(st)) { ++s->waiting_reads; }
    ~reader_count() { --s->waiting_reads; }
  };
  static coroutine<T> get_impl(std::shared_ptr<shared_state> s, getter get, get_options<T> options) {
    const bool has_predicate = static_cast<bool>(options.predicate);
    const bool wait_for_write = options.wait_for_write.value_or(!has_predicate);
    auto guard = co_await s->condition->scoped();
    reader_count reading(s);
    if (wait_for_write || has_predicate) {
      {  // wake writers waiting for a reader (set(wait_for_read)); they then queue for our lock
        auto announce = co_await s->readers_changed->scoped();
        s->readers_changed->notify_all();
      }
      bool first = true;  // the original's default predicate: [False, True, True, ...]
      co_await s->condition->wait_for([&] {
        check_alive(*s);
        const bool written = !wait_for_write || !std::exchange(first, false);
        return written && (!has_predicate || options.predicate(get()));
      });
    }
    check_alive(*s);
    co_return get();
  }

  std::string name_;
  bool custom_;
};

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <sstream>
TEST_SUITE("accessor") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  TEST_CASE("reference example: a read waiting for a write prints Bar") {
    std::ostringstream out;
    testing::run_bounded([&]() -> coroutine<void> {
      accessor<std::string> foo;
      auto wait_for_write = [&](accessor<std::string>& a) -> coroutine<void> { out << co_await a.get() << '\n'; };
      auto background = create_task(wait_for_write(foo));
      co_await sleep(0s);  // the REPL runs the loop between statements
      co_await foo.set("Bar");
      co_await background;
    }());
    CHECK(out.str() == "Bar\n");
  }

  TEST_CASE("reference example: custom getter and setter of a property, errors from the setter") {
    struct thing {
      int value_ = 0;
      int value() const { return value_; }
      void set_value(int v) {
        if (!v) throw std::invalid_argument("Illegal value " + std::to_string(v));
        value_ = v;
      }
    };
    struct better_thing : thing {
      accessor<int> value_accessor{[this] { return value(); }, [this](int v) { set_value(v); }};
    };
    std::ostringstream out;
    thing t;
    t.set_value(3);
    out << t.value() << '\n';
    try {
      t.set_value(0);
    } catch (const std::invalid_argument& e) {
      out << e.what() << '\n';
    }
    testing::run_bounded([&]() -> coroutine<void> {
      better_thing better;
      auto wait_for_write = [&](accessor<int>& a) -> coroutine<void> { out << co_await a.get() << '\n'; };
      auto background = create_task(wait_for_write(better.value_accessor));
      co_await sleep(0s);
      co_await better.value_accessor.set(3);
      co_await background;
      out << better.value() << '\n';
      try {
        co_await better.value_accessor.set(0);
      } catch (const std::invalid_argument& e) {
        out << e.what() << '\n';
      }
      CHECK_FALSE(better.value_accessor.condition().locked());  // released after the throw
      CHECK(better.value() == 3);
    }());
    CHECK(out.str() == "3\nIllegal value 0\n3\n3\nIllegal value 0\n");
  }

  TEST_CASE("the four rows of the get() table") {
    testing::run_bounded([]() -> coroutine<void> {
      accessor<int> a;
      co_await a.set(1);
      // none + false: at once
      CHECK(co_await a.get({.predicate = {}, .wait_for_write = false}) == 1);
      // given + unset: at once when it already holds
      CHECK(co_await a.get({.predicate = [](const int& v) { return v == 1; }}) == 1);
      // none + unset: blocks until the next write
      auto next = create_task(a.get());
      co_await sleep(1ms);
      CHECK_FALSE(next.done());
      co_await a.set(2);
      CHECK(co_await next == 2);
      // given + true: the first write after which it holds, even though it holds now
      auto later = create_task(a.get({.predicate = [](const int& v) { return v >= 2; }, .wait_for_write = true}));
      co_await sleep(1ms);
      CHECK_FALSE(later.done());
      co_await a.set(1);  // a write, but the predicate fails
      co_await sleep(1ms);
      CHECK_FALSE(later.done());
      co_await a.set(5);
      CHECK(co_await later == 5);
      // given + false: waits for the predicate without needing a write first
      auto until = create_task(a.get({.predicate = [](const int& v) { return v == 7; }, .wait_for_write = false}));
      co_await sleep(1ms);
      CHECK_FALSE(until.done());
      co_await a.set(7);
      CHECK(co_await until == 7);
    }());
  }

  TEST_CASE("has_waiting_read, set(wait_for_read), and the reader count under cancellation") {
    testing::run_bounded([]() -> coroutine<void> {
      accessor<int> a({.condition = nullptr, .name = "level"});
      CHECK_FALSE(static_cast<bool>(a.has_waiting_read));
      auto writer = create_task(a.set(4, true));  // waits for a reader first
      co_await sleep(1ms);
      CHECK_FALSE(writer.done());
      auto reader = create_task(a.get());
      co_await writer;
      CHECK(co_await reader == 4);
      CHECK_FALSE(static_cast<bool>(a.has_waiting_read));
      auto cancelled = create_task(a.get());
      co_await sleep(1ms);
      CHECK(static_cast<bool>(a.has_waiting_read));
      cancelled.cancel();
      co_await wait_done(cancelled);
      CHECK_FALSE(static_cast<bool>(a.has_waiting_read));  // restored on cancellation
      auto throwing = create_task(a.get({.predicate = [](const int&) -> bool { throw std::runtime_error("pred"); }}));
      co_await wait_done(throwing);
      CHECK_THROWS_AS(throwing.result(), std::runtime_error);
      CHECK_FALSE(static_cast<bool>(a.has_waiting_read));  // restored when get throws
      CHECK_FALSE(a.condition().locked());
    }());
  }

  TEST_CASE("an accessor destroyed while its coroutines wait: they hold the shared state, never the accessor") {
    testing::run_bounded([]() -> coroutine<void> {
      auto cond = std::make_shared<condition>();
      auto a = std::make_unique<accessor<int>>(accessor_options{.condition = cond, .name = "gone"});
      auto writer = create_task(a->set(5, true));  // waits for a reader
      auto unstarted = a->set(6, true);             // a lazy coroutine, not started yet
      auto until_reader = create_task([](const awaitable_predicate& p) -> coroutine<void> { co_await p; }(a->has_waiting_read));
      co_await sleep(1ms);
      CHECK_FALSE(writer.done());
      CHECK_FALSE(until_reader.done());
      auto reader = create_task(a->get());  // not started before the accessor goes
      a.reset();
      CHECK(co_await reader == 5);  // the reader came, the writer went on, the reader saw its value
      co_await writer;
      co_await until_reader;
      auto late = create_task(std::move(unstarted));
      co_await sleep(1ms);
      CHECK_FALSE(late.done());  // waits for a reader that can no longer come: cancel ends it
      late.cancel();
      co_await wait_done(late);
      CHECK(late.cancelled());
      CHECK_FALSE(cond->locked());
    }());
  }

  TEST_CASE("an owner destroyed with its custom accessor while a get() waits: cancelled_error, the getter never called") {
    testing::run_bounded([]() -> coroutine<void> {
      auto cond = std::make_shared<condition>();
      struct owner {
        int value = 1;
        accessor<int> acc;
        explicit owner(std::shared_ptr<condition> c)
            : acc([this] { return value; }, [this](int v) { value = v; }, {.condition = std::move(c), .name = "owned"}) {}
      };
      auto o = std::make_unique<owner>(cond);
      accessor<int> sibling({.condition = cond, .name = "sibling"});  // shares the condition
      auto reader = create_task(o->acc.get());  // waits for a write
      co_await sleep(0s);
      auto unstarted = create_task(o->acc.set(2));  // created now, runs after the owner is gone
      o.reset();
      co_await sibling.set(3);  // notifies the shared condition: the orphaned reader wakes
      co_await wait_done(reader);
      co_await wait_done(unstarted);
      CHECK_THROWS_AS(reader.result(), cancelled_error);
      CHECK_THROWS_AS(unstarted.result(), cancelled_error);
      CHECK_FALSE(cond->locked());
    }());
  }

  TEST_CASE("shared conditions, printing, empty functions and empty values") {
    auto cond = std::make_shared<condition>();
    accessor<int> a({.condition = cond, .name = "a"});
    accessor<int> b([] { return 1; }, [](int) {}, {.condition = cond, .name = ""});
    CHECK(&a.condition() == &b.condition());
    std::ostringstream out;
    out << a << ' ' << b;
    CHECK(out.str() == "accessor(name='a', custom_getter=False, custom_setter=False) accessor(name=None, custom_getter=True, custom_setter=True)");
    const accessor<int>::getter no_getter;
    const accessor<int>::setter no_setter;
    CHECK_THROWS_AS(accessor<int>(no_getter, [](int) {}), std::invalid_argument);
    CHECK_THROWS_AS(accessor<int>([] { return 0; }, no_setter), std::invalid_argument);
    struct no_default {
      explicit no_default(int) {}
    };
    accessor<no_default> empty;
    CHECK_THROWS_AS(empty.value(), invalid_state_error);
    CHECK(a.value() == 0);
  }
}
#endif
