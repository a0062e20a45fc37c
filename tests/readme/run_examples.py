#!/usr/bin/env python3
"""Compiles and runs every example of README.md, so the README cannot rot.

An example is a fenced block opened with ```cpp example=NAME; the fenced block opened with
```text output=NAME that follows it holds what the program must print (exactly). Each example
is built against the single header at the repository root and run under a time limit.
Prints one line per example and ends with "readme: N passed, M failed".
"""
import os
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


def main():
    cxx = os.environ.get("CXX_GCC", "g++")
    flags = os.environ.get("WARN", "-std=c++20 -Wall -Wextra -Wpedantic -Werror").split()
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
        expected = outputs.get(name, (None, None))[0]
        src = os.path.join(build, name + ".cpp")
        exe = os.path.join(build, name)
        with open(src, "w", encoding="utf-8") as f:
            f.write(body)
        problem = None
        if expected is None:
            problem = "no output block"
        else:
            r = subprocess.run([cxx, *flags, "-pthread", "-O1", "-I", ROOT, src, "-o", exe],
                               capture_output=True, text=True)
            if r.returncode != 0:
                problem = "does not compile:\n" + r.stderr[-3000:]
            else:
                try:
                    r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
                    if r.returncode != 0:
                        problem = f"exit status {r.returncode}\n{r.stderr[-2000:]}"
                    elif r.stdout != expected:
                        problem = f"printed:\n{r.stdout}expected:\n{expected}"
                except subprocess.TimeoutExpired:
                    problem = "timed out after 60 s"
        if problem:
            failed += 1
            print(f"  FAIL  README example {name} (README.md:{line}): {problem}")
        else:
            passed += 1
            print(f"  ok    README example {name}")
    for name, (_, line) in outputs.items():
        if name not in examples:
            failed += 1
            print(f"  FAIL  README output {name} (README.md:{line}) has no example")
    print(f"readme: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
