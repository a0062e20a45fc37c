// registry<Derived>: codestare's RegistryMeta / Registry. A class lists its live instances,
// keyed by a member it names (or a default key), in Derived::registry().
#pragma once

#include "../platform/config.hpp"

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <ostream>
#if ASYNC_UTILS_DEFINITIONS
#include <sstream>
#endif
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__cpp_rtti) || defined(__GXX_RTTI)
#if ASYNC_UTILS_DEFINITIONS
#include <cxxabi.h>
#endif
#include <typeinfo>
#endif

namespace codestare::async_utils {
namespace detail {

/// The name of T as __PRETTY_FUNCTION__ spells it (used where RTTI is off).
template <class T>
std::string_view pretty_type_name() noexcept {
  std::string_view s = __PRETTY_FUNCTION__;
  const std::size_t begin = s.find("T = ");
  if (begin == std::string_view::npos) return s;
  s.remove_prefix(begin + 4);
  const std::size_t end = s.find_first_of(";]");
  return end == std::string_view::npos ? s : s.substr(0, end);
}

#if defined(__cpp_rtti) || defined(__GXX_RTTI)
ASYNC_UTILS_LINK std::string demangle(const std::type_info& type);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::string demangle(const std::type_info& type) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> name(abi::__cxa_demangle(type.name(), nullptr, nullptr, &status), std::free);
  return status == 0 && name ? std::string(name.get()) : std::string(type.name());
}
#endif  // ASYNC_UTILS_DEFINITIONS
#endif

/// The qualified name of T ("T" for a class T at global scope, "ns::T" in a namespace).
template <class T>
std::string type_name() {
#if defined(__cpp_rtti) || defined(__GXX_RTTI)
  return demangle(typeid(T));
#else
  return std::string(pretty_type_name<T>());
#endif
}

/// The name of the dynamic type of `object` when T is polymorphic (and RTTI is on).
template <class T>
std::string dynamic_type_name(const T& object) {
#if defined(__cpp_rtti) || defined(__GXX_RTTI)
  if constexpr (std::is_polymorphic_v<T>) return demangle(typeid(object));
#endif
  (void)object;
  return type_name<T>();
}

/// Python's repr of a str: single quotes, with backslashes, quotes and control characters escaped.
ASYNC_UTILS_LINK std::string python_repr(std::string_view text);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::string python_repr(std::string_view text) {
  std::string out = "'";
  for (char c : text) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '\'': out += "\\'"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          static const char hex[] = "0123456789abcdef";
          out += "\\x";
          out += hex[(c >> 4) & 0xf];
          out += hex[c & 0xf];
        } else {
          out += c;
        }
    }
  }
  return out + "'";
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// A registry key as a string: strings as they are, numbers via to_string, else operator<<.
template <class K>
std::string key_to_string(const K& key) {
  if constexpr (std::is_convertible_v<const K&, std::string>) return std::string(key);
  else if constexpr (std::is_convertible_v<const K&, std::string_view>) return std::string(std::string_view(key));
  else if constexpr (std::is_arithmetic_v<K> && !std::is_same_v<K, bool> && !std::is_same_v<K, char>) return std::to_string(key);
  else {
    static_assert(requires(std::ostream& os) { os << key; }, "registry: the unique_key member must be a string, a number or printable with operator<<");
    std::ostringstream os;
    os << key;
    return os.str();
  }
}

}  // namespace detail

/// Tag for a registered object that becomes visible only when its constructor calls publish()
/// (see registered<Derived>: the thread-safe pattern for keys stored in the object).
struct defer_registration_t {
  explicit defer_registration_t() = default;
};
inline constexpr defer_registration_t defer_registration{};

template <class Derived>
class registered;

/// What Derived::registry() returns: a std::map from key to instance (so it is used as one),
/// which also remembers the creation order, for printing like the Python dict.
template <class Derived>
class registry_snapshot : public std::map<std::string, Derived*> {
 public:
  using map_type = std::map<std::string, Derived*>;
  registry_snapshot() = default;

  /// The keys in the order their first live instance was created (the dict's order).
  const std::vector<std::string>& creation_order() const noexcept { return order_; }

