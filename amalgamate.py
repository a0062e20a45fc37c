#!/usr/bin/env python3
"""Generates the single header async_utils.hpp from the modular sources in src/.

    python3 amalgamate.py            write ./async_utils.hpp
    python3 amalgamate.py --check    exit 1 if ./async_utils.hpp differs from a fresh build

The root file src/async_utils.hpp lists the parts, and each part includes the parts it uses.
Every quoted include is resolved relative to the file that names it and inlined the first time
only (later ones vanish); system includes that sit outside any #if block are hoisted into one
sorted list; conditional ones stay where they are, except repeats (hoisted anyway, or already
included under the same #if lines). The output depends only on the sources: no timestamps, LF
line ends.
"""

import argparse
import os
import re
import sys
import textwrap

HEADER_NAME = "async_utils.hpp"
ROOT_SOURCE = os.path.join("src", "async_utils.hpp")
CONFIG_SOURCE = os.path.join("src", "platform", "config.hpp")
INCLUDE_GUARD = "ASYNC_UTILS_HPP_INCLUDED"
TOC_WIDTH = 100

CONFIG_MACROS = [
    ("ASYNC_UTILS_TESTS", "compile the embedded doctest TEST_CASEs (needs <doctest/doctest.h>)"),
    ("ASYNC_UTILS_TESTS_MAIN", "as ASYNC_UTILS_TESTS, plus doctest's main(); in one TU only"),
    ("ASYNC_UTILS_SPLIT", "every TU: non-template definitions only in the implementation TU"),
    ("ASYNC_UTILS_IMPLEMENTATION", "in one TU only: compile those definitions there (implies SPLIT)"),
    ("ASYNC_UTILS_BACKEND_EPOLL", "force the epoll backend (the default on Linux)"),
    ("ASYNC_UTILS_BACKEND_IO_URING", "io_uring on Linux (raw system calls), epoll if the kernel refuses"),
    ("ASYNC_UTILS_BACKEND_KQUEUE", "force the kqueue backend (the default on macOS and the BSDs)"),
    ("ASYNC_UTILS_BACKEND_POLL", "force the portable poll(2) backend (the default elsewhere)"),
]

LICENSE = """\
MIT License

Copyright (c) 2026 the async_utils authors

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE."""

DIRECTIVE_RE = re.compile(r"^\s*#\s*(\w+)(.*)$")
QUOTED_INCLUDE_RE = re.compile(r'^\s*"([^"]+)"')
SYSTEM_INCLUDE_RE = re.compile(r"^\s*<([^>]+)>")
SECTION_RE = re.compile(r"^//\s*([A-Z][A-Za-z]*):\s*(.*?)\s*$")
VERSION_RE = re.compile(r'^\s*#\s*define\s+ASYNC_UTILS_VERSION\s+"([^"]+)"', re.M)
RAW_DELIM_RE = re.compile(r'([^()\\\s"]{0,16})\(')
IDENT_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
LITERAL_PREFIXES = {"u8", "u", "U", "L"}


class AmalgamateError(Exception):
    pass


class ConditionalInclude:
    """A system include inside #if blocks: kept in place unless it is redundant."""

    def __init__(self, name, guards, line):
        self.name, self.guards, self.line = name, guards, line


def code_line_starts(text):
    """For each physical line of text, whether it starts as code: not inside a /* */ comment,
    a raw string literal or a backslash-continued line. Only such lines can hold a directive."""
    lines = text.split("\n")
    result = []
    state = None  # None: code; "block": in /* */; ("raw", ")delim\""): in a raw string
    continued = False
    for line in lines:
        result.append(state is None and not continued)
        i, n = 0, len(line)
        while i < n:
            if state == "block":
                end = line.find("*/", i)
                if end < 0:
                    i = n
                else:
                    state, i = None, end + 2
                continue
            if state is not None:  # raw string
                end = line.find(state[1], i)
                if end < 0:
                    i = n
                else:
                    state, i = None, end + len(state[1])
                continue
            c = line[i]
            if line.startswith("//", i):
                break
            if line.startswith("/*", i):
                state, i = "block", i + 2
            elif c.isdigit() or (c == "." and i + 1 < n and line[i + 1].isdigit()):
                # A pp-number, which may contain digit separators (1'000) that are not quotes.
                i += 1
                while i < n and (line[i] in IDENT_CHARS or line[i] in ".'" or
                                 (line[i] in "+-" and line[i - 1] in "eEpP")):
                    i += 1
            elif c in IDENT_CHARS:
                j = i
                while j < n and line[j] in IDENT_CHARS:
                    j += 1
                word = line[i:j]
                if word.endswith("R") and word[:-1] in LITERAL_PREFIXES | {""} and \
                        j < n and line[j] == '"':
                    m = RAW_DELIM_RE.match(line, j + 1)
                    if m:
                        state, i = ("raw", ")" + m.group(1) + '"'), m.end()
                        continue
                i = j
            elif c in "\"'":
                i = skip_quoted(line, i)
            else:
                i += 1
        continued = state is None and line.endswith("\\")
    return lines, result


