#!/usr/bin/env bash
# Runs the checks behind `make test` (or only the steps named as arguments) and ends with exactly
# one line "tests: N passed, M failed". A doctest binary counts its test cases; every other check,
# and every failed build, counts as one test.
#
# Steps: freshness amalgamator unit multi_tu oneliner tests_off kqueue compile_fail readme signals nursery cppcheck
# Default: all of them but cppcheck (which `make check` runs).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
BUILD=$PWD/tests/build
CXX_GCC=${CXX_GCC:-g++}
CXX_CLANG=${CXX_CLANG:-clang++}
WARN=${WARN:--std=c++20 -Wall -Wextra -Wpedantic -Werror}
TIMEOUT=${TIMEOUT:-300}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
STEPS=" ${*:-freshness amalgamator unit multi_tu oneliner tests_off kqueue compile_fail readme signals nursery} "
UNIT_VARIANTS="gcc-epoll gcc-poll clang-epoll clang-poll"

passed=0
failed=0
rc=0 dt_cases='' dt_failed='' single_tu_cases=''

want() { [[ $STEPS == *" $1 "* ]]; }
pass() { passed=$((passed + ${2:-1})); echo "  ok    $1"; }
fail() {  # fail WHAT [COUNT] [LOG]
  failed=$((failed + ${2:-1}))
  echo "  FAIL  $1"
  if [ -n "${3:-}" ] && [ -s "$3" ]; then head -n 25 "$3" | sed 's/^/        | /'; fi
}

# --- Background jobs: at most $JOBS at once; each leaves $BUILD/NAME.log and $BUILD/NAME.rc ----
start() {  # start NAME COMMAND...
  local name=$1
  shift
  while (($(jobs -rp | wc -l) >= JOBS)); do wait -n; done
  echo "  start $name"
  (
    "$@" >"$BUILD/$name.log" 2>&1
    echo $? >"$BUILD/$name.rc"
  ) &
}
job_ok() { [ "$(cat "$BUILD/$1.rc" 2>/dev/null)" = 0 ]; }

# --- Job bodies -----------------------------------------------------------------------------
compile_unit() {  # compile_unit VARIANT: the embedded tests, from the committed single header
  local cxx=$CXX_GCC backend=()
  [[ $1 == clang-* ]] && cxx=$CXX_CLANG
  [[ $1 == *-poll ]] && backend=(-DASYNC_UTILS_BACKEND_POLL)
  # shellcheck disable=SC2086  # WARN is a list of flags
  "$cxx" $WARN -pthread -O1 -g -DASYNC_UTILS_TESTS_MAIN "${backend[@]}" \
    -x c++ async_utils.hpp -o "$BUILD/$1"
}

compile_multi_tu() {  # compile_multi_tu a|b
  # shellcheck disable=SC2086
  "$CXX_GCC" $WARN -pthread -O1 -I. -c "tests/multi_tu/$1.cpp" -o "$BUILD/multi_tu_$1.o"
}

oneliner() {  # the exact command of the SPEC, in a directory holding nothing but the header
  local dir=$BUILD/oneliner
  rm -rf "$dir" && mkdir -p "$dir" && cp async_utils.hpp "$dir/" && cd "$dir" &&
    timeout "$TIMEOUT" bash -c \
      'g++ -std=c++20 -DASYNC_UTILS_TESTS_MAIN -x c++ async_utils.hpp -o au_tests && ./au_tests'
}

tests_off() {  # tests_off CXX NAME: tests off, and doctest absent from every include directory
  local cxx=$1 dir=$BUILD/$2 flags=() d e i=0
  rm -rf "$dir" && mkdir -p "$dir/inc" && cp async_utils.hpp "$dir/inc/" || return 1
  # The compiler's own search list, each directory holding doctest/ replaced by a symlink farm
  # without it; -nostdinc then makes this list the only one.
  while read -r d; do
    if [ -d "$d/doctest" ]; then
      i=$((i + 1))
      mkdir -p "$dir/sys$i"
      for e in "$d"/*; do [ "${e##*/}" = doctest ] || ln -s "$e" "$dir/sys$i/"; done
      d=$dir/sys$i
    fi
    flags+=(-isystem "$d")
  done < <("$cxx" -x c++ -E -v /dev/null 2>&1 >/dev/null |
    sed -n '/^#include <\.\.\.> search starts here:/,/^End of search list/s/^ //p')
  echo "include path: ${flags[*]}"
  echo '#include <doctest/doctest.h>' >"$dir/probe.cpp"
  if "$cxx" -std=c++20 -nostdinc "${flags[@]}" -fsyntax-only "$dir/probe.cpp" 2>/dev/null; then
    echo "doctest is still reachable; the check would prove nothing"
    return 1
  fi
  # shellcheck disable=SC2086
  "$cxx" $WARN -nostdinc "${flags[@]}" -I"$dir/inc" tests/tests_off/main.cpp -o "$dir/main" &&
    "$dir/main" &&
    "$cxx" -std=c++20 -nostdinc "${flags[@]}" -I"$dir/inc" -E tests/tests_off/main.cpp \
      -o "$dir/main.ii" || return 1
  if grep -n doctest "$dir/main.ii" | head -n 5 | grep .; then
    echo "the preprocessed program mentions doctest"
    return 1
  fi
}

