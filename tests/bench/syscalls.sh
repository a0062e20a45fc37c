#!/bin/sh
# System calls per W4 / W4idle message (one round trip) for our epoll build, our io_uring build
# and the hand-written epoll floor: `strace -c -f` over a run with N1 and one with N2 rounds; the
# difference divided by the extra messages leaves out setup and teardown.
#   tests/bench/syscalls.sh [N1 N2]      (default 200 1200; builds what is missing)
set -eu
cd "$(dirname "$0")"
N1=${1:-200}
N2=${2:-1200}
B=build
mkdir -p "$B"
CXXFLAGS="-std=c++20 -O2 -DNDEBUG -pthread -I../../src"
[ -x "$B/au_bench" ] || g++ $CXXFLAGS au_bench.cpp -o "$B/au_bench"
[ -x "$B/au_bench_uring" ] || g++ $CXXFLAGS -DASYNC_UTILS_BACKEND_IO_URING au_bench.cpp -o "$B/au_bench_uring"
[ -x "$B/echo_epoll" ] || gcc -O2 -DNDEBUG echo_epoll.c -o "$B/echo_epoll"

calls() {  # calls PROGRAM WORKLOAD N: the total number of system calls
  strace -c -f -o "$B/strace.out" "$B/$1" "$2" "$3" >/dev/null
  awk '$NF == "total" { print $4 }' "$B/strace.out"
}
top() {  # the three most frequent calls of the last run
  awk 'NR > 2 && $NF != "total" && $1 !~ /^-/ { print $4, $NF }' "$B/strace.out" | sort -rn | head -n 3 |
    awk '{ printf "%s%s %s", (NR > 1 ? ", " : ""), $2, $1 }'
}

echo "| workload | program | syscalls per message | most frequent (N=$N2 run) |"
echo "|---|---|---|---|"
for w in W4 W4idle; do
  for p in au_bench au_bench_uring echo_epoll; do
    a=$(calls "$p" "$w" "$N1")
    b=$(calls "$p" "$w" "$N2")
    per=$(awk -v a="$a" -v b="$b" -v n1="$N1" -v n2="$N2" 'BEGIN { printf "%.2f", (b - a) / (32 * (n2 - n1)) }')
    echo "| $w | $p | $per | $(top) |"
  done
done
