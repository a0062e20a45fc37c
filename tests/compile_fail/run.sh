#!/usr/bin/env bash
# Compile-failure tests: each case must fail to compile with the message its first line names
# ("// expect: TEXT"); control.cpp ("// expect: COMPILES") must compile, so a broken prelude
# cannot pass for a good error. Usage: run.sh CXX; prints one line per case, exits 1 on failure.
set -u
cd "$(dirname "$0")/../.." || exit 2
cxx=${1:-g++}
failed=0
for f in tests/compile_fail/*.cpp; do
  expect=$(sed -n '1s|^// expect: ||p' "$f")
  out=$("$cxx" -std=c++20 -Wall -Wextra -Wpedantic -Werror -fsyntax-only -I. -Itests/compile_fail "$f" 2>&1)
  rc=$?
  if [ "$expect" = COMPILES ]; then
    if ((rc == 0)); then echo "  ok    $cxx compiles ${f##*/}"; else echo "  FAIL  $cxx: ${f##*/} should compile"; echo "$out" | head -5; failed=1; fi
  elif ((rc != 0)) && grep -qF -- "$expect" <<<"$out"; then
    echo "  ok    $cxx rejects ${f##*/}: $expect"
  else
    echo "  FAIL  $cxx: ${f##*/} should fail with: $expect"
    echo "$out" | grep -E 'error' | head -5
    failed=1
  fi
done
exit $failed
