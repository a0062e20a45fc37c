#!/usr/bin/env bash
# Multi-process task_nursery tests: a program with two nurseries (each with an entered async
# context and long-running tasks) is shut down by SIGINT, SIGTERM or SIGHUP from kill, by a
# burst of 1,000 SIGINTs, or by a failing child task; every context must exit exactly once,
# every task stop, and the process exit 0 within a second. One "  ok    <case>" or
# "  FAIL  <case>: why" line per case; exits non-zero on any failure. Backends: epoll and poll.
#   bash tests/nursery/run.sh            (from the repository root)
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
  [ -f "${3:-}" ] && sed 's/^/      | /' "$3"
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
# exactly_once FILE LINE
exactly_once() { [ "$(grep -cx -- "$2" "$1")" -eq 1 ]; }

# start NAME MODE: runs the program in the background until its ready line; sets pid/child.
start() {
  out=$WORK/$1.out
  : >"$out"
  timeout -s KILL 30 "$bin" "$2" >"$out" 2>&1 &
  child=$!
  if ! wait_for "$out" '^ready ' 10; then
    kill -KILL "$child" 2>/dev/null
    wait "$child" 2>/dev/null
    fail "$1" "no ready line" "$out"
    return 1
  fi
  pid=$(sed -n 's/^ready \([0-9]*\)$/\1/p' "$out" | head -n 1)
  sleep 0.1  # the tasks run
}

# finish NAME: waits (at most a second) for the exit; sets rc, or fails the case.
finish() {
  local i
  for ((i = 0; i < 20; i++)); do
    kill -0 "$child" 2>/dev/null || break
    sleep 0.05
  done
  if kill -0 "$child" 2>/dev/null; then
    kill -KILL "$child" 2>/dev/null
    wait "$child" 2>/dev/null
    fail "$1" "still running a second after the shutdown started" "$out"
    return 1
  fi
  wait "$child"
  rc=$?
}

# graceful NAME: the common checks on the output of a shut-down program.
graceful() {
  local name=$1 line
  if [ "$rc" -ne 0 ]; then fail "$name" "exit status $rc" "$out"; return 1; fi
  for line in "enter A" "enter B" "exit A" "exit B" "stopped A1" "stopped A2" "stopped B1" "stopped B2"; do
    if ! exactly_once "$out" "$line"; then fail "$name" "'$line' not printed exactly once" "$out"; return 1; fi
  done
  if [ "$(grep -c 'Shutting down' "$out")" -ne 1 ]; then fail "$name" "not exactly one shutdown" "$out"; return 1; fi
  if ! grep -qx 'done' "$out"; then fail "$name" "no clean exit" "$out"; return 1; fi
  # Contexts exit after the tasks of their nursery stopped.
  if [ "$(grep -nx 'exit A' "$out" | cut -d: -f1)" -lt "$(grep -nx 'stopped A2' "$out" | cut -d: -f1)" ]; then
    fail "$name" "a context exited before the tasks stopped" "$out"; return 1
  fi
}

for backend in epoll poll; do
define=""
[ "$backend" = poll ] && define="-DASYNC_UTILS_BACKEND_POLL"
bin=$WORK/nursery_child_$backend
# shellcheck disable=SC2086
if ! timeout 300 "$CXX" $FLAGS $define -I"$INCLUDE_DIR" tests/nursery/nursery_child.cpp -o "$bin" >"$WORK/build.log" 2>&1; then
  fail "build $backend" "compiler failed" "$WORK/build.log"
  continue
fi

for mode in run forever; do
  for sig in INT TERM HUP; do
    name="$backend-sig$sig-$mode"
    start "$name" "$mode" || continue
    kill -"$sig" "$pid"
    finish "$name" || continue
    graceful "$name" || continue
    if [ "$mode" = run ] && ! { grep -qx 'main returned' "$out" && grep -qx 'remaining 0' "$out"; }; then
      fail "$name" "main did not return with nothing left running" "$out"
    elif [ "$mode" = forever ] && ! grep -qx 'after loop: pending 0' "$out"; then
      fail "$name" "tasks left in the loop" "$out"
    else
      pass "$name"
    fi
  done
done

name=$backend-child-fails
if start "$name" fail && finish "$name"; then
  if ! graceful "$name"; then
    :
  elif ! grep -q '(task worker:A): worker exploded' "$out"; then
    fail "$name" "the error was not logged with the task's name" "$out"
  elif ! grep -qx 'main cancelled: shutdown: .*' "$out"; then
    fail "$name" "main was not cancelled by the shutdown" "$out"
  else
    pass "$name"
  fi
fi

name=$backend-sigint-burst
if start "$name" burst; then
  # 1,000 SIGINTs from one kill: most coalesce in the kernel, the rest arrive while shutting down.
  args=()
  for ((i = 0; i < 1000; i++)); do args+=("$pid"); done
  kill -INT "${args[@]}" 2>/dev/null
  if finish "$name"; then
    if ! graceful "$name"; then
      :
    elif ! grep -qx 'main returned' "$out"; then
      fail "$name" "main did not return" "$out"
    else
      pass "$name"
    fi
  fi
fi

done

echo "nursery: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
