#!/usr/bin/env bash
# Line coverage of src/ reached by replaying the committed corpora (tests/fuzz/corpus/TARGET/).
# Each target is rebuilt against src/ (not the single header, so that lines map to src files)
# with clang's -fprofile-instr-generate -fcoverage-mapping, run once over its corpus
# (libFuzzer -runs=0), and reported per src file with llvm-profdata / llvm-cov (the versions of
# CXX_CLANG: llvm-profdata-14 / llvm-cov-14 for clang++ 14). Usage: tests/fuzz/coverage.sh
# [TARGET...]; prints one table per target and the combined one.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CXX_CLANG=${CXX_CLANG:-clang++}
version=$("$CXX_CLANG" -dumpversion | cut -d. -f1)
PROFDATA=${PROFDATA:-llvm-profdata-$version}
COV=${COV:-llvm-cov-$version}
OUT=$ROOT/tests/build/coverage
targets=${*:-schedule_fuzzer stream_fuzzer}
rm -rf "$OUT" && mkdir -p "$OUT/t/fuzz"
# The targets include "../../async_utils.hpp": here that is a header pointing at src/.
echo "#include \"$ROOT/src/async_utils.hpp\"" >"$OUT/async_utils.hpp"
profiles=()
for t in $targets; do
  cp "tests/fuzz/$t.cpp" "$OUT/t/fuzz/$t.cpp"
  "$CXX_CLANG" -std=c++20 -g -O1 -fsanitize=fuzzer -fprofile-instr-generate -fcoverage-mapping \
    "$OUT/t/fuzz/$t.cpp" -o "$OUT/$t"
  LLVM_PROFILE_FILE="$OUT/$t.profraw" "$OUT/$t" -runs=0 "tests/fuzz/corpus/$t" >"$OUT/$t.log" 2>&1
  "$PROFDATA" merge -sparse "$OUT/$t.profraw" -o "$OUT/$t.profdata"
  profiles+=("$OUT/$t.profdata")
  echo "== $t ($(ls "tests/fuzz/corpus/$t" | wc -l) corpus files)"
  "$COV" report "$OUT/$t" -instr-profile="$OUT/$t.profdata" -ignore-filename-regex='/usr/|tests/' \
    | sed "s|$ROOT/||"
done
if [ "$(echo $targets | wc -w)" -gt 1 ]; then
  "$PROFDATA" merge -sparse "${profiles[@]}" -o "$OUT/all.profdata"
  objects=()
  first=
  for t in $targets; do
    if [ -z "$first" ]; then first=$OUT/$t; else objects+=(-object "$OUT/$t"); fi
  done
  echo "== all targets"
  "$COV" report "$first" "${objects[@]}" -instr-profile="$OUT/all.profdata" -ignore-filename-regex='/usr/|tests/' \
    | sed "s|$ROOT/||"
fi
