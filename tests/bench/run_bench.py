#!/usr/bin/env python3
"""Benchmark driver: builds every program, runs each workload for each implementation, prints
the table (and writes it as CSV when CSV=file is set).

    python3 tests/bench/run_bench.py            # full run (about 3-4 minutes on 2 cores)
    QUICK=1 python3 tests/bench/run_bench.py    # scaled-down N, under a minute
    CSV=out.csv python3 tests/bench/run_bench.py
    ONLY=W8 QUICK=1 python3 tests/bench/run_bench.py   # some workloads only (C1 when named)

Python's standard library only. Peers that cannot be built or imported are shown as n/a;
our W2 (condition) and W5 (executor) show "n/a (pending)" until those primitives are merged.
"""
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(HERE, "build")
QUICK = os.environ.get("QUICK", "") not in ("", "0")
CSV_PATH = os.environ.get("CSV", "")
CXX = os.environ.get("CXX", "g++")
CC = os.environ.get("CC", "gcc")
SYS_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

FULL_N = {"W1": 1_000_000, "W2": 200_000, "W3": 1_000_000, "W4": 5_000, "W4S": 5_000, "W4idle": 5_000, "W5": 50_000, "W6": 100_000, "W7": 100_000, "M1": 100_000,
          "W1L": 1_000_000, "M1L": 1_000_000, "W8": 1_000_000}
QUICK_N = {"W1": 100_000, "W2": 20_000, "W3": 100_000, "W4": 500, "W4S": 500, "W4idle": 500, "W5": 5_000, "W6": 20_000, "W7": 20_000, "M1": 20_000,
           "W1L": 100_000, "M1L": 100_000, "W8": 100_000}
N = QUICK_N if QUICK else FULL_N
REPEATS = 1 if QUICK else 5  # native programs: median of REPEATS (min/max in the notes); Python: one run
WORKLOADS = ["W1", "W1L", "W2", "W3", "W4", "W4S", "W4idle", "W5", "W6", "W7", "W8", "M1", "M1L"]
# ONLY=W8,W3: run just these workloads (C1 only when named too).
ONLY = [w.strip() for w in os.environ.get("ONLY", "").split(",") if w.strip()]
if ONLY:
    WORKLOADS = [w for w in WORKLOADS if w in ONLY]
ASIO_THP = "asio+thp"  # Asio with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (W1 only)
OURS_ONLY = ["W4idle"]  # our backends and the epoll floor only
LAZY = ["W1L", "M1L"]  # W1' and M1': lazy coroutines that never become tasks (C++ only)
NO_ASIO = {"W7": "n/a (Boost 1.74: no parallel_group)", "W8": "n/a (Boost 1.74: no coroutine generator)"}
OURS = "async_utils"

