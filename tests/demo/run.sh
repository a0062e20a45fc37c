#!/usr/bin/env bash
# Checks `make demo`'s program from the single header: a normal run, its fault injection and
# Ctrl+C each end in a graceful shutdown within their time limit. One "  ok"/"  FAIL" line each.
set -u
cd "$(dirname "$0")/../.." || exit 2
CXX=${CXX:-g++}
BUILD=tests/build/demo_check
mkdir -p "$BUILD"
failed=0
check() {  # check NAME CONDITION-TEXT LOG: prints ok or FAIL with the log
  if eval "$2"; then echo "  ok    demo: $1"; else
    echo "  FAIL  demo: $1"
    sed 's/^/        | /' "$3" | tail -n 15
    failed=1
  fi
}
if ! "$CXX" -std=c++20 -Wall -Wextra -Wpedantic -Werror -pthread -O2 -I. tests/demo/demo.cpp -o "$BUILD/demo" \
  >"$BUILD/build.log" 2>&1; then
  echo "  FAIL  demo: build"
  head -n 20 "$BUILD/build.log"
  exit 1
fi
timeout 20 "$BUILD/demo" --seconds 1 --clients 12 >"$BUILD/run.log" 2>&1
rc=$?
check "a 1-second run echoes, reports and closes everything" \
  '((rc == 0)) && grep -q "^done: " "$BUILD/run.log" && grep -q "closed: the listening socket" "$BUILD/run.log" && grep -q "msg/s" "$BUILD/run.log"' \
  "$BUILD/run.log"
timeout 20 "$BUILD/demo" --seconds 30 --clients 12 --fault >"$BUILD/fault.log" 2>&1
rc=$?
check "--fault: the error is logged with the task's name, the nurseries shut down" \
  '((rc == 1)) && grep -q "client-3:clients" "$BUILD/fault.log" && grep -q "^interrupted: every nursery shut down gracefully" "$BUILD/fault.log" && grep -q "closed: the listening socket" "$BUILD/fault.log"' \
  "$BUILD/fault.log"
timeout 20 "$BUILD/demo" --seconds 30 --clients 12 >"$BUILD/sigint.log" 2>&1 &
pid=$!
sleep 1
kill -INT "$pid"
start=$(date +%s%N)
wait "$pid"
rc=$?
took=$((($(date +%s%N) - start) / 1000000))
check "Ctrl+C (SIGINT): graceful shutdown in ${took} ms" \
  '((rc == 1)) && ((took < 2000)) && grep -q "^interrupted: " "$BUILD/sigint.log" && grep -q "closed: the clients" "$BUILD/sigint.log"' \
  "$BUILD/sigint.log"
exit $failed
