#!/usr/bin/env bash
# Runs the checks behind `make test` (or only the steps named as arguments) and ends with exactly
# one line "tests: N passed, M failed". A doctest binary counts its test cases; every other check,
# and every failed build, counts as one test.
#
# Steps: freshness amalgamator layering unit multi_tu split oneliner tests_off kqueue compile_fail readme
#        signals nursery demo parity
#        cppcheck self_contained sanitize valgrind stress fuzz
# (stress: NAME_uring programs run NAME on the io_uring backend, NAME_tsan under TSan)
# Default: all of them but cppcheck and self_contained (`make check`), sanitize and valgrind
# (`make test-sanitize`), stress (`make stress`, STRESS_QUICK=1 for the short version) and fuzz
# (`make fuzz`, FUZZ_TIME).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
BUILD=$PWD/tests/build
CXX_GCC=${CXX_GCC:-g++}
CXX_CLANG=${CXX_CLANG:-clang++}
CXX_CLANG19=${CXX_CLANG19:-clang++-19}  # the newest clang Debian 12 ships (make deps installs it)
WARN=${WARN:--std=c++20 -Wall -Wextra -Wpedantic -Werror}
TIMEOUT=${TIMEOUT:-300}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
STEPS=" ${*:-freshness amalgamator layering unit multi_tu split oneliner tests_off kqueue compile_fail readme signals nursery demo parity} "
# Each compiler (g++, clang++, clang++-19) once and each backend once; the sanitizer builds
# below cover the other pairs (UNIT_FULL=1: every compiler on every backend). A build of the whole suite takes a minute or
# two, and CI's budget counts them.
if [ "${UNIT_FULL:-}" = 1 ]; then
  UNIT_VARIANTS="gcc-epoll gcc-poll gcc-uring clang-epoll clang-poll clang-uring clang19-epoll clang19-poll clang19-uring"
else
  UNIT_VARIANTS="gcc-epoll clang-poll clang19-uring"
fi
# The embedded suite under ASan+UBSan and, separately, TSan. By default each sanitizer runs with
# each compiler once, so that every compiler, backend and sanitizer is covered by four builds
# (a sanitized build of the whole suite takes minutes); SAN_FULL=1 runs all twelve combinations.
if [ "${SAN_FULL:-}" = 1 ]; then
  SAN_VARIANTS="gcc-asan-epoll gcc-asan-poll gcc-asan-uring clang-asan-epoll clang-asan-poll clang-asan-uring
    gcc-tsan-epoll gcc-tsan-poll gcc-tsan-uring clang-tsan-epoll clang-tsan-poll clang-tsan-uring"
else
  SAN_VARIANTS="gcc-asan-epoll clang-asan-uring gcc-tsan-uring clang-tsan-poll"
fi
# Valgrind memcheck runs these suites (the runtime) of a plain -O1 build.
VALGRIND_SUITES=${VALGRIND_SUITES:-coroutine,errors,event_loop,future,gather,intrusive_list,io,job_queue,log,run,shield,task,timer_heap,wait_for}
# Any report fails the run at once; a report that slipped through anyway is caught in the log.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1}
# Stress programs (tests/stress/); those of parts merged later are built once their source exists.
STRESS_PROGRAMS="tasks waits threadsafe reset"
# NAME_uring: the same program on the io_uring backend (the ones that do I/O).
STRESS_PROGRAMS+=" waits_uring reset_uring"
[ -f src/primitives/condition.hpp ] && STRESS_PROGRAMS+=" primitives"
[ -f src/runtime/executor.hpp ] && STRESS_PROGRAMS+=" executor"
[ -f src/utilities/streams.hpp ] && STRESS_PROGRAMS+=" streams"
STRESS_QUICK=${STRESS_QUICK:-}
# The quick version also runs the cross-thread programs under TSan (NAME_tsan).
if [ "$STRESS_QUICK" = 1 ]; then
  STRESS_PROGRAMS+=" threadsafe_tsan"
  [ -f src/runtime/executor.hpp ] && STRESS_PROGRAMS+=" executor_tsan"
