#!/usr/bin/env python3
"""Draws ratio = peer time / our time from the benchmark CSV as a horizontal bar chart PNG.

    python3 tests/bench/plot_ratios.py results.csv [tests/bench/ratios.png]

Standard library only: a small PNG writer (zlib) and a 5x7 bitmap font, so the chart can be
redrawn on any machine that runs the benchmarks. Log scale; bars start at 1x and go right when
we are faster, left when the peer is faster.
"""
import csv
import math
import struct
import sys
import zlib

FONT_ROWS = {
    "A": ".###. #...# #...# ##### #...# #...# #...#", "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.", "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####", "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####", "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.", "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#", "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#", "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.", "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#", "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.", "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.", "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.", "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..", "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.", "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####", "3": "####. ....# ....# .###. ....# ....# ####.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.", "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.", "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.", "9": ".###. #...# #...# .#### ....# ...#. .##..",
    ".": "..... ..... ..... ..... ..... .##.. .##..", "-": "..... ..... ..... ##### ..... ..... .....",
    "/": "....# ....# ...#. ..#.. .#... #.... #....", "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...", ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...", "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    "=": "..... ..... ##### ..... ##### ..... .....", "_": "..... ..... ..... ..... ..... ..... #####",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...", "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    " ": "..... ..... ..... ..... ..... ..... .....",
}
FONT = {c: [row for row in rows.split()] for c, rows in FONT_ROWS.items()}
SCALE = 2  # pixels per font dot
CHAR_W = 6 * SCALE  # 5 dots and a gap

COLORS = {"asio": (52, 101, 164), "libuv": (115, 210, 22), "epoll-floor": (136, 138, 133),
          "asyncio": (245, 121, 0), "uvloop": (193, 125, 17)}
OTHER = (117, 80, 123)


class Canvas:
    def __init__(self, w, h):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def rect(self, x0, y0, x1, y1, color):
        x0, x1 = max(0, min(x0, x1)), min(self.w, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.h, max(y0, y1))
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            i = (y * self.w + x0) * 3
            self.px[i:i + len(row)] = row

    def text(self, x, y, s, color=(0, 0, 0)):
        for ch in s.upper():
            glyph = FONT.get(ch, FONT["?"] if "?" in FONT else FONT[" "])
            for gy, row in enumerate(glyph):
                for gx, dot in enumerate(row):
                    if dot == "#":
                        self.rect(x + gx * SCALE, y + gy * SCALE, x + (gx + 1) * SCALE, y + (gy + 1) * SCALE, color)
            x += CHAR_W

    def png(self):
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def read_ratios(path):
    per_op, order = {}, []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                v = float(r["per_op_ns"])
            except ValueError:
                continue  # n/a rows
            if r["workload"] not in order:
                order.append(r["workload"])
            per_op[(r["workload"], r["impl"])] = v
    bars, missing = [], []
    for w in order:
        ours = per_op.get((w, "async_utils"))
        if not ours:
            missing.append(w)
            continue
        for (w2, impl), v in per_op.items():
            if w2 == w and impl != "async_utils":
                bars.append((w, impl, v / ours))
    return bars, missing


def draw(bars, missing, out):
    lo, hi = 0.1, 1000.0
    left, right, top, bar_h, gap = 230, 110, 70, 16, 6
    plot_w = 640
    height = top + len(bars) * (bar_h + gap) + (80 if missing else 50)
    c = Canvas(left + plot_w + right, height)
    x_of = lambda r: left + int((math.log10(min(max(r, lo), hi)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * plot_w)
    c.text(10, 10, "ASYNC_UTILS BENCHMARKS: PEER TIME / OUR TIME (LOG SCALE)")
    c.text(10, 34, ">1: ASYNC_UTILS FASTER (M1: BYTES, C1: COMPILE TIME)", (80, 80, 80))
    bottom = top + len(bars) * (bar_h + gap)
    for k in range(-1, 4):
        x = x_of(10.0 ** k)
        c.rect(x, top - 4, x + 1, bottom, (215, 215, 215))
        label = f"{10.0 ** k:g}X"
        c.text(x - len(label) * CHAR_W // 2, bottom + 8, label, (80, 80, 80))
    one = x_of(1.0)
    previous = None
    for i, (w, impl, r) in enumerate(bars):
        y = top + i * (bar_h + gap)
        if previous is not None and previous != w:
            c.rect(10, y - gap // 2 - 1, left + plot_w, y - gap // 2, (190, 190, 190))
        previous = w
        c.text(10, y + 1, f"{w} {impl}"[:18])
        x = x_of(r)
        c.rect(min(one, x), y, max(one, x) + (1 if x == one else 0), y + bar_h, COLORS.get(impl, OTHER))
        label = f"{r:.2f}X" if r < 10 else f"{r:.0f}X"
        tx = x + 6 if x >= one else x - 6 - len(label) * CHAR_W
        c.text(tx, y + 1, label, (40, 40, 40))
    c.rect(one, top - 8, one + 2, bottom + 2, (0, 0, 0))
    if missing:
        c.text(10, bottom + 34, "NO RESULT OF OURS YET (PENDING): " + ", ".join(missing), (150, 40, 40))
    with open(out, "wb") as f:
        f.write(c.png())


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[2] if len(sys.argv) == 3 else "ratios.png"
    bars, missing = read_ratios(sys.argv[1])
    if not bars:
        sys.exit("no ratios in " + sys.argv[1])
    draw(bars, missing, out)
    print(f"wrote {out} ({len(bars)} bars)")


if __name__ == "__main__":
    main()