  /// `{'foo': T(name='foo'), 'bar': T(name='bar')}`: the Python dict repr, each instance
  /// shown with its operator<< (or `<type object>` when it has none). The instances must be
  /// alive when it is printed.
  friend std::ostream& operator<<(std::ostream& os, const registry_snapshot& snapshot) {
    os << '{';
    bool first = true;
    for (const std::string& key : snapshot.order_) {
      auto it = snapshot.find(key);
      if (it == snapshot.end()) continue;
      if (!first) os << ", ";
      first = false;
      os << detail::python_repr(key) << ": ";
      if (it->second == nullptr) {
        os << "None";
      } else if constexpr (requires(const Derived& d) { os << d; }) {
        os << *it->second;
      } else {
        os << '<' << detail::dynamic_type_name(*it->second) << " object>";
      }
    }
    return os << '}';
  }
  friend std::string to_string(const registry_snapshot& snapshot) {
    std::ostringstream os;
    os << snapshot;
    return os.str();
  }

 private:
  friend class registered<Derived>;
  std::vector<std::string> order_;
};

/// codestare's RegistryMeta / Registry, as a CRTP base (usually spelled `registry<Derived>`):
///
///     struct T : registry<T> {
///       std::string name;
///       static constexpr auto unique_key = &T::name;  // optional: data member or member function,
///     };                                              // declared before this line
///     T::registry();  // {"foo": T*, ...}, a snapshot of the live instances
///
/// - Key: the member named by `Derived::unique_key` when Derived declares one, else the default
///   key "<qualified type name>_<number of instances created before>" (the dynamic type when
///   Derived is polymorphic). Keys are read when the registry is read, so a key computed by a
///   member function may change; when live instances share a key, the most recent one is listed.
/// - Instances of classes derived from Derived are listed in Derived::registry() as Derived*.
/// - Instances leave the registry when destroyed (the original's weak references).
/// - A copy (or a move) is a new instance: it registers itself with a new number. Assignment
///   changes nothing in the registry (a key member that changes is read as it is).
/// - Thread-safe: registry(), key_in_use() and (un)registration take one mutex per Derived.
///   An instance is visible from its base constructor to its base destructor; if other threads
///   read the registry while a key member of Derived is still being constructed or already
///   destroyed, that read races. For keys stored in the object under concurrency, construct the
///   base with `registry_base(defer_registration)`, call publish() (or publish_unique()) at the end of the
///   constructor and withdraw() at the start of the destructor.
template <class Derived>
class registered {
 public:
  /// Names this base inside Derived, where `registry` means the static member function:
  /// `careful(...) : registry_base(defer_registration) { ...; publish(); }`.
  using registry_base = registered;

  /// Mapping registry_key() -> instance, of the live (published) instances.
  static registry_snapshot<Derived> registry() {
    auto& s = state();
    std::lock_guard guard(s.mutex);
    registry_snapshot<Derived> snapshot;
    for (const auto& [number, entry] : s.live) {
      Derived* object = entry->self();
      auto [it, inserted] = snapshot.try_emplace(entry->registry_key(), object);
      if (inserted) snapshot.order_.push_back(it->first);
      else it->second = object;  // the most recently created one wins, keeping the first position
    }
    return snapshot;
  }

  /// True when a live (published) instance currently has this key.
  static bool key_in_use(const std::string& key) {
    auto& s = state();
    std::lock_guard guard(s.mutex);
    for (const auto& [number, entry] : s.live)
      if (entry->registry_key() == key) return true;
    return false;
  }

  /// The key this instance is listed under (the original's __registry_key__).
  std::string registry_key() const {
    const Derived& self = *static_cast<const Derived*>(this);
    if constexpr (requires { Derived::unique_key; }) {
      static_assert(std::is_member_pointer_v<std::remove_cvref_t<decltype(Derived::unique_key)>>,
                    "registry: unique_key must point at a member, e.g. `static constexpr auto unique_key = &T::name;`");
      return detail::key_to_string(std::invoke(Derived::unique_key, self));
    } else {
      return default_key();
    }
  }
  /// "<qualified type name>_<n>", n = the number of instances created before this one.
  std::string default_key() const {
    return detail::dynamic_type_name(*static_cast<const Derived*>(this)) + "_" + std::to_string(number_);
  }
  /// True while the instance is listed (false before publish() of a deferred one, after withdraw()).
  bool is_registered() const {
    auto& s = state();
    std::lock_guard guard(s.mutex);
    return listed_;
  }

 protected:
  registered() : number_(next_number()) { publish(); }
  /// Creates the instance unlisted; the constructor of Derived calls publish() when ready.
  explicit registered(defer_registration_t) : number_(next_number()) {}
  registered(const registered&) : registered() {}
  registered(registered&&) : registered() {}
  registered& operator=(const registered&) noexcept { return *this; }
  registered& operator=(registered&&) noexcept { return *this; }
  ~registered() { withdraw(); }