fi
STRESS_TIMEOUT=${STRESS_TIMEOUT:-900}
FUZZ_TIME=${FUZZ_TIME:-60}  # per target
# libFuzzer targets tests/fuzz/NAME.cpp, each run FUZZ_TIME seconds from tests/fuzz/corpus/NAME/.
FUZZ_TARGETS="schedule_fuzzer stream_fuzzer"
REPORT_PATTERN='ERROR: (Address|Leak|Memory|Thread|UndefinedBehavior)Sanitizer|WARNING: ThreadSanitizer|runtime error:|ERROR SUMMARY: [1-9]|(definitely|indirectly) lost: [1-9]'

passed=0
failed=0
rc=0 dt_cases='' dt_failed='' single_tu_cases=''

want() { [[ $STEPS == *" $1 "* ]]; }
# A step's heading, with the seconds since the start: CI's budget is read from these.
header() { echo "== $* [at ${SECONDS} s]"; }
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
  [[ $1 == clang19-* ]] && cxx=$CXX_CLANG19
  [[ $1 == *-poll ]] && backend=(-DASYNC_UTILS_BACKEND_POLL)
  [[ $1 == *-uring ]] && backend=(-DASYNC_UTILS_BACKEND_IO_URING)
  # shellcheck disable=SC2086  # WARN is a list of flags
  # -g1: file and line in every trace (Valgrind's too) without the cost of full debug information.
  "$cxx" $WARN -pthread -O1 -g1 -DASYNC_UTILS_TESTS_MAIN "${backend[@]}" \
    -x c++ async_utils.hpp -o "$BUILD/$1"
}

valgrind_build() {  # the gcc-epoll unit build serves Valgrind too when make test just made it
  # (same flags; a compiler leaves no output behind when it fails)
  if [ "$BUILD/gcc-epoll" -nt async_utils.hpp ]; then
    cp -f "$BUILD/gcc-epoll" "$BUILD/valgrind-gcc-epoll"
  else
    compile_unit valgrind-gcc-epoll
  fi
}

compile_san() {  # compile_san VARIANT: the embedded tests under sanitizers (gcc-asan-epoll, ...)
  local cxx=$CXX_GCC backend=() san
  [[ $1 == clang-* ]] && cxx=$CXX_CLANG
  [[ $1 == *-poll ]] && backend=(-DASYNC_UTILS_BACKEND_POLL)
  [[ $1 == *-uring ]] && backend=(-DASYNC_UTILS_BACKEND_IO_URING)
  if [[ $1 == *-tsan-* ]]; then
    san=(-fsanitize=thread)
  else
    # shellcheck disable=SC2054  # the comma belongs to the flag
    san=(-fsanitize=address,undefined -fno-omit-frame-pointer)
    # clang 14's function sanitizer breaks the assembly of coroutines ("Cannot represent a
    # difference across sections").
    [[ $1 == clang-* ]] && san+=(-fno-sanitize=function)
  fi
  # shellcheck disable=SC2086
  # -O0 -g1: half the compile time of -O1 -g (CI's budget is mostly these builds); the checks
  # are instrumentation and do not need the optimiser, and the unit builds run the suite at -O1.
  "$cxx" $WARN -pthread -O0 -g1 "${san[@]}" -fno-sanitize-recover=all -DASYNC_UTILS_TESTS_MAIN \
    "${backend[@]}" -x c++ async_utils.hpp -o "$BUILD/$1"
}

