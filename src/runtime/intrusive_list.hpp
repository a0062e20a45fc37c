// An intrusive doubly linked FIFO: waiters live in the awaiting coroutine frame, never on the heap.
#pragma once

#include "../platform/config.hpp"

#include <cstddef>

namespace codestare::async_utils::detail {

/// A link that unlinks itself when destroyed, so a frame destroyed while waiting (a cancelled
/// task, a loop closed with work pending) never leaves a dangling node behind in some queue.
class list_node {
 public:
  list_node() noexcept = default;
  // Copies and moves start unlinked: membership belongs to one object, not to its value.
  list_node(const list_node&) noexcept {}
  list_node& operator=(const list_node&) noexcept { return *this; }
  ~list_node() { unlink(); }

  bool linked() const noexcept { return next_ != nullptr; }
  void unlink() noexcept {
    if (next_ != nullptr) {
      prev_->next_ = next_;
      next_->prev_ = prev_;
      next_ = prev_ = nullptr;
    }
  }

 private:
  template <class T>
  friend class intrusive_list;
  list_node* prev_ = nullptr;
  list_node* next_ = nullptr;
};

/// FIFO of T (which derives from list_node). Non-owning; not copyable.
template <class T>
class intrusive_list {
 public:
  intrusive_list() noexcept { head_.prev_ = head_.next_ = &head_; }
  intrusive_list(const intrusive_list&) = delete;
  intrusive_list& operator=(const intrusive_list&) = delete;
  ~intrusive_list() {
    // Orphan what is still linked so that the nodes' destructors do not touch this list.
    while (!empty()) pop_front();
    head_.prev_ = head_.next_ = nullptr;
  }

  bool empty() const noexcept { return head_.next_ == &head_; }
  T& front() noexcept { return *static_cast<T*>(head_.next_); }
  T& back() noexcept { return *static_cast<T*>(head_.prev_); }

  void push_back(T& item) noexcept {
    list_node& node = item;
    node.unlink();
    node.prev_ = head_.prev_;
    node.next_ = &head_;
    head_.prev_->next_ = &node;
    head_.prev_ = &node;
  }
  T* pop_front() noexcept {
    if (empty()) return nullptr;
    T* item = &front();
    static_cast<list_node*>(item)->unlink();
    return item;
  }
  std::size_t size() const noexcept {
    std::size_t n = 0;
    for (const list_node* node = head_.next_; node != &head_; node = node->next_) ++n;
    return n;
  }
  /// Calls fn(T&) for each item; fn may unlink the item it is given (and only that one).
  template <class F>
  void for_each(F&& fn) {
    for (list_node* node = head_.next_; node != &head_;) {
      list_node* next = node->next_;
      fn(*static_cast<T*>(node));
      node = next;
    }
  }

 private:
  list_node head_;
};

}  // namespace codestare::async_utils::detail

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("intrusive_list") {
  TEST_CASE("FIFO order, unlink on destruction, orphaning on list destruction") {
    using namespace codestare::async_utils::detail;
    struct item : list_node {
      int value = 0;
    };
    intrusive_list<item> list;
    item a, b, c;
    a.value = 1;
    b.value = 2;
    c.value = 3;
    list.push_back(a);
    list.push_back(b);
    list.push_back(c);
    CHECK(list.size() == 3);
    {
      item d;
      list.push_back(d);
      CHECK(list.size() == 4);
    }  // d unlinks itself
    CHECK(list.size() == 3);
    b.unlink();
    CHECK(list.pop_front()->value == 1);
    CHECK(list.pop_front()->value == 3);
    CHECK(list.pop_front() == nullptr);
    item copy = a;  // copies start unlinked
    CHECK_FALSE(copy.linked());
    auto* orphan = new intrusive_list<item>;
    orphan->push_back(a);
    delete orphan;
    CHECK_FALSE(a.linked());
  }
}
#endif
