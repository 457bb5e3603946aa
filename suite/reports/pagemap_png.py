"""Page-map pictures of oracle snapshots (``pagemap-*.npz``): one row per THP-sized chunk, one pixel per page.

Each chunk is a band: a 1 px strip where the uffd-wp bit is set, a 2 px strip marking pages a verdict finding
names, then the page's state (data in a THP / data in its own 4 KiB frame / shared zero page / pte_none hole /
swapped), then a separator. A gutter left of each band gives the chunk's offset in MiB, whether the whole chunk
is THP-mapped, and the worst finding in it, so a bad chunk is found at a glance. PNG is written with zlib+struct
(no imaging library); text uses a built-in 5x7 font.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..pagemap import PAGE, PAGES_PER_THP, PageStates, load
from ..verdict import KINDS, Finding, Verdict

RGB = tuple[int, int, int]

# Base page states, in drawing order (later wins).
STATES: dict[str, tuple[RGB, str]] = {
    "hole": ((205, 205, 205), "hole (pte_none)"),
    "zero": ((250, 222, 130), "shared zero page"),
    "data": ((80, 145, 215), "data, own 4 KiB frame"),
    "data-thp": ((20, 45, 120), "data, inside a THP"),
    "swapped": ((150, 90, 200), "swapped out"),
}
# Finding overlays, lowest priority first: a page named by several findings shows the last one.
OVERLAYS: dict[str, tuple[RGB, str]] = {
    "lost-soft-dirty": ((150, 85, 20), "lost soft-dirty bit"),
    "lost-uffd-wp": ((225, 0, 200), "lost uffd-wp bit"),
    "stale-dump": ((120, 60, 0), "written since the clear, reads clean"),
    "no-wp-fault": ((0, 165, 80), "write raised no WP fault"),
    "missing-fault": ((255, 140, 0), "MISSING fault on placed page"),
    "hole": ((230, 20, 20), "hole among placed pages"),
    "content": ((0, 0, 0), "content mismatch"),
    "stall": ((0, 200, 225), "reader stalls on page"),
}
WP_BIT: RGB = (70, 70, 70)
WHITE: RGB = (255, 255, 255)
SEPARATOR: RGB = (235, 235, 235)
INK: RGB = (30, 30, 30)

BAND = 8  # px per chunk: wp strip 1, finding strip 2, state 4, separator 1
GLYPH_H, ADVANCE = 7, 6  # 5x7 glyphs, 1 px apart
LINE = 10  # px per text line


# --- PNG -----------------------------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (H, W, 3) uint8 array (filter 0 on every row: the map compresses well as is)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rgb.reshape(h, w * 3)], axis=1)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    Path(path).write_bytes(encode_png(rgb))


# --- 5x7 font (upper case; text is upper-cased) --------------------------------------------------------------

_FONT_ROWS = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "A": ".###. #...# #...# ##### #...# #...# #...#", "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.", "D": "###.. #..#. #...# #...# #...# #..#. ###..",
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
    "2": ".###. #...# ....# ...#. ..#.. .#... #####", "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.", "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.", "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.", "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "-": "..... ..... ..... ##### ..... ..... .....", ".": "..... ..... ..... ..... ..... .##.. .##..",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....", ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.", ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.", "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "@": ".###. #...# ....# .##.# #.#.# #.#.# .###.", "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "_": "..... ..... ..... ..... ..... ..... #####", "=": "..... ..... ##### ..... ##### ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....", ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.", "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
}
# Each glyph with its 1 px spacing column already appended: a string is one concatenate.
FONT = {c: np.array([[p == "#" for p in row + "."] for row in rows.split()], dtype=bool)
        for c, rows in _FONT_ROWS.items()}


@functools.lru_cache(maxsize=1024)
def text_mask(text: str) -> np.ndarray:
    """(7, 6*len) bool bitmap of ``text``; characters the font lacks show as '?'."""
    if not text:
        return np.zeros((GLYPH_H, 0), dtype=bool)
    return np.concatenate([FONT.get(c, FONT["?"]) for c in text.upper()], axis=1)


def draw_text(img: np.ndarray, x: int, y: int, text: str, color: RGB = INK) -> None:
    """Draw ``text`` with its top-left corner at (x, y), clipped to the image."""
    mask = text_mask(text)
    h, w = img.shape[:2]
    mask = mask[: max(0, h - y), : max(0, w - x)]
    img[y : y + mask.shape[0], x : x + mask.shape[1]][mask] = color


# --- page map ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Marks:
    """Per-page overlay codes (index into OVERLAYS + 1; 0 = none; the highest priority wins) and the finding
    kinds that name pages here (also those painted over by a higher priority)."""

    code: np.ndarray
    kinds: tuple[str, ...]


def side_of(npz: str | os.PathLike[str]) -> str:
    """'src'/'dst' for a real-QEMU snapshot (``pagemap-dst-last.npz``), '' for a synthetic one."""
    m = re.match(r"pagemap-(src|dst)-", Path(npz).name)
    return m.group(1) if m else ""


def finding_indices(states: PageStates, finding: Finding) -> np.ndarray:
    """Page indices of ``states`` a finding names (gpa: RAM starts at gpa 0; va: the region's addresses)."""
    addrs = np.array(finding.addresses, dtype=np.int64)
    base = 0 if finding.space == "gpa" else states.start
    idx = (addrs - base) // PAGE
    return idx[(idx >= 0) & (idx < states.npages)]


def applies_to(finding: Finding, side: str) -> bool:
    """A real-QEMU finding that names its side ('dst RAM') marks only that side's pictures."""
    named = re.search(r"\b(src|dst) RAM\b", finding.detail)
    return not side or not named or named.group(1) == side


def marks(states: PageStates, findings: Sequence[Finding], side: str = "") -> Marks:
    """Which pages the findings name, for the side (``src``/``dst``, '' synthetic) a snapshot belongs to."""
    code = np.zeros(states.npages, dtype=np.uint8)
    kinds = list(OVERLAYS)
    named: set[str] = set()
    shown = [f for f in findings if f.kind in OVERLAYS and applies_to(f, side)]
    for f in sorted(shown, key=lambda f: kinds.index(f.kind)):
        idx = finding_indices(states, f)
        code[idx] = kinds.index(f.kind) + 1
        if idx.size:
            named.add(f.kind)
    return Marks(code, tuple(sorted(named)))


def state_codes(states: PageStates) -> np.ndarray:
    """Per page: index into STATES."""
    names = list(STATES)
    code = np.full(states.npages, names.index("hole"), dtype=np.uint8)
    code[states.zero] = names.index("zero")
    code[states.data] = names.index("data")
    if states.thp is not None and states.thp.size == states.npages:
        code[states.data & states.thp] = names.index("data-thp")
    code[states.swapped] = names.index("swapped")
    return code


def _palette(table: dict[str, tuple[RGB, str]], none: RGB) -> np.ndarray:
    return np.array([none, *(c for c, _ in table.values())], dtype=np.uint8)


def _rows(values: np.ndarray, nchunks: int) -> np.ndarray:
    """Per-page values padded to whole chunks, as (chunks, 512)."""
    out = np.zeros(nchunks * PAGES_PER_THP, dtype=values.dtype)
    out[: values.size] = values
    return out.reshape(nchunks, PAGES_PER_THP)


def render_map(states: PageStates, mk: Marks, px_per_page: int = 1) -> np.ndarray:
    """The bands alone: (chunks * BAND, 512 * px_per_page, 3), vectorised over all pages at once."""
    nchunks = -(-states.npages // PAGES_PER_THP)
    st = _palette(STATES, WHITE)[_rows(state_codes(states) + 1, nchunks)]  # past the region's end: 0, white
    ov_codes = _rows(mk.code, nchunks)
    ov = _palette(OVERLAYS, WHITE)[ov_codes]
    wp = np.where(_rows(states.uffd_wp, nchunks)[..., None], np.array(WP_BIT, np.uint8), np.array(WHITE, np.uint8))
    sep = np.broadcast_to(np.array(SEPARATOR, np.uint8), st.shape)
    band = np.stack([wp, ov, ov, st, st, st, st, sep], axis=1)  # (chunks, BAND, 512, 3)
    band = band.reshape(nchunks * BAND, PAGES_PER_THP, 3)
    return np.repeat(band, px_per_page, axis=1)


def _gutter(states: PageStates, mk: Marks) -> np.ndarray:
    """Left of each band: offset in MiB, a THP box (dark: whole chunk THP-mapped) and the worst finding's box."""
    nchunks = -(-states.npages // PAGES_PER_THP)
    labels = [f"{c * 2}M" for c in range(nchunks)]
    label_w = max(len(s) for s in labels) * ADVANCE
    img = np.full((nchunks * BAND, label_w + 16, 3), 255, dtype=np.uint8)
    thp = None if states.thp is None or states.thp.size != states.npages else _rows(states.thp, nchunks).all(axis=1)
    worst = _rows(mk.code, nchunks).max(axis=1)
    ov = _palette(OVERLAYS, WHITE)
    for c, label in enumerate(labels):
        y = c * BAND
        draw_text(img, label_w - len(label) * ADVANCE, y, label)
        if thp is not None:
            img[y + 1 : y + 6, label_w + 2 : label_w + 7] = STATES["data-thp"][0] if thp[c] else SEPARATOR
        img[y + 1 : y + 6, label_w + 9 : label_w + 14] = ov[worst[c]]
    return img


def _legend(width: int, mk: Marks, truncated: bool) -> np.ndarray:
    entries = [(c, t) for c, t in STATES.values()] + [(WP_BIT, "uffd-wp bit set (top strip)")]
    entries += [(c, f"{t} ({'named' if k in mk.kinds else 'none'})") for k, (c, t) in OVERLAYS.items()]
    cols = 2
    col_w = width // cols
    nrows = -(-len(entries) // cols)
    img = np.full(((nrows + 1) * LINE + 4, width, 3), 255, dtype=np.uint8)
    for i, (color, text) in enumerate(entries):
        x, y = (i // nrows) * col_w + 4, (i % nrows) * LINE + 2
        img[y : y + 7, x : x + 7] = color
        draw_text(img, x + 11, y, text[: (col_w - 16) // ADVANCE])
    if truncated:
        draw_text(img, 4, nrows * LINE + 2, "an old verdict.json lists at most 4096 pages a finding: marks partial")
    return img


def render(states: PageStates, findings: Sequence[Finding] = (), *, title: str = "", side: str = "",
           px_per_page: int = 1) -> np.ndarray:
    """The whole picture: title, subpage ruler, gutter + bands, legend."""
    mk = marks(states, findings, side)
    body = render_map(states, mk, px_per_page)
    gutter = _gutter(states, mk)
    width = gutter.shape[1] + body.shape[1]
    ruler = np.full((LINE, width, 3), 255, dtype=np.uint8)
    for sub in range(0, PAGES_PER_THP, 64):
        x = gutter.shape[1] + sub * px_per_page
        ruler[LINE - 2 :, x] = INK
        draw_text(ruler, x + 2, 0, str(sub))
    counts = states.counts()
    head = np.full((3 * LINE, width, 3), 255, dtype=np.uint8)
    draw_text(head, 2, 2, title[: width // ADVANCE])
    summary = (f"{states.npages} pages at {states.start:#x}: data {counts['data']} zero {counts['zeropage']} "
               f"hole {counts['hole']} swapped {counts['swapped']} uffd-wp {counts['uffd_wp']}")
    draw_text(head, 2, 2 + LINE, summary[: width // ADVANCE])
    truncated = any(f.count > len(f.addresses) for f in findings if f.kind in OVERLAYS and f.addresses)
    legend = _legend(width, mk, truncated)
    return np.concatenate([head, ruler, np.concatenate([gutter, body], axis=1), legend], axis=0)


def render_file(npz: str | os.PathLike[str], out: str | os.PathLike[str], verdict: Verdict | None = None,
                px_per_page: int = 1) -> Path:
    """Render one ``pagemap-*.npz`` artifact (with ``verdict``'s findings marked) to the PNG ``out``.

    Without a verdict, a final snapshot (``*last.npz``) still marks the holes among its ``placed`` mask: the
    mask is the model at the end of the run, so only the end state can be judged by it."""
    states, masks = load(npz)
    findings = list(verdict.findings) if verdict else []
    if verdict is None and Path(npz).stem.endswith("last") and "placed" in masks:
        holes = np.nonzero(masks["placed"][: states.npages] & states.hole)[0]
        findings.append(Finding.of("hole", "placed mask", [states.address(int(i)) for i in holes]))
    title = Path(npz).name + (f"  {verdict.scenario}" if verdict else "")
    write_png(out, render(states, findings, title=title, side=side_of(npz), px_per_page=px_per_page))
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suite.reports.pagemap_png", description=__doc__.splitlines()[0])
    p.add_argument("npz", type=Path, help="a pagemap-*.npz artifact")
    p.add_argument("--verdict", type=Path, help="verdict.json whose findings to mark (default: the one beside it)")
    p.add_argument("-o", "--out", type=Path, help="PNG to write (default: the npz's name with .png)")
    p.add_argument("--px", type=int, default=2, choices=(1, 2, 3, 4), help="pixels per page (default 2)")
    a = p.parse_args(argv)
    vpath = a.verdict or a.npz.with_name("verdict.json")
    verdict = Verdict.from_json(vpath.read_text()) if vpath.is_file() else None
    print(render_file(a.npz, a.out or a.npz.with_suffix(".png"), verdict, a.px))
    return 0


LEGEND_HTML = {**{k: (c, t) for k, (c, t) in STATES.items()}, "uffd-wp": (WP_BIT, "uffd-wp bit set (top strip)"),
               **{f"finding-{k}": (c, f"{t}: {KINDS.get(k, k)}") for k, (c, t) in OVERLAYS.items()}}


if __name__ == "__main__":
    sys.exit(main())