UNITS = {"M1": "B/task", "M1L": "B/coroutine", "C1": "s"}
WHAT = {
    "W1": "spawn N tasks returning their index, await all in order (per task)",
    "W2": "condition ping-pong between two tasks (per round trip)",
    "W3": "sleep(0) yield in one task (per yield)",
    "W4": "TCP echo, 32 clients x N x 64 B on 127.0.0.1, one loop (per message)",
    "W4S": "W4 with streams: start_server, open_connection, readexactly, write, drain (per message)",
    "W4idle": "W4 with 1,000 more connections open and idle, each with a pending read (per message)",
    "W5": "sequential run_in_executor round trips (per call)",
    "W6": "N tasks sleeping 0-50 ms, seeded (wall time per timer)",
    "W7": "a task_group / asyncio.TaskGroup with N children, each sleep(0) once (per child)",
    "W8": "async generator of N values consumed with next() / async for (per value)",
    "M1": "resident bytes per idle task blocked on an event (RSS delta)",
    "W1L": "W1': create N lazy coroutine<long>, await each, no tasks (per coroutine)",
    "M1L": "M1': resident bytes per created, never started coroutine<long> (RSS delta)",
    "C1-O0": "compile + link a hello TU, -O0 (CPU seconds)",
    "C1-O2": "compile + link a hello TU, -O2 (CPU seconds)",
    "C1S-O0": "C1 in split mode: the hello TU with ASYNC_UTILS_SPLIT, linked to a prebuilt implementation TU, -O0",
    "C1S-O2": "C1 in split mode, -O2",
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---- building ---------------------------------------------------------------------------------
CXXFLAGS = ["-std=c++20", "-O2", "-DNDEBUG", "-pthread"]


def stale(target, sources):
    if not os.path.exists(target):
        return True
    t = os.path.getmtime(target)
    return any(os.path.getmtime(s) > t for s in sources)


def header_sources():
    out = []
    for d, _, files in os.walk(os.path.join(ROOT, "src")):
        out += [os.path.join(d, f) for f in files if f.endswith(".hpp")]
    return out


def build_one(name, cmd, sources):
    target = os.path.join(BUILD, name)
    if not stale(target, sources):
        return name, True, ""
    proc = subprocess.run(cmd + ["-o", target], capture_output=True, text=True, cwd=HERE)
    if proc.returncode != 0 and os.path.exists(target):
        os.remove(target)
    return name, proc.returncode == 0, proc.stderr


def build_all():
    os.makedirs(BUILD, exist_ok=True)
    src = os.path.join(ROOT, "src")
    hdrs = header_sources() + [os.path.join(HERE, "bench_common.hpp")]
    jobs = [
        ("au_bench", [CXX, *CXXFLAGS, "-I" + src, "au_bench.cpp"], hdrs + [os.path.join(HERE, "au_bench.cpp")]),
        ("au_bench_condition", [CXX, *CXXFLAGS, "-I" + src, "au_bench_condition.cpp"],
         hdrs + [os.path.join(HERE, "au_bench_condition.cpp")]),
        ("au_bench_executor", [CXX, *CXXFLAGS, "-I" + src, "au_bench_executor.cpp"],
         hdrs + [os.path.join(HERE, "au_bench_executor.cpp")]),
        ("au_bench_uring", [CXX, *CXXFLAGS, "-DASYNC_UTILS_BACKEND_IO_URING", "-I" + src, "au_bench.cpp"],
         hdrs + [os.path.join(HERE, "au_bench.cpp")]),
        ("asio_bench", [CXX, *CXXFLAGS, "asio_bench.cpp"],
         [os.path.join(HERE, "asio_bench.cpp"), os.path.join(HERE, "bench_common.hpp")]),
        ("uv_bench", [CC, "-O2", "-DNDEBUG", "uv_bench.c", "-luv"], [os.path.join(HERE, "uv_bench.c")]),
        ("echo_epoll", [CC, "-O2", "-DNDEBUG", "echo_epoll.c"], [os.path.join(HERE, "echo_epoll.c")]),
    ]
    built = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for name, ok, err in pool.map(lambda j: build_one(*j), jobs):
            built[name] = ok
            if not ok:
                first = "\n".join(err.strip().splitlines()[:3])
                log(f"build of {name} failed:\n{first}")
    return built


# ---- running ----------------------------------------------------------------------------------
def run_program(cmd, timeout=300):
    """The program's result line, with the page faults of the whole process (minor and major)
    in extra.page_faults."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            faults = (after.ru_minflt - before.ru_minflt) + (after.ru_majflt - before.ru_majflt)
            r.setdefault("extra", {})["page_faults"] = faults
            return r
    raise RuntimeError(f"{' '.join(cmd)}: no result line")


def python_has_uvloop():
    return subprocess.run([SYS_PYTHON, "-c", "import uvloop"], capture_output=True).returncode == 0


def implementations(built):
    """(impl, workloads, command(workload, n) or None, reason when unavailable)."""
    b = lambda name: os.path.join(BUILD, name)
    py = os.path.join(HERE, "bench_py.py")
    impls = []

    def ours(w, n):
        if w == "W2":
            return [b("au_bench_condition"), w, str(n)] if built["au_bench_condition"] else None
        if w == "W5":
            return [b("au_bench_executor"), w, str(n)] if built["au_bench_executor"] else None
        return [b("au_bench"), w, str(n)] if built["au_bench"] else None

    impls.append((OURS, WORKLOADS, ours, "n/a (pending)", REPEATS))
    # The same program built for the io_uring backend (completion-based sock_* calls).
    impls.append((OURS + "-uring", ["W4", "W4idle"],
                  lambda w, n: [b("au_bench_uring"), w, str(n)] if built["au_bench_uring"] else None,
                  "n/a (build failed)", REPEATS))
    peers = [w for w in WORKLOADS if w not in OURS_ONLY]
    # Boost 1.74 has neither experimental::parallel_group (Asio's nearest to a task group) nor a
    # coroutine generator (experimental::coro): both came in later Boost releases.
    impls.append(("asio", peers, lambda w, n: [b("asio_bench"), w, str(n)] if built["asio_bench"] and w not in NO_ASIO else None,
                  lambda w: NO_ASIO[w] if w in NO_ASIO else "n/a (build failed)", REPEATS))
    # What transparent huge pages alone give Asio on W1: glibc's malloc asked to take its memory
    # in huge pages (glibc 2.35+; the page-fault count in the notes shows whether it took effect).
    impls.append((ASIO_THP, [w for w in ["W1"] if w in WORKLOADS],
                  lambda w, n: ["env", "GLIBC_TUNABLES=glibc.malloc.hugetlb=1", b("asio_bench"), w, str(n)] if built["asio_bench"] else None,
                  "n/a (build failed)", REPEATS))
    impls.append(("libuv", ["W4", "W4S", "W5", "W6"], lambda w, n: [b("uv_bench"), w, str(n)] if built["uv_bench"] else None,
                  "n/a (build failed)", REPEATS))
    impls.append(("epoll-floor", ["W4", "W4S", "W4idle"], lambda w, n: [b("echo_epoll"), w, str(n)] if built["echo_epoll"] else None,
                  "n/a (build failed)", REPEATS))
    native_only = [w for w in WORKLOADS if w not in LAZY and w not in OURS_ONLY]
    impls.append(("asyncio", native_only, lambda w, n: [SYS_PYTHON, py, "asyncio", w, str(n)], "n/a", 1))
    uv_ok = python_has_uvloop()
    impls.append(("uvloop", native_only, lambda w, n: [SYS_PYTHON, py, "uvloop", w, str(n)] if uv_ok else None,
                  "n/a (no uvloop)", 1))
    return impls


def compile_cpu(cmd, cwd):
    """CPU seconds (user + sys) and wall seconds of one compiler run, or None when it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        log(f"C1 failed: {' '.join(cmd)}: {proc.stderr.strip()[:300]}")
        return None
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def measure_compile(built_dir):
    """C1: CPU seconds (user + sys of the compiler and linker) for each hello TU; best of two.
    C1S: the same hello TU in split mode (ASYNC_UTILS_SPLIT), compiled and linked against an
    implementation object built once beforehand (its cost is in the notes), as a project with
    many TUs pays it once; Asio's row repeats its C1 time."""
    rows = []
    src = os.path.join(ROOT, "src")
    # Boost 1.74 enables co_await for clang only with libc++'s <experimental/coroutine>; with
    # libstdc++'s <coroutine> it has to be told.
    asio_coro = ["-DBOOST_ASIO_HAS_CO_AWAIT", "-DBOOST_ASIO_HAS_STD_COROUTINE"] if "clang" in os.path.basename(CXX) else []
    for opt in ("O0", "O2"):
        base = [CXX, "-std=c++20", f"-{opt}", "-DNDEBUG", "-pthread"]
        impl_obj = os.path.join(built_dir, f"c1_impl_{opt}.o")
        impl_tu = os.path.join(built_dir, "c1_impl.cpp")
        with open(impl_tu, "w") as f:
            f.write("#define ASYNC_UTILS_IMPLEMENTATION\n#include \"async_utils.hpp\"\n")
        impl_cost = compile_cpu(base + ["-I" + src, "-c", impl_tu, "-o", impl_obj], HERE)
        variants = ((f"C1-{opt}", OURS, ["-I" + src, "c1_hello_au.cpp"]),
                    (f"C1-{opt}", "asio", asio_coro + ["c1_hello_asio.cpp"]),
                    (f"C1S-{opt}", OURS, ["-I" + src, "-DASYNC_UTILS_SPLIT", "c1_hello_au.cpp", impl_obj]))
        asio_row = None
        for workload, impl, args in variants:
            out = os.path.join(built_dir, f"c1_{impl}_{workload}")
            best = None
            if workload.startswith("C1S") and impl_cost is None:
                args = None
            for _ in range(1 if QUICK or args is None else 2):
                r = compile_cpu(base + args + ["-o", out], HERE)
                if r is None:
                    best = None
                    break
                if best is None or r[0] < best[0]:
                    best = r
            if best and subprocess.run([out], capture_output=True).returncode != 0:
                best = None
            extra = {"wall_s": round(best[1], 2)} if best else {}
            note = "" if best else "n/a (compile failed)"
            if workload.startswith("C1S") and impl_cost:
                note = f"+ {impl_cost[0]:.2f} s once for the implementation TU"
            row = {"workload": workload, "impl": impl, "per_op_ns": best[0] * 1e9 if best else None,
                   "allocs_per_op": None, "extra": extra, "note": note}
            rows.append(row)
            if impl == "asio":
                asio_row = row
        if asio_row:
            rows.append(dict(asio_row, workload=f"C1S-{opt}",
                             note="same run as C1" if asio_row["per_op_ns"] is not None else asio_row["note"]))
    return rows


# ---- the table --------------------------------------------------------------------------------
def fmt_value(workload, v):
    if v is None:
        return None
    if workload.startswith("M1"):
        return f"{v:,.0f} B"
    if workload.startswith("C1"):
        return f"{v / 1e9:.2f} s"
    if v >= 1e6:
        return f"{v / 1e6:,.2f} ms"
    if v >= 1e4:
        return f"{v / 1e3:,.1f} us"
    return f"{v:,.1f} ns"


def notes_of(r):
    parts = []
    ex = r.get("extra") or {}
    if "msgs_per_s" in ex:
        parts.append(f"{ex['msgs_per_s']:,.0f} msg/s")
    if "overshoot_ms" in ex:
        parts.append(f"overshoot {ex['overshoot_ms']:.1f} ms")
    if "frame_bytes" in ex:
        parts.append(f"frame {ex['frame_bytes']} B")
    if "heap_bytes_per_task" in ex:
        parts.append(f"heap {ex['heap_bytes_per_task']:.0f} B/task")
    if "page_faults" in ex and r["workload"] == "W1":
        parts.append(f"{ex['page_faults']:,} page faults")
    if "wall_s" in ex:
        parts.append(f"wall {ex['wall_s']} s")
    if r.get("spread") and r["spread"][2] > 1:
        lo, hi, k = r["spread"]
        parts.append(f"min {fmt_value(r['workload'], lo)} max {fmt_value(r['workload'], hi)} of {k}")
    if r.get("note"):
        parts.append(r["note"])
    return "; ".join(parts)


def table(rows):
    by_w = {}
    for r in rows:
        by_w.setdefault(r["workload"], []).append(r)
    lines = []
    header = ["workload", "impl", "per op", "ratio peer/ours", "allocs/op", "notes"]
    body = []
    for w, rs in by_w.items():
        ours = next((r for r in rs if r["impl"] == OURS), None)
        base = ours["per_op_ns"] if ours else None
        for r in rs:
            v = r["per_op_ns"]
            shown = fmt_value(w, v) or (r.get("note") or "n/a")
            if r["impl"] == OURS or v is None or not base:
                ratio = "-" if r["impl"] == OURS else ""
            else:
                ratio = f"{v / base:.2f}x"
            allocs = "" if r.get("allocs_per_op") is None else f"{r['allocs_per_op']:.2f}"
            note = notes_of(r) if v is not None else ""
            body.append([w, r["impl"], shown, ratio, allocs, note])
    widths = [max(len(str(x[i])) for x in [header] + body) for i in range(len(header))]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(cells)) + " |"
    lines.append(fmt(header))
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [fmt(b) for b in body]
    return "\n".join(lines)


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["workload", "impl", "per_op_ns", "allocs_per_op"])
        for r in rows:
            v = r["per_op_ns"]
            out.writerow([r["workload"], r["impl"], f"{v:.3f}" if v is not None else (r.get("note") or "n/a"),
                          "" if r.get("allocs_per_op") is None else f"{r['allocs_per_op']:.4f}"])


