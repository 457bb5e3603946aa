"""Regenerate tests/data/pagemap-*.npz: real pagemap captures the unit tests decode (run as root:
`.venv/bin/python tests/data/capture_pagemap.py`). Each capture is 4 THP-sized chunks whose state is known
from what was done to them, independently of the decoder."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from suite import memcg, pagemap, shrinker, thp
from suite.scenario import Fill
from suite.uffd import UffdHelper

HERE = Path(__file__).parent
SIZE = 4 * pagemap.THP_SIZE
DATA = Fill().data_mask(SIZE // pagemap.PAGE)  # 8 data subpages per chunk


def place_data(h: UffdHelper) -> None:
    for i in np.nonzero(DATA)[0]:
        h.place(int(i) * pagemap.PAGE, pagemap.PAGE)


def save(name: str, h: UffdHelper, **extra: object) -> None:
    assert h.addr is not None
    raw = pagemap.read_raw(h.pid, h.addr, SIZE)
    z = pagemap.zero_pfns()
    np.savez_compressed(HERE / f"pagemap-{name}.npz", raw=raw, start=h.addr, zero_small=z.small,
                        zero_huge=z.huge, kernel=os.uname().release, **extra)
    print(name, pagemap.decode(raw, h.addr, z).counts())


def main() -> None:
    with thp.applied(thp.ThpSettings(max_ptes_none=409)), memcg.scope("capture") as cg:
        # 1. THPs split after write-protection: data subpages + zero-page subpages, all uffd-wp
        with UffdHelper(argv_prefix=cg.wrap([])) as h:
            h.map(SIZE)
            h.madvise("hugepage", 0, SIZE)
            place_data(h)
            h.register("wp")
            h.wp(0, SIZE, True)
            shrinker.fire("memcg", cg)
            save("split-wp", h)
        # 2. THPs intact (before the shrink), then two subpages punched out of chunk 2 (holes)
        with UffdHelper(argv_prefix=cg.wrap([])) as h:
            h.map(SIZE)
            h.madvise("hugepage", 0, SIZE)
            place_data(h)
            h.madvise("dontneed", 2 * pagemap.THP_SIZE + 100 * pagemap.PAGE, 2 * pagemap.PAGE)
            save("thp-punched", h)


if __name__ == "__main__":
    main()