kqueue_syntax() {  # kqueue_syntax CXX: the kqueue backend against the declarations-only shim
  # shellcheck disable=SC2086
  "$1" $WARN -fsyntax-only -DASYNC_UTILS_BACKEND_KQUEUE -Itests/kqueue_shim \
    -x c++ async_utils.hpp &&
    "$1" $WARN -fsyntax-only -DASYNC_UTILS_BACKEND_KQUEUE -DASYNC_UTILS_TESTS_MAIN \
      -Itests/kqueue_shim -x c++ async_utils.hpp
}

run_cppcheck() {
  # Suppressed: missingReturn misreads `if constexpr` (and the compilers' -Wreturn-type already
  # guard against the real thing); operatorEqVarError flags the deliberate "copies start
  # unlinked" assignment of intrusive nodes.
  cppcheck --quiet --language=c++ --std=c++20 --enable=warning --error-exitcode=1 \
    --inline-suppr --suppress=missingReturn --suppress=operatorEqVarError async_utils.hpp
}

run_doctest() {  # run_doctest NAME BINARY: runs it; sets rc, dt_cases, dt_failed ('' if no summary)
  local log=$BUILD/$1.run.log line
  timeout "$TIMEOUT" "$2" >"$log" 2>&1
  rc=$?
  dt_cases='' dt_failed=''
  line=$(grep '^\[doctest\] test cases:' "$log" | tail -n 1)
  if [[ $line =~ test\ cases:\ *([0-9]+)\ *\|\ *[0-9]+\ passed\ *\|\ *([0-9]+)\ failed ]]; then
    dt_cases=${BASH_REMATCH[1]} dt_failed=${BASH_REMATCH[2]}
  fi
  if ((rc == 0)) && [ "$dt_failed" = 0 ]; then return 0; fi
  {
    echo "exit status $rc$( ((rc == 124)) && echo ", timed out after ${TIMEOUT}s")"
    grep -E '(TEST CASE|ERROR|FATAL|Segmentation|Aborted|what\(\))' "$log" | head -n 20
    tail -n 5 "$log"
  } >"$BUILD/$1.failure"
  return 1
}

count_doctest() {  # count_doctest NAME BINARY: each test case counts; a bad exit alone counts as one
  if run_doctest "$1" "$2"; then
    pass "run $1 ($dt_cases test cases)" "$dt_cases"
    return
  fi
  local bad=${dt_failed:-0}
  passed=$((passed + ${dt_cases:-0} - bad))
  ((bad > 0)) || bad=1  # a crash, a timeout or no summary at all
  fail "run $1 (${dt_failed:-?} of ${dt_cases:-?} test cases failed)" "$bad" "$BUILD/$1.failure"
}

# --- Sequential checks of the generator -------------------------------------------------------
mkdir -p "$BUILD"
rm -f "$BUILD"/*.rc

if want freshness; then
  echo "== freshness: python3 amalgamate.py --check"
  if python3 amalgamate.py --check >"$BUILD/freshness.log" 2>&1; then
    pass "async_utils.hpp matches src/"
  else
    fail "async_utils.hpp is stale" 1 "$BUILD/freshness.log"
  fi
fi

if want amalgamator; then
  echo "== amalgamator: python3 tests/test_amalgamate.py"
  python3 tests/test_amalgamate.py >"$BUILD/amalgamator.log" 2>&1
  rc=$?
  ran=$(sed -n 's/^Ran \([0-9]*\) tests\{0,1\} .*/\1/p' "$BUILD/amalgamator.log")
  if ((rc == 0)) && [ -n "$ran" ]; then
    pass "amalgamator unit tests ($ran)" "$ran"
  else
    bad=$(grep -Ec '^(FAIL|ERROR):' "$BUILD/amalgamator.log")
    ((bad > 0)) || bad=1
    passed=$((passed + ${ran:-0} - bad > 0 ? ${ran:-0} - bad : 0))
    fail "amalgamator unit tests ($bad of ${ran:-?} failed)" "$bad" "$BUILD/amalgamator.log"
  fi
fi

# --- Builds and compile-only checks, in parallel ----------------------------------------------
echo "== builds ($JOBS at a time)"
if want unit; then
  for v in $UNIT_VARIANTS; do start "$v" compile_unit "$v"; done
fi
if want multi_tu; then
  start multi_tu_a compile_multi_tu a
  start multi_tu_b compile_multi_tu b
fi
want oneliner && start oneliner oneliner
if want tests_off; then
  start tests_off_gcc tests_off "$CXX_GCC" tests_off_gcc
  start tests_off_clang tests_off "$CXX_CLANG" tests_off_clang
fi
if want kqueue; then
  start kqueue_gcc kqueue_syntax "$CXX_GCC"
  start kqueue_clang kqueue_syntax "$CXX_CLANG"
