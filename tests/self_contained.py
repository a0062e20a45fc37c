#!/usr/bin/env python3
"""Compiles each header under src/ on its own (-fsyntax-only), with g++ and clang++, with and
without ASYNC_UTILS_TESTS: a file that forgets to include what it uses fails here, although the
single header (which inlines everything in order) would still build. Then it links each header
that compiles definitions (ASYNC_UTILS_DEFINITIONS) alone, with g++, as the implementation TU of
the split build plus an empty main(): there every such definition is an ordinary function, so one
that calls a function defined only in a later part fails with an undefined reference. A part
whose definitions rely on a later one on purpose (a cycle cut by a declaration) names it in a
comment line `// Links with: PART` (relative to src/), and is linked together with it.

    python3 tests/self_contained.py [-j N] [--compiler CXX]... [FILE...]

Each check is a one-line translation unit `#include "FILE"`, so the header is not the main file
(as in a user's program). Prints one line per failure and ends with "self_contained: N passed,
M failed"; exits 1 on any failure.
"""

import argparse
import concurrent.futures
import os
import re
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
SRC = os.path.join(ROOT, "src")
WARN = shlex.split(os.environ.get("WARN", "-std=c++20 -Wall -Wextra -Wpedantic -Werror"))
MODES = [("", []), ("tests", ["-DASYNC_UTILS_TESTS"])]


def headers():
    found = []
    for base, _, names in os.walk(SRC):
        found += [os.path.relpath(os.path.join(base, n), SRC).replace(os.sep, "/")
                  for n in names if n.endswith(".hpp")]
    return sorted(found)


def check(compiler, header, flags):
    source = f'#include "{header}"\n'
    cmd = [compiler, *WARN, "-pthread", "-fsyntax-only", f"-I{SRC}", *flags, "-x", "c++", "-"]
    result = subprocess.run(cmd, input=source, capture_output=True, text=True)
    return result.returncode == 0, result.stderr


def has_definitions(header):
    with open(os.path.join(SRC, header), encoding="utf-8") as f:
        return "#if ASYNC_UTILS_DEFINITIONS" in f.read()


LINKS_WITH_RE = re.compile(r"^// Links with: (\S+)\s*$", re.M)


def check_link(compiler, header, flags):
    del flags
    with open(os.path.join(SRC, header), encoding="utf-8") as f:
        later = LINKS_WITH_RE.findall(f.read())
    includes = "".join(f'#include "{h}"\n' for h in [header, *later])
    source = f"#define ASYNC_UTILS_IMPLEMENTATION\n{includes}int main() {{ return 0; }}\n"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [compiler, *WARN, "-pthread", "-O0", f"-I{SRC}", "-x", "c++", "-", "-o",
               os.path.join(tmp, "a.out")]
        result = subprocess.run(cmd, input=source, capture_output=True, text=True)
    return result.returncode == 0, result.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-j", type=int, default=int(os.environ.get("JOBS", "2")))
    parser.add_argument("--compiler", action="append",
                        help="compilers to use (default: $CXX_GCC and $CXX_CLANG, else g++, "
                             "clang++)")
    parser.add_argument("files", nargs="*", help="headers relative to src/ (default: all)")
    args = parser.parse_args()
    compilers = args.compiler or [os.environ.get("CXX_GCC", "g++"),
                                  os.environ.get("CXX_CLANG", "clang++")]
    jobs = [(c, h, mode, flags, check) for h in (args.files or headers()) for c in compilers
            for mode, flags in MODES]
    jobs += [(compilers[0], h, "linked alone", [], check_link) for h in (args.files or headers())
             if has_definitions(h)]
    passed = failed = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, args.j)) as pool:
        futures = [(job, pool.submit(job[4], job[0], job[1], job[3])) for job in jobs]
        for (compiler, header, mode, _, _), future in futures:
            ok, errors = future.result()
            if ok:
                passed += 1
                continue
            failed += 1
            label = f"{header} ({compiler}{', ' + mode if mode else ''})"
            first = next((l for l in errors.splitlines() if "error" in l or "undefined reference" in l),
                         errors.strip())
            print(f"FAIL {label}: {first}")
    print(f"self_contained: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