def skip_quoted(line, i):
    quote, i = line[i], i + 1
    while i < len(line):
        if line[i] == "\\":
            i += 2
        elif line[i] == quote:
            return i + 1
        else:
            i += 1
    return i


class Amalgamator:
    def __init__(self, root_dir, sections=None):
        self.root_dir = os.path.abspath(root_dir)
        self.root_path = os.path.join(self.root_dir, ROOT_SOURCE)
        self.sections = sections or {}  # root file line -> (word, text), see root_sections()
        self.visited = set()
        self.stack = []  # (path, line) of the includes being expanded, for cycle reports
        self.system_includes = set()  # hoisted: included outside every #if block
        self.guards = []  # the #if lines open at the current point, outermost first
        self.files = []  # (relative path, leading comment, section) in inlining order
        self.section = None

    def rel(self, path):
        return os.path.relpath(path, self.root_dir).replace(os.sep, "/")

    def read(self, path):
        with open(path, encoding="utf-8") as f:
            return f.read().replace("\r\n", "\n")

    def expand(self, path, out):
        """Appends the lines of path to out, inlining quoted includes. A conditional system
        include is appended as a ConditionalInclude, resolved once the hoisted set is known."""
        text = self.read(path)
        lines, code_starts = code_line_starts(text)
        if lines and lines[-1] == "":
            lines.pop()
        dropped = False
        for number, (line, is_code) in enumerate(zip(lines, code_starts), start=1):
            m = DIRECTIVE_RE.match(line) if is_code else None
            if not m:
                # A blank line after dropped directives (#pragma once, hoisted or repeated
                # includes) is dropped too when the output already ends with one.
                if not (line == "" and dropped and out and out[-1] == ""):
                    out.append(line)
                    dropped = False
                continue
            dropped = False
            name, rest = m.group(1), m.group(2)
            if name in ("if", "ifdef", "ifndef"):
                self.guards.append(line.strip())
            elif name in ("elif", "else") and self.guards:
                self.guards[-1] += " / " + line.strip()
            elif name == "endif" and self.guards:
                self.guards.pop()
            elif name == "pragma" and rest.split() == ["once"]:
                dropped = True
                continue
            elif name == "include":
                quoted = QUOTED_INCLUDE_RE.match(rest)
                system = SYSTEM_INCLUDE_RE.match(rest)
                if quoted:
                    size = len(out)
                    self.include_local(path, number, quoted.group(1), out)
                    dropped = len(out) == size
                    continue
                if system and not self.guards:
                    self.system_includes.add(system.group(1))
                    dropped = True
                    continue
                if system:
                    out.append(ConditionalInclude(system.group(1), tuple(self.guards), line))
                    continue
            out.append(line)

    def include_local(self, parent, number, name, out):
        if parent == self.root_path:
            self.section = self.sections.get(number)
        target = os.path.normpath(os.path.join(os.path.dirname(parent), name))
        where = f"{self.rel(parent)}:{number}"
        if not os.path.isfile(target):
            raise AmalgamateError(f"{where}: cannot find include '{name}'")
        active = [p for p, _ in self.stack]
        if target in active:
            chain = " -> ".join(self.rel(p) for p in active[active.index(target):] + [target])
            raise AmalgamateError(f"{where}: include cycle: {chain}")
        if target in self.visited:
            return  # every source names what it uses, so repeats are the rule: leave no trace
        self.visited.add(target)
        self.files.append((self.rel(target), leading_comment(self.read(target)), self.section))
        out.append(f"// ---- begin {self.rel(target)} ----")
        self.stack.append((target, number))
        self.expand(target, out)
        self.stack.pop()
        out.append(f"// ---- end {self.rel(target)} ----")

    def resolve(self, body):
        """Drops the conditional system includes that are redundant: the header is hoisted
        anyway, or it was already included under the same stack of #if lines."""
        seen = set()
        lines = []
        for item in body:
            if isinstance(item, ConditionalInclude):
                key = (item.name, item.guards)
                if item.name in self.system_includes or key in seen:
                    continue
                seen.add(key)
                item = item.line
            lines.append(item)
        return lines


