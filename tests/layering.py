#!/usr/bin/env python3
"""Checks the dependency direction of src/: platform <- runtime <- primitives <- utilities.

A file may include files of its own layer or of a lower one; an include that points up the
layering, out of src/ or at a missing file fails. The root src/async_utils.hpp lists every part
and is exempt. Ends with "layering: N includes checked, M wrong"; exits 1 on any wrong one.

    python3 tests/layering.py [--root DIR]
"""

import argparse
import os
import re
import sys

LAYERS = ["platform", "runtime", "primitives", "utilities"]
INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def layer_of(src, path):
    rel = os.path.relpath(path, src).replace(os.sep, "/")
    top = rel.split("/")[0]
    return (LAYERS.index(top) if top in LAYERS else None), rel


def check(root):
    src = os.path.join(root, "src")
    checked, problems = 0, []
    for base, _, names in sorted(os.walk(src)):
        for name in sorted(n for n in names if n.endswith(".hpp")):
            path = os.path.join(base, name)
            own, rel = layer_of(src, path)
            if rel == "async_utils.hpp":
                continue
            if own is None:
                problems.append(f"src/{rel}: not in a layer directory ({', '.join(LAYERS)})")
                continue
            with open(path, encoding="utf-8") as f:
                text = f.read()
            for m in INCLUDE_RE.finditer(text):
                checked += 1
                line = text.count("\n", 0, m.start()) + 1
                target = os.path.normpath(os.path.join(base, m.group(1)))
                where = f"src/{rel}:{line}: \"{m.group(1)}\""
                if not os.path.isfile(target):
                    problems.append(f"{where} does not exist")
                    continue
                if os.path.commonpath([src, target]) != src:
                    problems.append(f"{where} points out of src/")
                    continue
                theirs, target_rel = layer_of(src, target)
                if theirs is None or theirs > own:
                    problems.append(f"{where} points up the layering: {LAYERS[own]} may not "
                                    f"include src/{target_rel}")
    return checked, problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       os.pardir))
    args = parser.parse_args()
    checked, problems = check(os.path.abspath(args.root))
    for p in problems:
        print(p)
    print(f"layering: {checked} includes checked, {len(problems)} wrong")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
