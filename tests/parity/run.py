#!/usr/bin/env python3
"""Parity with CPython's asyncio: runs each scenario pair NAME.py / NAME.cpp and diffs the traces.

Each scenario writes the same program twice, once with asyncio and once with this library, and
prints one event per line. The runner compiles every NAME.cpp into one program (each scenario in
its own namespace, its main() picked by name on the command line: one compile of the header
instead of one per scenario; g++ -std=c++20 -O0 -pthread -I<repo root>; cached by content hash in
tests/build/parity/). If that program does not build, each scenario is built alone (at most two
compilers at once) so that the failure is reported against its own file. Both sides run with a
timeout and their standard outputs are compared.

Per scenario it prints one line:
  ok      NAME                        the traces are equal
  allowed NAME (reason)               they differ, and ALLOWED lists the difference with its reason
  FAIL    NAME                        they differ unexpectedly (a unified diff follows), or a side
                                      failed to build, crashed or timed out
  ok      NAME (stale allow-list entry: ...)
                                      listed in ALLOWED, but the traces are equal now: prune it
and a last line "parity: N ok, N allowed, N failed, N stale". Exit status 1 on any FAIL.

Usage: run.py [NAME ...] [--timeout SECONDS] [--jobs N (at most 2)] [--show]
Environment: CXX (default g++), PYTHON (default python3).
"""

import argparse
import concurrent.futures
import difflib
import hashlib
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(ROOT, "tests", "build", "parity")
HEADER = os.path.join(ROOT, "async_utils.hpp")
ALLOWED_FILE = os.path.join(HERE, "ALLOWED")
CXX = os.environ.get("CXX", "g++")
PYTHON = os.environ.get("PYTHON", "python3")
CXXFLAGS = ["-std=c++20", "-O0", "-pthread", "-I" + ROOT, "-I" + HERE]
MAX_JOBS = 2  # the machine is shared: never more compilers than this


