"""The model of one guest's RAM: what holecheck wrote there, page by page — the truth every side is judged against.

Never another side's RAM: a split that turns a source data page into zeros migrates zeros, and a destination
compared with its source agrees. Each page is zero (never written), a data page of the fill's content
(``suite.content``: ``page(content, index)``) or filled with one byte (the dirtier's memsets, the snapshot's
writes). The only pages the model may not know exactly are those a memset was in flight on when it ended
unanswered: they may hold the byte before or the one sent (``alt``), and nothing else.

``judge`` compares a read of RAM with the model: a page the model holds data in that reads all zero is
``lost-data`` (the zero detector's mistake: a split mapped the zero page over data), any other differing page is
``content``; each named with its first differing byte.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import content
from ..pagemap import PAGE

ZERO, DATA, BYTE = 0, 1, 2  # what a page of the model holds: zeros, content.page(content, arg), arg in every byte
BLOCK = 512  # pages judged at a time: bounds the temporaries (2 MiB each) on a 256 MiB RAM


@dataclass
class RamModel:
    content: str
    npages: int
    kind: np.ndarray = field(init=False)
    arg: np.ndarray = field(init=False)  # DATA: the content's page index; BYTE: the byte
    alt: np.ndarray = field(init=False)  # a byte the page may hold instead (a memset left unanswered), else -1

    def __post_init__(self) -> None:
        self.kind = np.zeros(self.npages, dtype=np.uint8)
        self.arg = np.zeros(self.npages, dtype=np.int64)
        self.alt = np.full(self.npages, -1, dtype=np.int16)

    def fill(self, sel: np.ndarray, salt: int = 0) -> None:
        """The selected pages hold ``content.page(content, index + salt)`` (a salt gives rewrites new bytes)."""
        idx = np.nonzero(sel)[0]
        self.kind[idx], self.arg[idx], self.alt[idx] = DATA, idx + salt, -1

    def rewrite(self, first: int, count: int, salt: int) -> None:
        """Pages ``first … first + count - 1`` hold data again, of the indices ``salt`` further on."""
        self.kind[first : first + count] = DATA
        self.arg[first : first + count] = np.arange(first, first + count) + salt
        self.alt[first : first + count] = -1

    def memset(self, first: int, count: int, byte: int) -> None:
        self.kind[first : first + count] = BYTE if byte else ZERO
        self.arg[first : first + count] = byte
        self.alt[first : first + count] = -1

    def copy(self) -> RamModel:
        out = RamModel(self.content, self.npages)
        out.kind, out.arg, out.alt = self.kind.copy(), self.arg.copy(), self.alt.copy()
        return out

    def pages(self, first: int, count: int) -> np.ndarray:
        """The model's bytes of pages ``first … first + count - 1`` (uint8, ``(count, PAGE)``)."""
        out = np.zeros((count, PAGE), dtype=np.uint8)
        kind, arg = self.kind[first : first + count], self.arg[first : first + count]
        out[kind == BYTE] = arg[kind == BYTE, None].astype(np.uint8)
        for i in np.nonzero(kind == DATA)[0]:
            out[i] = np.frombuffer(content.page(self.content, int(arg[i])), dtype=np.uint8)
        return out

    @property
    def uncertain(self) -> np.ndarray:
        """Pages the model knows only up to one of two bytes (``alt``)."""
        return self.alt >= 0


@dataclass
class Mismatch:
    """Pages of a read that differ from the model: ``lost`` (data read as all zero) and ``wrong`` (the rest), and
    the first differing byte of each (page → (offset, byte read, byte of the model))."""

    lost: list[int] = field(default_factory=list)
    wrong: list[int] = field(default_factory=list)
    first: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def describe(self, pages: list[int], base: int = 0, shown: int = 8) -> str:
        """``gpa 0x…+0x7ff reads 0x00, model 0x3c`` for the first ``shown`` of ``pages``."""
        spots = [f"gpa {base + i * PAGE:#x}+{o:#x} reads {g:#04x}, model {w:#04x}"
                 for i in pages[:shown] for o, g, w in [self.first[i]]]
        return "; ".join(spots) + (", …" if len(pages) > shown else "")


def judge(model: RamModel, ram: bytes | np.ndarray) -> Mismatch:
    """Every page of ``ram`` (the whole RAM, as read) against ``model``."""
    got = np.frombuffer(ram, dtype=np.uint8) if isinstance(ram, bytes | bytearray) else ram
    if got.size != model.npages * PAGE:
        raise ValueError(f"read {got.size} bytes of RAM, the model has {model.npages} pages")
    got = got.reshape(-1, PAGE)
    out = Mismatch()
    for first in range(0, model.npages, BLOCK):
        n = min(BLOCK, model.npages - first)
        have, want = got[first : first + n], model.pages(first, n)
        bad = np.nonzero((have != want).any(axis=1))[0]
        alt = model.alt[first : first + n]
        for b in bad:
            i = first + int(b)
            if alt[b] >= 0 and (have[b] == alt[b]).all():
                continue  # the byte of the memset left unanswered: it landed
            offset = content.first_difference(have[b], want[b])
            out.first[i] = (offset, int(have[b][offset]), int(want[b][offset]))
            (out.lost if want[b].any() and not have[b].any() else out.wrong).append(i)
    return out
