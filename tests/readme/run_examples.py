#!/usr/bin/env python3
"""Compiles and runs every example of README.md, so the README cannot rot.

An example is a fenced block opened with ```cpp example=NAME; the fenced block opened with
```text output=NAME that follows it holds what the program must print (exactly). Each example
is built against the single header at the repository root with g++, clang++ and clang++-19
(CXX_GCC, CXX_CLANG, CXX_CLANG19; a compiler that is not installed is skipped with a note;
README_COMPILERS=gcc,clang picks some) and run under a time limit. The header is precompiled
once per compiler (a plain build when that fails); at most 2 (or JOBS when lower) compilers run
at once. Prints one line per example and compiler, ends with "readme: N passed, M failed".
"""
import concurrent.futures
import os
import shutil
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FENCE = re.compile(r"^```(\w+)\s+(example|output)=([\w-]+)\s*$")


def blocks(text):
    """Yields (kind, name, body, line) for the tagged fenced blocks of a Markdown text."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i + 1
        j = start
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise SystemExit(f"README.md:{i + 1}: unterminated block")
        yield m.group(2), m.group(3), "\n".join(lines[start:j]) + "\n", i + 1
        i = j + 1


def compilers():
    """(label, command) of the compilers to use, those installed."""
    known = [("gcc", os.environ.get("CXX_GCC", "g++")), ("clang", os.environ.get("CXX_CLANG", "clang++")),
             ("clang19", os.environ.get("CXX_CLANG19", "clang++-19"))]
    wanted = os.environ.get("README_COMPILERS")
    if wanted:
        known = [k for k in known if k[0] in wanted.split(",")]
    found = []
    for label, cxx in known:
        if shutil.which(cxx):
            found.append((label, cxx))
        else:
            print(f"  note  {cxx} not installed: README examples not built with it")
    return found


def precompile(label, cxx, flags, build):
    """Precompiles the header for cxx; returns the extra flags that use it (none on failure)."""
    out = os.path.join(build, "pch-" + label)
    os.makedirs(out, exist_ok=True)
    header = os.path.join(ROOT, "async_utils.hpp")
    if label == "gcc":
        # g++ takes DIR/async_utils.hpp.gch in place of the header when DIR comes first in -I.
        pch, use = os.path.join(out, "async_utils.hpp.gch"), ["-I", out]
    else:
        pch = os.path.join(out, "async_utils.hpp.pch")
        use = ["-include-pch", pch]
    r = subprocess.run([cxx, *flags, "-pthread", "-O1", "-x", "c++-header", header, "-o", pch],
                       capture_output=True, text=True)
    return use if r.returncode == 0 else []


def build_and_run(cxx, flags, pch_flags, src, exe, expected):
    """None when the example compiles, runs and prints `expected`; else what went wrong."""
    r = subprocess.run([cxx, *flags, *pch_flags, "-pthread", "-O1", "-I", ROOT, src, "-o", exe],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return "does not compile:\n" + r.stderr[-3000:]
    try:
        r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "timed out after 60 s"
    if r.returncode != 0:
        return f"exit status {r.returncode}\n{r.stderr[-2000:]}"
    if r.stdout != expected:
        return f"printed:\n{r.stdout}expected:\n{expected}"
    return None


def main():
    flags = os.environ.get("WARN", "-std=c++20 -Wall -Wextra -Wpedantic -Werror").split()
    jobs = max(1, min(2, int(os.environ.get("JOBS", "2") or 2)))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    examples, outputs = {}, {}
    for kind, name, body, line in blocks(text):
        table = examples if kind == "example" else outputs
        if name in table:
            raise SystemExit(f"README.md:{line}: {kind} {name!r} appears twice")
        table[name] = (body, line)
    passed = failed = 0
    build = os.path.join(ROOT, "tests", "build", "readme")
    os.makedirs(build, exist_ok=True)
    for name, (body, line) in examples.items():
        with open(os.path.join(build, name + ".cpp"), "w", encoding="utf-8") as f:
            f.write(body)
    ccs = compilers()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        pch = dict(zip([c[0] for c in ccs], pool.map(lambda c: precompile(c[0], c[1], flags, build), ccs)))
        runs = {}
        for name, (body, line) in examples.items():
            expected = outputs.get(name, (None, None))[0]
            for label, cxx in ccs:
                if expected is None:
                    continue
                src = os.path.join(build, name + ".cpp")
                exe = os.path.join(build, f"{name}-{label}")
                runs[(name, label)] = pool.submit(build_and_run, cxx, flags, pch[label], src, exe, expected)
        for name, (body, line) in examples.items():
            if name not in outputs:
                failed += 1
                print(f"  FAIL  README example {name} (README.md:{line}): no output block")
                continue
            for label, _ in ccs:
                problem = runs[(name, label)].result()
                if problem:
                    failed += 1
                    print(f"  FAIL  README example {name} with {label} (README.md:{line}): {problem}")
                else:
                    passed += 1
                    print(f"  ok    README example {name} ({label})")
    for name, (_, line) in outputs.items():
        if name not in examples:
            failed += 1
            print(f"  FAIL  README output {name} (README.md:{line}) has no example")
    print(f"readme: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