compile_stress() {  # compile_stress NAME: optimised; the quick (CI) version under ASan+UBSan instead
  local flags=(-O2 -g) source=${1%_tsan} backend=()
  [[ $1 == *_uring ]] && source=${1%_uring} backend=(-DASYNC_UTILS_BACKEND_IO_URING)
  # shellcheck disable=SC2054  # the comma belongs to the flag
  [ "$STRESS_QUICK" = 1 ] && flags=(-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  [[ $1 == *_tsan ]] && flags=(-O1 -g -fsanitize=thread)
  mkdir -p "$BUILD/stress"
  # shellcheck disable=SC2086
  "$CXX_GCC" $WARN -pthread "${flags[@]}" "${backend[@]}" "tests/stress/${source}_stress.cpp" -o "$BUILD/stress/$1"
}

compile_fuzz() {  # compile_fuzz TARGET: a libFuzzer target (clang only), with ASan and UBSan
  mkdir -p "$BUILD/fuzz"
  # shellcheck disable=SC2086
  "$CXX_CLANG" $WARN -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize=function \
    -fno-sanitize-recover=all "tests/fuzz/$1.cpp" -o "$BUILD/fuzz/$1"
}

run_fuzz() {  # run_fuzz TARGET: FUZZ_TIME seconds from the committed corpus; prints its figures
  local target=$1 log=$BUILD/fuzz/$1.log runs rate corpus
  # New inputs go to $BUILD/fuzz/corpus_TARGET; tests/fuzz/corpus/TARGET stays as committed.
  mkdir -p "$BUILD/fuzz/corpus_$target"
  timeout -k 10 $((FUZZ_TIME + 120)) "$BUILD/fuzz/$target" -max_total_time="$FUZZ_TIME" -timeout=10 \
    -max_len=512 -print_final_stats=1 -artifact_prefix="$BUILD/fuzz/$target-" \
    "$BUILD/fuzz/corpus_$target" "tests/fuzz/corpus/$target" >"$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  corpus=$(grep -Eo 'corp: [0-9]+' "$log" | tail -n 1 | grep -Eo '[0-9]+')
  fuzz_summary="${runs:-?} runs in ${FUZZ_TIME} s (${rate:-?} exec/s), corpus ${corpus:-?} inputs"
  if ((rc == 0)) && ! grep -Eq "$REPORT_PATTERN|^==[0-9]+== ERROR|invariant broken" "$log"; then return 0; fi
  {
    echo "exit status $rc"
    grep -E "invariant broken|ERROR|SUMMARY|Test unit written|^ *#[0-9] " "$log" | head -n 20
  } >"$BUILD/fuzz_$target.failure"
  return 1
}

compile_multi_tu() {  # compile_multi_tu a|b
  # shellcheck disable=SC2086
  # -O0: this checks linkage (one definition of everything), not the optimiser.
  "$CXX_GCC" $WARN -pthread -O0 -I. -c "tests/multi_tu/$1.cpp" -o "$BUILD/multi_tu_$1.o"
}

oneliner() {  # the exact command of the SPEC, in a directory holding nothing but the header
  local dir=$BUILD/oneliner
  rm -rf "$dir" && mkdir -p "$dir" && cp async_utils.hpp "$dir/" && cd "$dir" &&
    timeout -k 10 "$TIMEOUT" bash -c \
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

run_doctest() {  # run_doctest NAME COMMAND...: runs it; sets rc, dt_cases, dt_failed ('' if no summary)
  local log=$BUILD/$1.run.log line
  timeout -k 10 "$TIMEOUT" "${@:2}" >"$log" 2>&1
  rc=$?
  # A sanitizer or Valgrind report fails the run even if the process exited 0.
  if ((rc == 0)) && grep -Eq "$REPORT_PATTERN" "$log"; then rc=99; fi
  dt_cases='' dt_failed=''
  line=$(grep '^\[doctest\] test cases:' "$log" | tail -n 1)
  if [[ $line =~ test\ cases:\ *([0-9]+)\ *\|\ *[0-9]+\ passed\ *\|\ *([0-9]+)\ failed ]]; then
    dt_cases=${BASH_REMATCH[1]} dt_failed=${BASH_REMATCH[2]}
  fi
  if ((rc == 0)) && [ "$dt_failed" = 0 ]; then return 0; fi
  {
    echo "exit status $rc$( ((rc == 124)) && echo ", timed out after ${TIMEOUT}s")"
    grep -E "(TEST CASE|ERROR|FATAL|Segmentation|Aborted|what\(\)|$REPORT_PATTERN|^ *#[0-9] )" "$log" | head -n 20
    tail -n 5 "$log"
  } >"$BUILD/$1.failure"
  return 1
}

count_doctest() {  # count_doctest NAME COMMAND...: each test case counts; a bad exit alone counts as one
  # The backend the run actually used, as the event_loop suite prints it (io_uring may fall back).
  local backend
  if run_doctest "$@"; then
    backend=$(sed -n 's/^\[async_utils\] backend: //p' "$BUILD/$1.run.log" | head -n 1)
    pass "run $1 ($dt_cases test cases${backend:+, backend $backend})" "$dt_cases"
    return
  fi
  backend=$(sed -n 's/^\[async_utils\] backend: //p' "$BUILD/$1.run.log" | head -n 1)
  [ -n "$backend" ] && echo "        (backend $backend)"
  local bad=${dt_failed:-0}
  passed=$((passed + ${dt_cases:-0} - bad))
  ((bad > 0)) || bad=1  # a crash, a timeout or no summary at all
  fail "run $1 (${dt_failed:-?} of ${dt_cases:-?} test cases failed)" "$bad" "$BUILD/$1.failure"
}

# --- Sequential checks of the generator -------------------------------------------------------
mkdir -p "$BUILD"
rm -f "$BUILD"/*.rc

if want freshness; then
  header "freshness: python3 amalgamate.py --check"
  if python3 amalgamate.py --check >"$BUILD/freshness.log" 2>&1; then
    pass "async_utils.hpp matches src/"
  else
    fail "async_utils.hpp is stale" 1 "$BUILD/freshness.log"
  fi
fi

if want amalgamator; then
  header "amalgamator: python3 tests/test_amalgamate.py"
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

if want layering; then
  header "layering: includes point down platform <- runtime <- primitives <- utilities"
  if python3 tests/layering.py >"$BUILD/layering.log" 2>&1; then
    pass "$(tail -n 1 "$BUILD/layering.log")"
  else
    fail "$(tail -n 1 "$BUILD/layering.log")" 1 "$BUILD/layering.log"
  fi
fi

if want self_contained; then
  header "self_contained: each src/ header compiles alone (g++, clang++; tests off and on)"
  python3 tests/self_contained.py -j "$JOBS" >"$BUILD/self_contained.log" 2>&1
  line=$(grep '^self_contained: ' "$BUILD/self_contained.log")
  if [[ $line =~ ([0-9]+)\ passed,\ ([0-9]+)\ failed ]]; then
    ok=${BASH_REMATCH[1]} bad=${BASH_REMATCH[2]}  # each header, compiler and mode counts
    if ((bad == 0)); then
      pass "each header alone: $ok compiles" "$ok"
    else
      passed=$((passed + ok))
      fail "each header alone: $bad of $((ok + bad)) compiles failed" "$bad" "$BUILD/self_contained.log"
    fi
  else
    fail "self_contained (the script failed)" 1 "$BUILD/self_contained.log"
  fi
fi

# --- Builds and compile-only checks, in parallel ----------------------------------------------
header "builds ($JOBS at a time)"
if want unit; then
  for v in $UNIT_VARIANTS; do start "$v" compile_unit "$v"; done
fi
if want multi_tu; then
  start multi_tu_a compile_multi_tu a
  start multi_tu_b compile_multi_tu b
fi
if want sanitize; then
  for v in $SAN_VARIANTS; do start "$v" compile_san "$v"; done
fi
want valgrind && start valgrind-gcc-epoll valgrind_build
if want stress; then
  for p in $STRESS_PROGRAMS; do start "stress_$p" compile_stress "$p"; done
fi
if want fuzz; then
  for t in $FUZZ_TARGETS; do start "fuzz_build_$t" compile_fuzz "$t"; done
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
want split && start split env BUILD="$BUILD" CXX_GCC="$CXX_GCC" CXX_CLANG="$CXX_CLANG" WARN="$WARN" tests/split/run.sh
if want compile_fail; then  # one compiler after another would leave a core idle
  start compile_fail_gcc tests/compile_fail/run.sh "$CXX_GCC"
  start compile_fail_clang tests/compile_fail/run.sh "$CXX_CLANG"
fi
if want cppcheck; then
  if command -v cppcheck >/dev/null; then
    start cppcheck run_cppcheck
  else
    echo "  skip  cppcheck (not installed)"
  fi
fi
wait
echo "  (builds done at ${SECONDS} s)"

# --- Results, in a fixed order ----------------------------------------------------------------
count_lines() {  # count_lines LOG: a script's own "  ok"/"  FAIL" lines each count as one test
  local ok bad
  ok=$(grep -c '^  ok ' "$1")
  bad=$(grep -c '^  FAIL ' "$1")
  grep -E '^  (ok|FAIL) ' "$1"
  passed=$((passed + ok))
  failed=$((failed + bad))
}

check_job() {  # check_job NAME DESCRIPTION
  if job_ok "$1"; then pass "$2"; else fail "$2" 1 "$BUILD/$1.log"; fi
}

if want unit; then
  header "embedded tests: g++ and clang++, epoll, poll and io_uring (the backend in each name)"
  for v in $UNIT_VARIANTS; do
    if job_ok "$v"; then
      count_doctest "$v" "$BUILD/$v"
      [[ $v == *-epoll && -z $single_tu_cases ]] && single_tu_cases=$dt_cases
    else
      fail "build $v" 1 "$BUILD/$v.log"
    fi
  done
fi

if want sanitize; then
  header "sanitizers: ASan+UBSan and TSan, g++ and clang++, epoll, poll and io_uring"
  for v in $SAN_VARIANTS; do
    if job_ok "$v"; then count_doctest "$v" "$BUILD/$v"; else fail "build $v" 1 "$BUILD/$v.log"; fi
  done
fi

if want valgrind; then
  header "valgrind memcheck: suites $VALGRIND_SUITES"
  if ! command -v valgrind >/dev/null; then
    fail "valgrind is not installed (apt-get install valgrind, or make deps)"
  elif job_ok valgrind-gcc-epoll; then
    count_doctest valgrind valgrind -q --error-exitcode=1 --leak-check=full \
      --errors-for-leak-kinds=definite,indirect "$BUILD/valgrind-gcc-epoll" -ts="$VALGRIND_SUITES"
  else
    fail "build valgrind-gcc-epoll" 1 "$BUILD/valgrind-gcc-epoll.log"
  fi
fi

if want stress; then
  header "stress${STRESS_QUICK:+ (quick, under ASan+UBSan; *_tsan under TSan)}: $STRESS_PROGRAMS"
  results=$BUILD/stress/results.txt
  : >"$results"
  for p in $STRESS_PROGRAMS; do
    if ! job_ok "stress_$p"; then
      fail "build stress $p" 1 "$BUILD/stress_$p.log"
      continue
    fi
    log=$BUILD/stress/$p.log
    # One at a time: each prints its own time and peak RSS.
    timeout -k 10 "$STRESS_TIMEOUT" "$BUILD/stress/$p" ${STRESS_QUICK:+--quick} >"$log" 2>&1
    rc=$?
    grep '^RESULT' "$log" | sed 's/^RESULT /        /' | tee -a "$results"
    if ((rc == 0)) && ! grep -Eq "$REPORT_PATTERN" "$log"; then
      pass "stress $p"
    else
      echo "exit status $rc$( ((rc == 124)) && echo ", timed out after ${STRESS_TIMEOUT}s")" >"$BUILD/stress_$p.failure"
      grep -v '^RESULT' "$log" | head -n 20 >>"$BUILD/stress_$p.failure"
      fail "stress $p" 1 "$BUILD/stress_$p.failure"
    fi
  done
fi

if want fuzz; then
  header "fuzz: tests/fuzz/{${FUZZ_TARGETS// /,}} for ${FUZZ_TIME} s each"
  for t in $FUZZ_TARGETS; do
    if ! job_ok "fuzz_build_$t"; then
      fail "build $t" 1 "$BUILD/fuzz_build_$t.log"
    elif run_fuzz "$t"; then
      pass "$t: $fuzz_summary"
    else
      fail "$t: $fuzz_summary" 1 "$BUILD/fuzz_$t.failure"
    fi
  done
fi

if want multi_tu; then
  header "multi_tu: two translation units with tests on, linked together"
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

if want split; then
  header "split: ASYNC_UTILS_SPLIT in two TUs, ASYNC_UTILS_IMPLEMENTATION in a third; link errors without it or with two"
  count_lines "$BUILD/split.log"
  grep -q '^  \(ok\|FAIL\) ' "$BUILD/split.log" || fail "split (no result)" 1 "$BUILD/split.log"
fi

if want oneliner; then
  header "oneliner: g++ -std=c++20 -DASYNC_UTILS_TESTS_MAIN -x c++ async_utils.hpp -o au_tests && ./au_tests"
  check_job oneliner "the SPEC one-liner builds and passes"
fi

if want tests_off; then
  header "tests_off: tests off, no doctest on the include path"
  check_job tests_off_gcc "g++ builds a tests-off program without doctest"
  check_job tests_off_clang "clang++ builds a tests-off program without doctest"
fi

if want kqueue; then
  header "kqueue: syntax check against tests/kqueue_shim"
  check_job kqueue_gcc "g++ -fsyntax-only -DASYNC_UTILS_BACKEND_KQUEUE"
  check_job kqueue_clang "clang++ -fsyntax-only -DASYNC_UTILS_BACKEND_KQUEUE"
fi


if want compile_fail; then
  header "compile_fail: misuse of condition_property must not compile, with a clear message"
  for c in gcc clang; do
    count_lines "$BUILD/compile_fail_$c.log"
    grep -q '^  \(ok\|FAIL\) ' "$BUILD/compile_fail_$c.log" || fail "compile_fail with $c (no result)" 1 "$BUILD/compile_fail_$c.log"
  done
fi

if want readme; then
  header "readme: every example of README.md compiles, runs and prints what README says"
  CXX_GCC=$CXX_GCC CXX_CLANG=$CXX_CLANG CXX_CLANG19=$CXX_CLANG19 JOBS=$JOBS \
    python3 tests/readme/run_examples.py >"$BUILD/readme.log" 2>&1
  if grep -q '^readme: ' "$BUILD/readme.log"; then
    count_lines "$BUILD/readme.log"
  else
    fail "README examples (the extractor failed)" 1 "$BUILD/readme.log"
  fi
fi

if want signals; then
  header "signals: real processes receive SIGINT, SIGTERM and SIGHUP from kill"
  INCLUDE_DIR=. bash tests/signals/run.sh >"$BUILD/signals.log" 2>&1
  count_lines "$BUILD/signals.log"
fi

if want nursery && [ -f tests/nursery/run.sh ]; then
  header "nursery: processes with two nurseries get SIGINT/SIGTERM/SIGHUP, or a failing child"
  INCLUDE_DIR=. bash tests/nursery/run.sh >"$BUILD/nursery.log" 2>&1
  count_lines "$BUILD/nursery.log"
  grep -q '^  \(ok\|FAIL\) ' "$BUILD/nursery.log" || fail "nursery process tests (no result)" 1 "$BUILD/nursery.log"
fi

if want demo; then
  header "demo: the program of make demo, from the single header: a run, --fault, Ctrl+C"
  bash tests/demo/run.sh >"$BUILD/demo.log" 2>&1
  count_lines "$BUILD/demo.log"
  grep -q '^  \(ok\|FAIL\) ' "$BUILD/demo.log" || fail "demo (no result)" 1 "$BUILD/demo.log"
fi

if want parity; then
  header "parity: tests/parity/ scenarios, asyncio (python3) against this library, traces diffed"
  # Each scenario counts: "ok" and "allowed" (a difference listed in tests/parity/ALLOWED) pass.
  python3 tests/parity/run.py --jobs 2 >"$BUILD/parity.log" 2>&1
  ok=$(grep -cE '^  (ok|allowed) ' "$BUILD/parity.log")
  bad=$(grep -c '^  FAIL ' "$BUILD/parity.log")
  grep -E '^  (ok|allowed|FAIL|note) |^parity: ' "$BUILD/parity.log"
  passed=$((passed + ok))
  failed=$((failed + bad))
  if ! grep -q '^parity: ' "$BUILD/parity.log"; then
    fail "parity runner (no result)" 1 "$BUILD/parity.log"
  elif ((bad > 0)); then
    grep -A 30 '^  FAIL ' "$BUILD/parity.log" | head -n 60 | sed 's/^/        /'
  fi
fi

if want cppcheck && [ -e "$BUILD/cppcheck.rc" ]; then
  header "cppcheck"
  check_job cppcheck "cppcheck --enable=warning async_utils.hpp"
fi

echo "  (all steps done in ${SECONDS} s)"
echo "tests: $passed passed, $failed failed"
((failed == 0))
