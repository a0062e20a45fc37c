#!/usr/bin/env bash
# The opt-in split build (README "Faster builds"): three TUs, one of them the implementation TU,
# build warning-free, link and run; without the implementation TU the link fails (undefined
# references), with two of them too (multiple definitions). Prints "  ok"/"  FAIL" lines.
#   tests/split/run.sh [CXX...]   (default: g++ clang++)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
BUILD=${BUILD:-$PWD/tests/build}/split
mkdir -p "$BUILD"
WARN=${WARN:--std=c++20 -Wall -Wextra -Wpedantic -Werror}
status=0
[ $# -eq 0 ] && set -- "${CXX_GCC:-g++}" "${CXX_CLANG:-clang++}"
ok() { echo "  ok    $1"; }
bad() { echo "  FAIL  $1"; status=1; }
for cxx in "$@"; do
  name=${cxx##*/}
  o=$BUILD/$name
  # shellcheck disable=SC2086
  if ! { "$cxx" $WARN -pthread -O1 -I. -c tests/split/impl.cpp -o "$o.impl.o" &&
    "$cxx" $WARN -pthread -O1 -I. -DASYNC_UTILS_SPLIT -c tests/split/main.cpp -o "$o.main.o" &&
    "$cxx" $WARN -pthread -O1 -I. -DASYNC_UTILS_SPLIT -c tests/split/other.cpp -o "$o.other.o"; } >"$o.build.log" 2>&1; then
    bad "$name: the split TUs do not build warning-free"; sed -n 1,20p "$o.build.log"; continue
  fi
  if "$cxx" -pthread "$o.main.o" "$o.other.o" "$o.impl.o" -o "$o.prog" >"$o.link.log" 2>&1 &&
    out=$(timeout 60 "$o.prog") && [ "$out" = "total=10 line=ping nursery=7" ]; then
    ok "$name: 3 TUs (implementation + 2 with ASYNC_UTILS_SPLIT) link and run"
  else
    bad "$name: the 3-TU split program: ${out:-}$(head -c 600 "$o.link.log")"
  fi
  if "$cxx" -pthread "$o.main.o" "$o.other.o" -o "$o.noimpl" >"$o.noimpl.log" 2>&1; then
    bad "$name: without the implementation TU the program still links"
  elif grep -q "undefined reference" "$o.noimpl.log"; then
    ok "$name: without the implementation TU the link fails (undefined references)"
  else
    bad "$name: without the implementation TU the link fails, but not with undefined references"
  fi
  if [ "$name" = "${CXX_GCC:-g++}" ] || [[ $name == g++* ]]; then
    # The implementation TU turns -Wsubobject-linkage off for the library's code only: a user
    # header included after it still gets the warning.
    printf '#pragma once\nnamespace { struct hidden {}; }\nstruct holder { hidden h; };\n' >"$o.user.hpp"
    printf '#define ASYNC_UTILS_IMPLEMENTATION\n#include "async_utils.hpp"\n#include "%s"\n' "$o.user.hpp" >"$o.impl_user.cpp"
    # shellcheck disable=SC2086
    if "$cxx" $WARN -pthread -I. -fsyntax-only "$o.impl_user.cpp" >"$o.impl_user.log" 2>&1; then
      bad "$name: the implementation TU silences -Wsubobject-linkage past the header"
    elif grep -q "subobject-linkage" "$o.impl_user.log"; then
      ok "$name: -Wsubobject-linkage is off for the library's code only"
    else
      bad "$name: a user header after the implementation TU: $(head -c 600 "$o.impl_user.log")"
    fi
  fi
  cp "$o.impl.o" "$o.impl2.o"
  if "$cxx" -pthread "$o.main.o" "$o.other.o" "$o.impl.o" "$o.impl2.o" -o "$o.twoimpl" >"$o.twoimpl.log" 2>&1; then
    bad "$name: two implementation TUs still link"
  elif grep -q "multiple definition" "$o.twoimpl.log"; then
    ok "$name: two implementation TUs fail to link (multiple definitions)"
  else
    bad "$name: two implementation TUs fail to link, but not with multiple definitions"
  fi
done
exit $status
