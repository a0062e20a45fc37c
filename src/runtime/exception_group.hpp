// exception_group: Python's ExceptionGroup, what a task_group throws when children fail.
// subgroup<E>() and split<E>() do what `except* E` does; nested groups keep their shape.
#pragma once

#include "../platform/config.hpp"
#include "../platform/errors.hpp"

#include <exception>
#include <optional>
#include <ostream>
#if ASYNC_UTILS_DEFINITIONS
#include <sstream>
#endif
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace codestare::async_utils {

/// ExceptionGroup: a message and the exceptions (std::exception_ptr, nested groups kept) that
/// left together. what() reads "message (N sub-exceptions)", as Python's str(); operator<<
/// prints the whole tree.
class exception_group : public std::exception {
 public:
  /// Throws std::invalid_argument for an empty list or a null pointer in it (Python's ValueError
  /// / TypeError).
  exception_group(std::string message, std::vector<std::exception_ptr> exceptions);

  const std::string& message() const noexcept { return message_; }
  const std::vector<std::exception_ptr>& exceptions() const noexcept { return exceptions_; }
  const char* what() const noexcept override { return what_.c_str(); }

  /// The part whose leaves are E (or the whole group when a group is an E), structure and
  /// messages kept; std::nullopt when nothing matches.
  template <class E>
  std::optional<exception_group> subgroup() const {
    return split<E>().first;
  }

  /// {matching, rest}, as `except* E` divides the group; either may be std::nullopt.
  template <class E>
  std::pair<std::optional<exception_group>, std::optional<exception_group>> split() const {
    if constexpr (std::is_base_of_v<E, exception_group>) return {*this, std::nullopt};
    std::vector<std::exception_ptr> match, rest;
    for (const auto& e : exceptions_) {
      if (const auto* inner = as_group(e)) {
        auto [m, r] = inner->split<E>();
        if (m) match.push_back(m->same_object(*inner) ? e : std::make_exception_ptr(std::move(*m)));
        if (r) rest.push_back(r->same_object(*inner) ? e : std::make_exception_ptr(std::move(*r)));
      } else if (is_a<E>(e)) {
        match.push_back(e);
      } else {
        rest.push_back(e);
      }
    }
    auto derive = [this](std::vector<std::exception_ptr>& part) -> std::optional<exception_group> {
      if (part.empty()) return std::nullopt;
      if (part == exceptions_) return *this;
      return exception_group(message_, std::move(part));
    };
    return {derive(match), derive(rest)};
  }

  /// The group and its nested groups, one exception a line, indented by depth.
  friend std::ostream& operator<<(std::ostream& out, const exception_group& group) {
    group.print(out, 0);
    return out;
  }

 private:
  bool same_object(const exception_group& other) const noexcept { return exceptions_ == other.exceptions_ && message_ == other.message_; }

  static const exception_group* as_group(const std::exception_ptr& e);

  template <class E>
  static bool is_a(const std::exception_ptr& e) {
    try {
      std::rethrow_exception(e);
    } catch (const E&) {
      return true;
    } catch (...) {
      return false;
    }
  }

  void print(std::ostream& out, int depth) const;

  std::string message_;
  std::vector<std::exception_ptr> exceptions_;
  std::string what_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK exception_group::exception_group(std::string message, std::vector<std::exception_ptr> exceptions)
    : message_(std::move(message)), exceptions_(std::move(exceptions)) {
  if (exceptions_.empty()) throw std::invalid_argument("exception_group: needs at least one exception");
  for (const auto& e : exceptions_)
    if (!e) throw std::invalid_argument("exception_group: a null exception_ptr");
  what_ = message_ + " (" + std::to_string(exceptions_.size()) + (exceptions_.size() == 1 ? " sub-exception)" : " sub-exceptions)");
}

ASYNC_UTILS_LINK const exception_group* exception_group::as_group(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const exception_group& g) {
    return &g;  // the exception object lives as long as `e` does
  } catch (...) {
    return nullptr;
  }
}

ASYNC_UTILS_LINK void exception_group::print(std::ostream& out, int depth) const {
  out << std::string(static_cast<std::size_t>(depth) * 2, ' ') << "exception_group: " << what_ << '\n';
  for (const auto& e : exceptions_) {
    if (const auto* inner = as_group(e)) {
      inner->print(out, depth + 1);
      continue;
    }
    out << std::string(static_cast<std::size_t>(depth + 1) * 2, ' ');
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      out << ex.what();
    } catch (...) {
      out << "(an exception not derived from std::exception)";
    }
    out << '\n';
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("exception_group") {
  using namespace codestare::async_utils;

  exception_group sample() {
    std::vector<std::exception_ptr> inner{std::make_exception_ptr(std::invalid_argument("bad arg")),
                                          std::make_exception_ptr(timeout_error("slow"))};
    return exception_group("outer", {std::make_exception_ptr(std::runtime_error("boom")),
                                     std::make_exception_ptr(exception_group("inner", std::move(inner))),
                                     std::make_exception_ptr(std::logic_error("oops"))});
  }

  TEST_CASE("message, exceptions and what() as Python's str()") {
    auto g = sample();
    CHECK(g.message() == "outer");
    CHECK(g.exceptions().size() == 3);
    CHECK(std::string(g.what()) == "outer (3 sub-exceptions)");
    exception_group one("m", {std::make_exception_ptr(std::runtime_error("x"))});
    CHECK(std::string(one.what()) == "m (1 sub-exception)");
    CHECK_THROWS_AS(exception_group("empty", {}), std::invalid_argument);
    CHECK_THROWS_AS(exception_group("null", {std::exception_ptr()}), std::invalid_argument);
    CHECK_THROWS_AS(throw g, std::exception);
  }

  TEST_CASE("split and subgroup keep the nesting and the messages") {
    auto g = sample();
    // std::runtime_error matches "boom" and timeout_error (a runtime_error) inside "inner".
    auto [match, rest] = g.split<std::runtime_error>();
    REQUIRE(match);
    REQUIRE(rest);
    std::ostringstream m, r;
    m << *match;
    r << *rest;
    CHECK(m.str() == "exception_group: outer (2 sub-exceptions)\n  boom\n  exception_group: inner (1 sub-exception)\n    slow\n");
    CHECK(r.str() == "exception_group: outer (2 sub-exceptions)\n  exception_group: inner (1 sub-exception)\n    bad arg\n  oops\n");
    // The same exception objects travel: no copies.
    CHECK(match->exceptions()[0] == g.exceptions()[0]);
    CHECK_FALSE(g.subgroup<queue_full>());
    auto all = g.subgroup<std::exception>();  // a group is an std::exception: the whole of it
    REQUIRE(all);
    CHECK(all->exceptions() == g.exceptions());
    auto [none, everything] = g.split<cancelled_error>();
    CHECK_FALSE(none);
    REQUIRE(everything);
    CHECK(everything->exceptions() == g.exceptions());
    auto logic = g.subgroup<std::logic_error>();  // invalid_argument is a logic_error too
    REQUIRE(logic);
    CHECK(logic->exceptions().size() == 2);
  }

  TEST_CASE("printable, with a non-standard exception inside") {
    exception_group g("odd", {std::make_exception_ptr(42)});
    std::ostringstream out;
    out << g;
    CHECK(out.str() == "exception_group: odd (1 sub-exception)\n  (an exception not derived from std::exception)\n");
  }
}
#endif
