"""Regenerate tests/data/split/folios-*.npz (run as root: `.venv/bin/python tests/data/split/capture_folios.py`):
real pagemap + kpageflags of a 4 MiB region whose folios are known from what was done to them:
the first 2 MiB under 64 kB mTHPs (one byte written every 64 kB, then the last subpage of the first folio
MADV_DONTNEEDed: a partially mapped 64 kB folio), the second 2 MiB a PMD THP (one byte written)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from suite import pagemap, thp
from suite.uffd import UffdHelper

HERE = Path(__file__).parent
SIZE = 2 * pagemap.THP_SIZE


def main() -> None:
    with UffdHelper() as h:
        base = h.map(SIZE)
        h.madvise("hugepage", 0, SIZE)
        with thp.applied(thp.ThpSettings(mthp_kb=64)):
            for off in range(0, pagemap.THP_SIZE, 64 * 1024):
                h.place(off, pagemap.PAGE)
        h.madvise("dontneed", 15 * pagemap.PAGE, pagemap.PAGE)
        with thp.applied(thp.ThpSettings()):
            h.place(pagemap.THP_SIZE, pagemap.PAGE)
        states = pagemap.snapshot(h.pid, base, SIZE)
        flags = np.zeros(states.npages, dtype=np.uint64)
        idx = np.nonzero(states.data)[0]
        flags[idx] = pagemap.read_kpageflags(states.pfn[idx])
        np.savez_compressed(HERE / "folios-mthp64k-pmd.npz", raw=states.raw, flags=flags,
                            zero_small=states.zero_pfns.small, zero_huge=states.zero_pfns.huge,
                            kernel=os.uname().release)


if __name__ == "__main__":
    main()
