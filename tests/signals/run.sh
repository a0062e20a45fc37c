#!/usr/bin/env bash
# Multi-process signal tests: a real process receives SIGINT, SIGTERM and SIGHUP from kill and
# must run each handler on its loop thread, then exit 0. Backends: epoll (signalfd) and poll
# (self-pipe); loop on the main thread or on a second one. Prints PASS/FAIL per case and a
# final line; exits non-zero on any failure.
#   bash tests/signals/run.sh            (from the repository root)
#   CXX=clang++ INCLUDE_DIR=. bash ...   (another compiler, or the generated header at the root)
set -u
cd "$(dirname "$0")/../.." || exit 2
CXX=${CXX:-g++}
INCLUDE_DIR=${INCLUDE_DIR:-src}
FLAGS="-std=c++20 -Wall -Wextra -Wpedantic -Werror -pthread -O1"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "  ok    $1"; }
fail() {
  failed=$((failed + 1))
  echo "  FAIL  $1: $2"
  [ -f "$3" ] && sed 's/^/      | /' "$3"
}

# wait_for FILE PATTERN SECONDS: true once PATTERN appears in FILE.
wait_for() {
  local i
  for ((i = 0; i < $3 * 20; i++)); do
    grep -q -- "$2" "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}

run_case() {  # run_case NAME BINARY MODE
  local name=$1 bin=$2 mode=$3 out=$WORK/$1.out pid child sig
  : >"$out"
  timeout 30 "$bin" "$mode" >"$out" 2>&1 &
  child=$!
  if ! wait_for "$out" '^ready ' 10; then
    kill -KILL "$child" 2>/dev/null
    wait "$child" 2>/dev/null
    fail "$name" "no ready line" "$out"
    return
  fi
  pid=$(sed -n 's/^ready \([0-9]*\)$/\1/p' "$out" | head -n 1)
  for sig in INT TERM HUP; do
    kill -"$sig" "$pid"
    if ! wait_for "$out" "^got SIG$sig on " 10; then
      kill -KILL "$pid" 2>/dev/null
      wait "$child" 2>/dev/null
      fail "$name" "SIG$sig was not handled" "$out"
      return
    fi
  done
  wait "$child"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    fail "$name" "exit status $rc" "$out"
  elif grep -q 'WRONG thread' "$out"; then
    fail "$name" "a handler ran off the loop thread" "$out"
  elif ! grep -q '^done$' "$out"; then
    fail "$name" "no clean exit" "$out"
  else
    pass "$name"
  fi
}

for backend in epoll poll; do
  define=""
  [ "$backend" = poll ] && define="-DASYNC_UTILS_BACKEND_POLL"
  bin=$WORK/signal_child_$backend
  # shellcheck disable=SC2086
  if ! timeout 300 "$CXX" $FLAGS $define -I"$INCLUDE_DIR" tests/signals/signal_child.cpp -o "$bin" \
    >"$WORK/build_$backend.log" 2>&1; then
    fail "build $backend" "compiler failed" "$WORK/build_$backend.log"
    continue
  fi
  for mode in main thread; do
    run_case "signals-$backend-$mode" "$bin" "$mode"
  done
done

echo "signals: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