  /// Lists this instance (idempotent).
  void publish() {
    auto& s = state();
    std::lock_guard guard(s.mutex);
    if (listed_) return;
    s.live.emplace(number_, this);
    listed_ = true;
  }
  /// Lists this instance unless a live instance has the same key: then throws
  /// std::invalid_argument and leaves it unlisted. Check and insertion are one atomic step.
  void publish_unique() {
    auto& s = state();
    std::lock_guard guard(s.mutex);
    if (listed_) return;
    const std::string key = registry_key();
    for (const auto& [number, entry] : s.live)
      if (entry->registry_key() == key) throw std::invalid_argument("registry: the key " + detail::python_repr(key) + " is already used by a live instance");
    s.live.emplace(number_, this);
    listed_ = true;
  }
  /// Removes this instance from the registry (idempotent; the destructor calls it).
  void withdraw() noexcept {
    auto& s = state();
    std::lock_guard guard(s.mutex);
    if (!listed_) return;
    s.live.erase(number_);
    listed_ = false;
  }

 private:
  struct shared_state {
    std::recursive_mutex mutex;  // recursive: a key function may read the registry itself
    std::map<std::uint64_t, registered*> live;  // by creation number: the creation order
    std::uint64_t created = 0;
  };
  static shared_state& state() {
    static shared_state s;
    return s;
  }
  static std::uint64_t next_number() {
    auto& s = state();
    std::lock_guard guard(s.mutex);
    return s.created++;
  }
  Derived* self() noexcept { return static_cast<Derived*>(this); }

  std::uint64_t number_;
  bool listed_ = false;
};

/// The spelling of the SPEC: `struct item : registry<item>` (a class cannot be named like its
/// own static member `registry()`, hence the alias).
template <class Derived>
using registry = registered<Derived>;

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
#include <atomic>
#include <thread>

// Test types at namespace scope, so their qualified names are predictable.
namespace registry_tests {
using codestare::async_utils::registry;
struct T : registry<T> {
  std::string name;
  static constexpr auto unique_key = &T::name;
  explicit T(std::string n) : name(std::move(n)) {}
  friend std::ostream& operator<<(std::ostream& os, const T& t) { return os << "T(name=" << codestare::async_utils::detail::python_repr(t.name) << ')'; }
};
struct plain : registry<plain> {};
struct shape : registry<shape> {
  virtual ~shape() = default;
};
struct circle : shape {};
struct dynamic : registry<dynamic> {
  int counter = 0;
  std::string label() const { return "dyn-" + std::to_string(counter); }
  static constexpr auto unique_key = &dynamic::label;
};
struct numbered : registry<numbered> {
  int id;
  static constexpr auto unique_key = &numbered::id;
  explicit numbered(int i) : id(i) {}
};
/// The thread-safe pattern: published at the end of the constructor, withdrawn first thing.
struct careful : registry<careful> {
  std::string name;
  static constexpr auto unique_key = &careful::name;
  explicit careful(std::string n) : registry_base(codestare::async_utils::defer_registration), name(std::move(n)) { publish_unique(); }
  ~careful() { withdraw(); }
};
}  // namespace registry_tests