fi
if want cppcheck; then
  if command -v cppcheck >/dev/null; then
    start cppcheck run_cppcheck
  else
    echo "  skip  cppcheck (not installed)"
  fi
fi
wait

# --- Results, in a fixed order ----------------------------------------------------------------
check_job() {  # check_job NAME DESCRIPTION
  if job_ok "$1"; then pass "$2"; else fail "$2" 1 "$BUILD/$1.log"; fi
}

if want unit; then
  echo "== embedded tests: g++ and clang++, epoll and poll"
  for v in $UNIT_VARIANTS; do
    if job_ok "$v"; then
      count_doctest "$v" "$BUILD/$v"
      [[ $v == *-epoll && -z $single_tu_cases ]] && single_tu_cases=$dt_cases
    else
      fail "build $v" 1 "$BUILD/$v.log"
    fi
  done
fi

if want multi_tu; then
  echo "== multi_tu: two translation units with tests on, linked together"
  if job_ok multi_tu_a && job_ok multi_tu_b &&
    "$CXX_GCC" -pthread "$BUILD/multi_tu_a.o" "$BUILD/multi_tu_b.o" -o "$BUILD/multi_tu" \
      >"$BUILD/multi_tu_link.log" 2>&1; then
    # Its test cases are counted by the single-TU runs already: this whole run is one test.
    if ! run_doctest multi_tu "$BUILD/multi_tu"; then
      fail "multi_tu run" 1 "$BUILD/multi_tu.failure"
    elif [ -n "$single_tu_cases" ] && [ "$dt_cases" != "$single_tu_cases" ]; then
      fail "multi_tu ran $dt_cases test cases, the single-TU build $single_tu_cases"
    else
      pass "multi_tu ran each of its $dt_cases test cases once${single_tu_cases:+ (single TU: $single_tu_cases)}"
    fi
  else
    cat "$BUILD"/multi_tu_{a,b}.log "$BUILD/multi_tu_link.log" >"$BUILD/multi_tu.log" 2>/dev/null
    fail "build multi_tu" 1 "$BUILD/multi_tu.log"
  fi
fi

if want oneliner; then
  echo "== oneliner: g++ -std=c++20 -DASYNC_UTILS_TESTS_MAIN -x c++ async_utils.hpp -o au_tests && ./au_tests"
  check_job oneliner "the SPEC one-liner builds and passes"
fi

if want tests_off; then
  echo "== tests_off: tests off, no doctest on the include path"
  check_job tests_off_gcc "g++ builds a tests-off program without doctest"
  check_job tests_off_clang "clang++ builds a tests-off program without doctest"
fi

if want kqueue; then
  echo "== kqueue: syntax check against tests/kqueue_shim"
  check_job kqueue_gcc "g++ -fsyntax-only -DASYNC_UTILS_BACKEND_KQUEUE"
  check_job kqueue_clang "clang++ -fsyntax-only -DASYNC_UTILS_BACKEND_KQUEUE"
fi

count_lines() {  # count_lines LOG: a script's own "  ok"/"  FAIL" lines each count as one test
  local ok bad
  ok=$(grep -c '^  ok ' "$1")
  bad=$(grep -c '^  FAIL ' "$1")
  grep -E '^  (ok|FAIL) ' "$1"
  passed=$((passed + ok))
  failed=$((failed + bad))
}

if want compile_fail; then
  echo "== compile_fail: misuse of condition_property must not compile, with a clear message"
  for cxx in "$CXX_GCC" "$CXX_CLANG"; do
    tests/compile_fail/run.sh "$cxx" >"$BUILD/compile_fail_${cxx##*/}.log" 2>&1
    count_lines "$BUILD/compile_fail_${cxx##*/}.log"
  done
fi

if want readme; then
  echo "== readme: every example of README.md compiles, runs and prints what README says"
  python3 tests/readme/run_examples.py >"$BUILD/readme.log" 2>&1
  if grep -q '^readme: ' "$BUILD/readme.log"; then
    count_lines "$BUILD/readme.log"
  else
    fail "README examples (the extractor failed)" 1 "$BUILD/readme.log"
  fi
fi

if want signals; then
  echo "== signals: real processes receive SIGINT, SIGTERM and SIGHUP from kill"
  INCLUDE_DIR=. bash tests/signals/run.sh >"$BUILD/signals.log" 2>&1
  count_lines "$BUILD/signals.log"
fi

if want nursery; then
  echo "== nursery: task_nursery shutdown in real processes (signals from kill, a failing task)"
  INCLUDE_DIR=. bash tests/nursery/run.sh >"$BUILD/nursery.log" 2>&1
  count_lines "$BUILD/nursery.log"
fi

if want cppcheck && [ -e "$BUILD/cppcheck.rc" ]; then
  echo "== cppcheck"
  check_job cppcheck "cppcheck --enable=warning async_utils.hpp"
fi

echo "tests: $passed passed, $failed failed"
((failed == 0))
