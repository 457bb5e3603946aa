"""What holecheck writes into a data page: the model's bytes, the one truth every side is judged against.

A data page's content is a function of its page index (in the region, or its guest-physical page number) and the
fill's ``content`` axis:

- ``unique``: every 64-bit word holds ``STAMP | index`` — no two data pages alike, every byte of the page used;
- ``same``: every word holds ``STAMP`` — all data pages identical, so KSM has duplicates to merge;
- ``sparse``: one non-zero byte, at an offset and with a value derived from the index, the rest zero — the pages
  real guests are full of (a stack page with data near its top, a fresh structure that is mostly zero). They test
  the kernel's zero-subpage detector itself: a detector that looks at part of a page, at words where it should
  look at bytes, or at a byte where it should look at a bit, calls such a page zero-filled and maps the zero page
  over data. Offsets cover every part of a page (0, 4095, word and cache-line boundaries, the middle) because the
  offset of page ``i`` is a bijection of ``i mod 4096``; values run 1 … 255 with ``i // 4096``, so every page of
  up to 4 GiB is unique (no KSM merges among them either).

``suite/uffd_helper.c`` and ``suite/reports/reproducer_runtime.c`` compute the same bytes (``sparse_spot`` there);
``tests/unit/test_content.py`` pins both to this module.
"""
from __future__ import annotations

import numpy as np

PAGE = 4096
STAMP = 0x484F4C45_00000000  # "HOLE" | page index
CONTENTS = ("unique", "same", "sparse")


def _bitrev12(x: int) -> int:
    return int(f"{x & 0xFFF:012b}"[::-1], 2)


def sparse_spot(index: int) -> tuple[int, int]:
    """(byte offset, byte value) of the one non-zero byte of sparse data page ``index``."""
    offset = (_bitrev12(index) * 1031 + 4095) % PAGE  # odd multiplier: a bijection of the low 12 bits
    value = (index >> 12) % 255 + 1
    return offset, value


def page(content: str, index: int) -> bytes:
    """The 4,096 bytes of data page ``index``."""
    if content == "unique":
        return np.full(PAGE // 8, STAMP | index, dtype="<u8").tobytes()
    if content == "same":
        return np.full(PAGE // 8, STAMP, dtype="<u8").tobytes()
    if content == "sparse":
        buf = bytearray(PAGE)
        offset, value = sparse_spot(index)
        buf[offset] = value
        return bytes(buf)
    raise ValueError(f"unknown fill content {content!r} (one of {', '.join(CONTENTS)})")


def expected(content: str, data: np.ndarray) -> np.ndarray:
    """The model's bytes of a whole region (uint8, ``len(data) * PAGE``): ``page(content, i)`` where ``data[i]``,
    zeros elsewhere."""
    out = np.zeros((len(data), PAGE), dtype=np.uint8)
    for i in np.nonzero(data)[0]:
        out[i] = np.frombuffer(page(content, int(i)), dtype=np.uint8)
    return out.reshape(-1)


def first_difference(got: bytes | np.ndarray, want: bytes | np.ndarray) -> int:
    """Offset of the first byte where a page differs from the model (-1 where it does not)."""
    a = np.frombuffer(got, dtype=np.uint8) if isinstance(got, bytes | bytearray) else got
    b = np.frombuffer(want, dtype=np.uint8) if isinstance(want, bytes | bytearray) else want
    diff = np.nonzero(a != b)[0]
    return int(diff[0]) if diff.size else -1
