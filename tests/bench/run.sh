#!/bin/sh
# The benchmark suite (`make bench`): installs missing peers when run as root, then builds and
# runs every workload for every implementation and prints the table.
#   QUICK=1  scaled-down N, under a minute
#   CSV=file also write the table as CSV (workload,impl,per_op_ns,allocs_per_op)
#   ONLY=W8,W3 run only these workloads (C1 only when named)
# Draw the chart afterwards with: python3 tests/bench/plot_ratios.py FILE tests/bench/ratios.png
set -e
case "${CSV:-}" in
  "" | /*) ;;
  *) CSV="$PWD/$CSV" ;;
esac
export CSV
cd "$(dirname "$0")"

missing=""
if command -v dpkg >/dev/null 2>&1; then
  for pkg in libboost-dev libuv1-dev python3-uvloop; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing peers:$missing" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >&2
  else
    echo "missing peers:$missing (run as root to install them; those peers show n/a)" >&2
  fi
fi

# asyncio and uvloop must run on the system interpreter, where python3-uvloop lives.
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
exec "$PY" run_bench.py
