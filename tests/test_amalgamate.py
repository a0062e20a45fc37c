#!/usr/bin/env python3
"""Unit tests of amalgamate.py, each on a small source tree in a temporary directory."""

import os
import subprocess
import sys
import tempfile
import textwrap
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "amalgamate.py")

CONFIG = """\
// Configuration of the test tree.
#pragma once
#define ASYNC_UTILS_VERSION "9.8.7"
#include <vector>
#ifdef ASYNC_UTILS_TESTS
#include <doctest/doctest.h>
#endif
"""


class AmalgamateTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = self.tmp.name
        self.write("src/platform/config.hpp", CONFIG)

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, path, text):
        full = os.path.join(self.root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8", newline="\n") as f:
            f.write(textwrap.dedent(text))

    def run_script(self, *args):
        return subprocess.run([sys.executable, SCRIPT, "--root", self.root, *args],
                              capture_output=True, text=True)

    def generate(self):
        result = self.run_script()
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(os.path.join(self.root, "async_utils.hpp"), encoding="utf-8", newline="") as f:
            return f.read()

    def test_inlines_once_and_hoists_system_includes(self):
        self.write("src/async_utils.hpp", """\
            // async_utils: the test tree.
            #pragma once

            // Platform: configuration and helpers.
            #include "platform/config.hpp"
            #include "platform/a.hpp"

            // Runtime: the loop.
            #include "runtime/b.hpp"
            """)
        self.write("src/platform/a.hpp", """\
            // Helper a.
            #pragma once
            #include <string>
            #include "config.hpp"
            #include <vector>
            int a();
            """)
        self.write("src/runtime/b.hpp", """\
            // Loop b.
            #pragma once
            #include "../platform/a.hpp"
            #include <algorithm>
            #if defined(__linux__)
            #include <sys/epoll.h>
            #endif
            int b();
            """)
        text = self.generate()
        self.assertIn('async_utils 9.8.7', text)
        self.assertIn("edit src/, not this file", text)
        self.assertIn("Copyright (c) 2026 the async_utils authors", text)
        for word in ("Platform: configuration and helpers.", "Runtime: the loop.",
                     "src/platform/a.hpp       Helper a.", "src/runtime/b.hpp        Loop b."):
            self.assertIn(word, text)
        self.assertEqual(text.count("#pragma once"), 1)
        self.assertEqual(text.count("#define ASYNC_UTILS_HPP_INCLUDED"), 1)
        for name in ("config", "a"):
            self.assertEqual(text.count(f"// ---- begin src/platform/{name}.hpp ----"), 1)
            self.assertEqual(text.count(f"// ---- end src/platform/{name}.hpp ----"), 1)
        self.assertEqual(text.count("int a();"), 1)
        self.assertNotIn('#include "', text)  # repeats of inlined files leave nothing behind
        self.assertNotIn("\n\n\n", text)  # nor do dropped directives leave blank runs
        # Unconditional system includes: once each, sorted, before any code.
        hoisted = "#include <algorithm>\n#include <string>\n#include <vector>\n"
        self.assertEqual(text.count(hoisted), 1)
        self.assertEqual(text.count("#include <vector>"), 1)
        self.assertLess(text.index(hoisted), text.index("// ---- begin"))
        # Conditional ones stay under their guards.
        self.assertIn("#if defined(__linux__)\n#include <sys/epoll.h>\n#endif", text)
        self.assertIn("#ifdef ASYNC_UTILS_TESTS\n#include <doctest/doctest.h>\n#endif", text)

    def test_conditional_system_includes_appear_once(self):
        self.write("src/async_utils.hpp", """\
            // root
            #include "platform/config.hpp"
            #ifdef ASYNC_UTILS_TESTS
            #include <vector>
            #include <thread>
            #endif
            #ifdef ASYNC_UTILS_TESTS
            #include <thread>
            #endif
            #ifdef __linux__
            #include <thread>
            #else
            #include <poll.h>
            #endif
            #if 0
            #elif 1
            #include <poll.h>
            #endif
            """)
        text = self.generate()
        self.assertEqual(text.count("#include <vector>"), 1)  # hoisted from config.hpp
        self.assertIn("#ifdef ASYNC_UTILS_TESTS\n#include <thread>\n#endif\n"
                      "#ifdef ASYNC_UTILS_TESTS\n#endif", text)
        self.assertIn("#ifdef __linux__\n#include <thread>\n#else\n#include <poll.h>\n#endif", text)
        self.assertIn("#elif 1\n#include <poll.h>\n#endif", text)

    def test_output_is_deterministic_and_lf(self):
        self.write("src/async_utils.hpp", '// root\r\n#include "platform/config.hpp"\r\n')
        first = self.generate()
        second = self.generate()
        self.assertEqual(first, second)
        self.assertNotIn("\r", first)
        self.assertTrue(first.endswith("#endif  // ASYNC_UTILS_HPP_INCLUDED\n"))

    def test_missing_include_names_file_and_line(self):
        self.write("src/async_utils.hpp", """\
            // root
            #include "platform/config.hpp"
            #include "platform/gone.hpp"
            """)
        result = self.run_script()
        self.assertEqual(result.returncode, 2)
        self.assertIn("src/async_utils.hpp:3: cannot find include 'platform/gone.hpp'",
                      result.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.root, "async_utils.hpp")))

    def test_cycle_names_file_line_and_chain(self):
        self.write("src/async_utils.hpp", '// root\n#include "platform/config.hpp"\n#include "x.hpp"\n')
        self.write("src/x.hpp", '// x\n#pragma once\n#include "y.hpp"\n')
        self.write("src/y.hpp", '// y\n#pragma once\n\n#include "x.hpp"\n')
        result = self.run_script()
        self.assertEqual(result.returncode, 2)
        self.assertIn("src/y.hpp:4: include cycle: src/x.hpp -> src/y.hpp -> src/x.hpp",
                      result.stderr)

    def test_includes_in_comments_and_raw_strings_are_text(self):
        self.write("src/async_utils.hpp", """\
            // root
            #include "platform/config.hpp"
            // #include "commented.hpp"
            /* a block comment
            #include "blocked.hpp"
            */
            const char* s = R"x(
            #include "raw.hpp"
            #include <raw_system>
            )x";
            const char* t = u8R"(
            #pragma once
            )";
            const char* u = "R\\"(";  // not a raw string: "R\\"(" is an ordinary literal
            int n = 1'000;
            #include <tail>
            """)
        text = self.generate()
        self.assertIn('\n#include "raw.hpp"\n#include <raw_system>\n)x";', text)
        self.assertIn('u8R"(\n#pragma once\n)";', text)
        self.assertIn('/* a block comment\n#include "blocked.hpp"\n*/', text)
        # After the literals and the digit separator, code is recognised again.
        self.assertLess(text.index("#include <tail>"), text.index("// ---- begin"))

    def test_check_detects_stale_header(self):
        self.write("src/async_utils.hpp", '// root\n#include "platform/config.hpp"\n')
        result = self.run_script("--check")
        self.assertEqual(result.returncode, 1)
        self.assertIn("async_utils.hpp is stale: run python3 amalgamate.py", result.stderr)
        self.generate()
        self.assertEqual(self.run_script("--check").returncode, 0)
        with open(os.path.join(self.root, "src/platform/config.hpp"), "a") as f:
            f.write("int changed();\n")
        result = self.run_script("--check")
        self.assertEqual(result.returncode, 1)
        self.assertIn("is stale", result.stderr)

    def test_output_option(self):
        self.write("src/async_utils.hpp", '// root\n#include "platform/config.hpp"\n')
        out = os.path.join(self.root, "elsewhere.hpp")
        self.assertEqual(self.run_script("--output", out).returncode, 0)
        self.assertTrue(os.path.isfile(out))
        self.assertFalse(os.path.exists(os.path.join(self.root, "async_utils.hpp")))
        self.assertEqual(self.run_script("--check", "--output", out).returncode, 0)


if __name__ == "__main__":
    unittest.main()