def leading_comment(text):
    """The comment block a source opens with (its `// ...` lines before #pragma once), as one line."""
    words = []
    for line in text.split("\n"):
        if not line.startswith("//"):
            break
        words.append(line[2:].strip())
    return " ".join(w for w in words if w)


def root_sections(root_path):
    """Maps line numbers of quoted includes in the root file to the section naming them: a
    `// Word: text` comment line directly above a group of includes (further comment lines may
    sit in between). A blank line ends the group."""
    sections = {}
    current = None
    with open(root_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        m = SECTION_RE.match(stripped)
        if m:
            following = next((s.strip() for s in lines[number:] if not s.strip().startswith("//")),
                             "")
            current = (m.group(1), m.group(2)) if following.startswith("#") else None
        elif not stripped:
            current = None
        elif stripped.startswith("#") and current:
            sections[number] = current
    return sections


def build(root_dir):
    """Returns the text of the single header generated from root_dir/src."""
    root_dir = os.path.abspath(root_dir)
    root_path = os.path.join(root_dir, ROOT_SOURCE)
    config_path = os.path.join(root_dir, CONFIG_SOURCE)
    if not os.path.isfile(root_path):
        raise AmalgamateError(f"{ROOT_SOURCE}: not found (run from the repository root or pass"
                              " --root)")
    amalgamator = Amalgamator(root_dir, root_sections(root_path))
    version = VERSION_RE.search(amalgamator.read(config_path)) if os.path.isfile(config_path) \
        else None
    if not version:
        raise AmalgamateError(f"{CONFIG_SOURCE}: no #define ASYNC_UTILS_VERSION \"x.y.z\"")

    root_lines = amalgamator.read(root_path).split("\n")
    summary = root_lines[0][2:].strip() if root_lines[0].startswith("//") else ""
    summary = re.sub(r"^async_utils:\s*", "", summary)
    amalgamator.visited.add(root_path)
    amalgamator.stack.append((root_path, 0))
    body = []
    amalgamator.expand(root_path, body)
    body = amalgamator.resolve(body)

    out = []
    out.append(f"// {HEADER_NAME} - async_utils {version.group(1)}")
    if summary:
        out.append(f"// {summary}")
    out.append("//")
    out.append("// GENERATED from src/ by amalgamate.py; edit src/, not this file.")
    out.append("//")
    out += [f"// {line}".rstrip() for line in LICENSE.split("\n")]
    out.append("//")
    out.append("// Configuration macros (define them before including this header):")
    width = max(len(name) for name, _ in CONFIG_MACROS)
    out += [f"//   {name.ljust(width)}  {text}" for name, text in CONFIG_MACROS]
    out.append("//")
    out.append("// Contents:")
    width = max((len(path) for path, _, _ in amalgamator.files), default=0)
    last_section = ()
    for path, description, section in amalgamator.files:
        if section != last_section:
            out.append(f"//   {section[0]}: {section[1]}" if section else "//   Other:")
            last_section = section
        lead = f"//     {path.ljust(width)}  "
        out += textwrap.wrap(description, TOC_WIDTH, initial_indent=lead,
                             subsequent_indent="//" + " " * (len(lead) - 2),
                             break_on_hyphens=False) or [lead.rstrip()]
    out.append("")
    # A header compiled as the main file (the test one-liner) must not say #pragma once.
    out.append("#if !defined(__INCLUDE_LEVEL__) || __INCLUDE_LEVEL__ > 0")
    out.append("#pragma once")
    out.append("#endif")
    out.append(f"#ifndef {INCLUDE_GUARD}")
    out.append(f"#define {INCLUDE_GUARD}")
    out.append("")
    out += [f"#include <{name}>" for name in sorted(amalgamator.system_includes)]
    out.append("")
    out += body
    out.append("")
    out.append(f"#endif  // {INCLUDE_GUARD}")
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the header differs from a fresh build; write nothing")
    parser.add_argument("--root", default=os.path.dirname(os.path.abspath(__file__)),
                        help="repository root holding src/ (default: where this script is)")
    parser.add_argument("--output", help=f"header to write or check (default: ROOT/{HEADER_NAME})")
    args = parser.parse_args(argv)
    output = args.output or os.path.join(args.root, HEADER_NAME)

    try:
        text = build(args.root)
    except AmalgamateError as e:
        print(e, file=sys.stderr)
        return 2

    if args.check:
        try:
            with open(output, encoding="utf-8", newline="") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print(f"{os.path.basename(output)} is stale: run python3 amalgamate.py",
                  file=sys.stderr)
            return 1
        print(f"{os.path.basename(output)} is up to date")
        return 0

    with open(output, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
