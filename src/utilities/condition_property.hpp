// condition_property: the codestare decorator as a class member that behaves as an accessor.
#pragma once

#include "../platform/config.hpp"
#include "../runtime/test_support.hpp"
#include "../runtime/coroutine.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/task.hpp"
#include "../runtime/run.hpp"
#include "accessor.hpp"

#include <memory>
#include <string>
#include <type_traits>

namespace codestare::async_utils {
namespace detail {

template <auto Member>
struct member_traits;
template <class Owner, class R, R (Owner::*Getter)() const>
struct member_traits<Getter> {
  using owner = Owner;
  using value = std::remove_cvref_t<R>;
};
template <class Owner, class R, R (Owner::*Getter)()>
struct member_traits<Getter> {
  using owner = Owner;
  using value = std::remove_cvref_t<R>;
};
template <class Owner, class A, void (Owner::*Setter)(A)>
struct member_traits<Setter> {
  using owner = Owner;
  using value = std::remove_cvref_t<A>;
};

template <bool HasGetter, auto Getter, auto Setter>
struct property_owner {
  using owner = typename member_traits<Getter>::owner;
  using value = typename member_traits<Getter>::value;
};
template <auto Getter, auto Setter>
struct property_owner<false, Getter, Setter> {
  using owner = typename member_traits<Setter>::owner;
  using value = typename member_traits<Setter>::value;
};

template <class...>
inline constexpr bool always_false = false;

}  // namespace detail

/// codestare's condition_property, declared as a member of Owner over Owner's getter and setter:
///
///     struct sensor {
///       int level() const;
///       void set_level(int);
///       condition_property<&sensor::level, &sensor::set_level> level_property{this, "level"};
///     };
///     co_await s.level_property.set(3);  int v = co_await s.level_property.get();
///
/// It behaves as the accessor the Python descriptor returns, created on first use and cached in
/// the object. Pass nullptr for a missing getter or setter; what cannot work then does not
/// compile. The property pins its owner: Owner cannot be copied or moved by accident.
template <auto Getter, auto Setter = nullptr>
class condition_property {
  static constexpr bool has_getter = !std::is_same_v<decltype(Getter), std::nullptr_t>;
  static constexpr bool has_setter = !std::is_same_v<decltype(Setter), std::nullptr_t>;
  static_assert(has_getter || has_setter, "condition_property needs a getter, a setter or both");
  using types = detail::property_owner<has_getter, Getter, Setter>;

 public:
  using owner_type = typename types::owner;
  using value_type = typename types::value;

  /// Binds the property to its owner; `name` is the accessor's name.
  condition_property(owner_type* owner, std::string name = {}, accessor_options options = {})
      : owner_(owner), options_(std::move(options)) {
    if (!owner_) throw std::invalid_argument("condition_property: null owner");
    if (options_.name.empty()) options_.name = std::move(name);
  }
  condition_property(const condition_property&) = delete;
  condition_property& operator=(const condition_property&) = delete;

  /// Direct assignment is what a plain property allows; here every write must notify readers.
  template <class U>
  condition_property& operator=(U&&) {
    static_assert(detail::always_false<U>, "condition_property: direct assignment is not supported; use co_await prop.set(value)");
    return *this;
  }

  /// accessor::set: writes through Owner's setter under the condition and notifies readers.
  coroutine<void> set(value_type value, bool wait_for_read = false) {
    static_assert(has_setter, "condition_property: can't set attribute (the property has no setter)");
    return get_accessor().set(std::move(value), wait_for_read);
  }
  /// accessor::get: waits as the accessor table says, then reads through Owner's getter.
  coroutine<value_type> get(get_options<value_type> options = {}) {
    static_assert(has_getter, "condition_property: unreadable attribute (the property has no getter)");
    static_assert(has_setter,
                  "condition_property: get() without a setter would wait forever for a write nobody can make; "
                  "give the property a setter");
    return get_accessor().get(std::move(options));
  }
  /// The cached accessor (created on first use).
  accessor<value_type>& get_accessor() {
    if (!accessor_) {
      typename accessor<value_type>::getter getter;
      typename accessor<value_type>::setter setter;
      if constexpr (has_getter) getter = [o = owner_] { return (o->*Getter)(); };
      else getter = []() -> value_type { throw std::logic_error("condition_property: unreadable attribute"); };
      if constexpr (has_setter) setter = [o = owner_](value_type v) { (o->*Setter)(std::move(v)); };
      else setter = [](value_type) { throw std::logic_error("condition_property: can't set attribute"); };
      accessor_ = std::make_unique<accessor<value_type>>(std::move(getter), std::move(setter), options_);
    }
    return *accessor_;
  }
  accessor<value_type>* operator->() { return &get_accessor(); }

 private:
  owner_type* owner_;
  accessor_options options_;
  std::unique_ptr<accessor<value_type>> accessor_;
};

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("condition_property") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  struct sensor {
    int level_ = 0;
    int level() const { return level_; }
    void set_level(int v) {
      if (v < 0) throw std::invalid_argument("negative level");
      level_ = v;
    }
    condition_property<&sensor::level, &sensor::set_level> level_property{this, "level"};
  };

  TEST_CASE("behaves as the accessor of the owner's getter and setter, cached per object") {
    testing::run_bounded([]() -> coroutine<void> {
      sensor s;
      auto& first = s.level_property.get_accessor();
      CHECK(&first == &s.level_property.get_accessor());
      CHECK(first.name() == "level");
      auto reader = create_task(s.level_property.get());
      co_await sleep(0s);
      co_await s.level_property.set(3);
      CHECK(co_await reader == 3);
      CHECK(s.level() == 3);
      CHECK_THROWS_AS(co_await s.level_property.set(-1), std::invalid_argument);
      CHECK(s.level_property->value() == 3);
      sensor other;
      CHECK(&other.level_property.get_accessor() != &first);
    }());
    CHECK_FALSE(std::is_copy_constructible_v<sensor>);
    CHECK_FALSE(std::is_move_constructible_v<sensor>);
  }

  struct gauge {
    int value() const { return 9; }
    condition_property<&gauge::value> value_property{this};
  };

  TEST_CASE("a read-only property still gives an accessor; a null owner is refused") {
    gauge g;
    CHECK(g.value_property->value() == 9);
    CHECK_THROWS_AS(condition_property<&gauge::value>(nullptr), std::invalid_argument);
  }
}
#endif