def read_allowed():
    """ALLOWED: one `NAME: reason` per line; blank lines and lines starting with # are skipped."""
    allowed = {}
    if not os.path.exists(ALLOWED_FILE):
        return allowed
    with open(ALLOWED_FILE, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, reason = line.partition(":")
            if not sep or not name.strip() or not reason.strip():
                raise SystemExit(f"{ALLOWED_FILE}:{number}: expected 'NAME: reason', got {line!r}")
            allowed[name.strip()] = reason.strip()
    return allowed


def scenarios():
    names = set()
    for entry in os.listdir(HERE):
        stem, ext = os.path.splitext(entry)
        if ext in (".py", ".cpp") and stem not in ("run", "parity"):
            names.add(stem)
    return sorted(names)


def compiler_identity():
    try:
        out = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    return out.splitlines()[0] if out else CXX


def content_digest(identity, sources):
    digest = hashlib.sha256()
    for part in (identity, " ".join(CXXFLAGS)):
        digest.update(part.encode() + b"\0")
    for path in (*sources, HEADER, os.path.join(HERE, "parity.hpp")):
        digest.update(path.encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def compile_cached(stem, source, sources, identity):
    """Compiles `source` to tests/build/parity/STEM-HASH unless that binary exists (the hash covers
    `sources`, the header, the flags and the compiler). Returns (path, None) or (None, error)."""
    binary = os.path.join(BUILD, f"{stem}-{content_digest(identity, sources)}")
    if os.path.exists(binary):
        return binary, None
    for old in os.listdir(BUILD):  # older builds of the same program
        if old.startswith(stem + "-") and len(old) == len(stem) + 17:
            try:
                os.remove(os.path.join(BUILD, old))
            except OSError:
                pass
    partial = binary + ".tmp"
    # In the combined program a scenario's main() is an ordinary function: falling off its end
    # would return garbage, so a missing `return 0;` fails the build (and each builds alone).
    proc = subprocess.run([CXX, *CXXFLAGS, "-Werror=return-type", source, "-o", partial],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None, proc.stderr
    os.replace(partial, binary)
    return binary, None


def build(name, identity):
    """One scenario alone: NAME.cpp as its own program."""
    source = os.path.join(HERE, name + ".cpp")
    return compile_cached(name, source, [source], identity)


SYSTEM_INCLUDE = re.compile(r"^\s*#\s*include\s*<[^>]+>", re.M)


def build_combined(names, identity):
    """Every scenario in one program: `PROGRAM NAME` runs scenario NAME. The scenarios' system
    includes come first, at global scope, so that their second inclusion inside a namespace is
    empty. Returns (path, None) or (None, error)."""
    sources = [os.path.join(HERE, n + ".cpp") for n in names]
    system = set()
    for path in sources:
        with open(path, encoding="utf-8") as f:
            system.update(m.group(0).strip() for m in SYSTEM_INCLUDE.finditer(f.read()))
    lines = ["// Generated by tests/parity/run.py: every scenario in one program.",
             '#include "parity.hpp"', "#include <cstring>", *sorted(system)]
    for name, path in zip(names, sources):
        lines += [f"namespace parity_scenario_{name} {{", "#define main scenario_main",
                  f'#include "{path}"', "#undef main", "}"]
    lines += ["int main(int argc, char** argv) {"]
    for name in names:
        lines.append(f'  if (argc == 2 && std::strcmp(argv[1], "{name}") == 0) '
                     f"return parity_scenario_{name}::scenario_main();")
    lines += ['  std::cerr << "usage: " << argv[0] << " SCENARIO\\n";', "  return 2;", "}", ""]
    source = os.path.join(BUILD, "all_scenarios.cpp")
    text = "\n".join(lines)
    if not os.path.exists(source) or open(source, encoding="utf-8").read() != text:
        with open(source, "w", encoding="utf-8") as f:
            f.write(text)
    return compile_cached("all_scenarios", source, sources, identity)


def run(command, timeout):
    """Runs a side; returns (trace lines, problem or None, stderr)."""
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=HERE, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return out.splitlines(), f"timed out after {timeout} s", ""
    problem = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    return proc.stdout.splitlines(), problem, proc.stderr


def check(name, identity, timeout, combined):
    """Runs one scenario (building it alone unless the combined program exists); returns
    (name, kind, detail) with kind in equal / differ / broken."""
    if not os.path.exists(os.path.join(HERE, name + ".py")):
        return name, "broken", f"{name}.py is missing"
    if not os.path.exists(os.path.join(HERE, name + ".cpp")):
        return name, "broken", f"{name}.cpp is missing"
    if combined:
        command = [combined, name]
    else:
        binary, error = build(name, identity)
        if error is not None:
            return name, "broken", "build failed:\n" + "\n".join(error.splitlines()[:25])
        command = [binary]
    expected, py_problem, py_err = run([PYTHON, name + ".py"], timeout)
    actual, cpp_problem, cpp_err = run(command, timeout)
    # A side that failed shows it in its trace, so a crash is never an "equal" trace.
    if py_problem:
        expected.append(f"[asyncio side: {py_problem}]")
    if cpp_problem:
        actual.append(f"[C++ side: {cpp_problem}]")
    if expected == actual:
        return name, "equal", ""
    diff = difflib.unified_diff(expected, actual, f"{name}.py (asyncio)", f"{name}.cpp (async_utils)", lineterm="")
    detail = "\n".join(diff)
    for side, problem, err in (("asyncio", py_problem, py_err), ("C++", cpp_problem, cpp_err)):
        if problem and err.strip():
            detail += f"\n{side} stderr:\n" + "\n".join(err.strip().splitlines()[-10:])
    return name, "differ", detail


def indent(text):
    return "\n".join("        | " + line for line in text.splitlines())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="scenarios to run (default: all)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per side, in seconds")
    parser.add_argument("--jobs", type=int, default=MAX_JOBS, help=f"parallel builds and runs (at most {MAX_JOBS})")
    parser.add_argument("--show", action="store_true", help="also print the diff of allowed scenarios")
    args = parser.parse_args()

    allowed = read_allowed()
    every = scenarios()
    names = args.names or every
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit("unknown scenario(s): " + ", ".join(unknown))
    os.makedirs(BUILD, exist_ok=True)
    identity = compiler_identity()
    jobs = max(1, min(args.jobs, MAX_JOBS))

    present = [n for n in names if os.path.exists(os.path.join(HERE, n + ".cpp"))]
    combined, error = build_combined(present, identity) if present else (None, None)
    if error is not None:
        print("  note    the scenarios do not build as one program; building each alone:")
        print(indent("\n".join(error.splitlines()[:10])))
    counts = {"ok": 0, "allowed": 0, "failed": 0, "stale": 0}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        results = pool.map(lambda n: check(n, identity, args.timeout, combined), names)
        for name, kind, detail in results:
            if kind == "equal":
                counts["ok"] += 1
                if name in allowed:
                    counts["stale"] += 1
                    print(f"  ok      {name} (stale allow-list entry: the traces match now; remove it from ALLOWED)")
                else:
                    print(f"  ok      {name}")
            elif kind == "differ" and name in allowed:
                counts["allowed"] += 1
                print(f"  allowed {name} ({allowed[name]})")
                if args.show:
                    print(indent(detail))
            else:
                counts["failed"] += 1
                print(f"  FAIL    {name}")
                print(indent(detail))
            sys.stdout.flush()
    for name in sorted(set(allowed) - set(every)):
        print(f"  note    ALLOWED names {name}, which is not a scenario")
    print(f"parity: {counts['ok']} ok, {counts['allowed']} allowed, {counts['failed']} failed, {counts['stale']} stale")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