TEST_SUITE("registry") {
  using namespace codestare::async_utils;
  using namespace registry_tests;

  TEST_CASE("the RegistryMeta example of the reference documentation") {
    std::ostringstream out;
    {
      auto a = std::make_unique<T>("foo");
      out << T::registry() << '\n';
      out << T::registry() << '\n';  // gc.collect(): nothing to collect, `a` is alive
      auto previous = std::exchange(a, std::make_unique<T>("bar"));
      out << T::registry() << '\n';  // the REPL still holds the first one
      previous.reset();              // gc.collect()
      out << T::registry() << '\n';
    }
    CHECK(out.str() ==
          "{'foo': T(name='foo')}\n"
          "{'foo': T(name='foo')}\n"
          "{'foo': T(name='foo'), 'bar': T(name='bar')}\n"
          "{'bar': T(name='bar')}\n");
    CHECK(T::registry().empty());
    CHECK(to_string(T::registry()) == "{}");
  }

  TEST_CASE("a snapshot is a std::map of live instances") {
    T x("x");
    std::map<std::string, T*> m = T::registry();
    CHECK(m == std::map<std::string, T*>{{"x", &x}});
    CHECK(x.registry_key() == "x");
    CHECK(T::key_in_use("x"));
    CHECK_FALSE(T::key_in_use("y"));
  }

  TEST_CASE("default keys: qualified type name and number of instances created before") {
    auto first = std::make_unique<plain>();
    const std::string k = first->registry_key();
    CHECK(k.rfind("registry_tests::plain_", 0) == 0);
    const auto n = std::stoul(k.substr(std::string("registry_tests::plain_").size()));
    plain second;
    CHECK(second.registry_key() == "registry_tests::plain_" + std::to_string(n + 1));
    CHECK(plain::registry().size() == 2);
    first.reset();
    auto r = plain::registry();
    REQUIRE(r.size() == 1);
    CHECK(r.begin()->second == &second);
    CHECK(r.begin()->first == second.registry_key());
    // No operator<<: the instance is shown by its type.
    CHECK(to_string(r) == "{'" + second.registry_key() + "': <registry_tests::plain object>}");
  }

  TEST_CASE("instances of derived classes appear in the base registry, under their own type") {
    shape s;
    circle c;
    auto r = shape::registry();
    CHECK(r.size() == 2);
    CHECK(r.at(c.registry_key()) == &c);
    CHECK(c.registry_key().rfind("registry_tests::circle_", 0) == 0);
    CHECK(s.registry_key().rfind("registry_tests::shape_", 0) == 0);
    CHECK(circle::registry().size() == 2);  // the inherited registry is the base's
  }

  TEST_CASE("keys computed by a member function are read when the registry is read") {
    dynamic d;
    CHECK(dynamic::registry().count("dyn-0") == 1);
    d.counter = 5;
    auto r = dynamic::registry();
    CHECK(r.count("dyn-0") == 0);
    CHECK(r.at("dyn-5") == &d);
    numbered a(1), b(2);
    CHECK(numbered::registry().count("2") == 1);
    b.id = 1;  // now both have the key "1": the most recently created one is listed
    auto shared = numbered::registry();
    CHECK(shared.size() == 1);
    CHECK(shared.at("1") == &b);
  }

  TEST_CASE("copies and moves register as new instances; assignment changes nothing") {
    T a("a");
    T b = a;
    b.name = "b";
    T c = std::move(b);
    c.name = "c";
    b.name = "b";  // the moved-from object is still a live instance
    auto r = T::registry();
    CHECK(r.size() == 3);
    CHECK(r.at("a") == &a);
    CHECK(r.at("c") == &c);
    CHECK(r.at("b") == &b);
    plain p, q;
    const std::string pk = p.registry_key();
    p = q;
    CHECK(p.registry_key() == pk);
    CHECK(plain::registry().size() == 2);
  }

  TEST_CASE("publish_unique refuses a key in use and leaves nothing registered") {
    careful a("one");
    CHECK(a.is_registered());
    try {
      careful b("one");
      FAIL("no exception");
    } catch (const std::invalid_argument& e) {
      CHECK(std::string(e.what()).find("'one'") != std::string::npos);
    }
    auto r = careful::registry();
    CHECK(r.size() == 1);
    CHECK(r.at("one") == &a);
    careful c("two");
    CHECK(careful::registry().size() == 2);
  }

  TEST_CASE("several threads create and destroy instances while another reads") {
    std::atomic<bool> stop{false};
    std::atomic<long> reads{0};
    std::atomic<bool> bad{false};
    std::thread reader([&] {
      while (!stop) {
        for (const auto& [key, ptr] : plain::registry())
          if (key.rfind("registry_tests::plain_", 0) != 0 || ptr == nullptr) bad = true;
        for (const auto& [key, ptr] : careful::registry())
          if (key.rfind("w", 0) != 0 || ptr == nullptr) bad = true;
        ++reads;
      }
    });
    std::vector<std::thread> writers;
    for (int w = 0; w < 4; ++w) {
      writers.emplace_back([w] {
        for (int i = 0; i < 300; ++i) {
          plain p;
          std::vector<plain> more(3);
          careful c("w" + std::to_string(w) + "-" + std::to_string(i));
        }
      });
    }
    for (auto& t : writers) t.join();
    while (reads < 3) std::this_thread::yield();
    stop = true;
    reader.join();
    CHECK_FALSE(bad);
    CHECK(plain::registry().empty());
    CHECK(careful::registry().empty());
  }

  TEST_CASE("python_repr escapes like Python") {
    CHECK(detail::python_repr("a'b\\c\n") == "'a\\'b\\\\c\\n'");
  }
}
#endif