def main():
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows = []
    impls = []
    if WORKLOADS:  # ONLY=C1: nothing else to build
        log(f"building into {os.path.relpath(BUILD, ROOT)} ...")
        impls = implementations(build_all())
    os.makedirs(BUILD, exist_ok=True)
    for w in WORKLOADS:
        # Repeats are interleaved (round-robin over the implementations), so that a change in the
        # machine's load during the run does not favour whoever ran first.
        todo, best, failed = [], {}, set()
        for impl, supported, command, unavailable, repeats in impls:
            if w not in supported:
                continue
            cmd = command(w, N[w])
            todo.append((impl, cmd, unavailable, repeats))
        for rep in range(max(t[3] for t in todo)):
            for impl, cmd, unavailable, repeats in todo:
                if cmd is None or rep >= repeats or impl in failed:
                    continue
                log(f"{w} {impl} N={N[w]} (run {rep + 1}/{repeats}) ...")
                try:
                    r = run_program(cmd)
                except Exception as e:  # a failing peer must not hide the others
                    log(f"  failed: {e}")
                    failed.add(impl)
                    continue
                if impl == ASIO_THP:
                    r["impl"] = impl
                    r["note"] = "GLIBC_TUNABLES=glibc.malloc.hugetlb=1; " + r.get("note", "")
                best.setdefault(impl, []).append(r)
        for impl, cmd, unavailable, repeats in todo:
            if impl in best:
                # The median run is the row; min and max of the repetitions go in its notes.
                runs = sorted(best[impl], key=lambda r: r["per_op_ns"])
                row = dict(runs[len(runs) // 2])
                row["spread"] = (runs[0]["per_op_ns"], runs[-1]["per_op_ns"], len(runs))
                rows.append(row)
            else:
                reason = unavailable(w) if callable(unavailable) else unavailable
                note = reason if cmd is None else "n/a (failed)"
                rows.append({"workload": w, "impl": impl, "per_op_ns": None, "allocs_per_op": None, "note": note})
    if not ONLY or any(w.startswith("C1") for w in ONLY):
        log("C1 compile cost ...")
        rows += measure_compile(BUILD)
    print(f"async_utils benchmarks ({'QUICK' if QUICK else 'full'} run, {os.cpu_count()} CPUs, "
          f"load {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after); N = " + ", ".join(f"{w} {N[w]:,}" for w in WORKLOADS))
    print(table(rows))
    print("ratio = peer time / our time (>1: we are faster; for M1 and C1: peer bytes or seconds / ours).")
    print("per op: W4 per message (round trip), M1 bytes per idle task, C1 compiler CPU seconds; "
          "allocs/op counted by a replaced operator new in the measured section (C++ programs only).")
    if CSV_PATH:
        write_csv(rows, CSV_PATH)
        log(f"CSV written to {CSV_PATH}")
    log(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
