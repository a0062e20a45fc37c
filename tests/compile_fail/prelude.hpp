// Shared by the compile-failure cases: a type with a full, a read-only and a write-only property.
#pragma once
#include "async_utils.hpp"
using namespace codestare::async_utils;

struct thing {
  int level_ = 0;
  int level() const { return level_; }
  void set_level(int v) { level_ = v; }
  condition_property<&thing::level, &thing::set_level> full{this, "full"};
  condition_property<&thing::level> read_only{this, "read_only"};
  condition_property<nullptr, &thing::set_level> write_only{this, "write_only"};
};
