"""Page-state oracle, judging side: which pages went wrong between two snapshots.

A *spurious hole* is a page known placed (written, received, or present before) that is now neither present
nor swapped. A *lost bit* is a uffd-wp or soft-dirty bit reported before a step that should not clear it and
missing after. All vectorised over the per-page arrays of ``pagemap.PageStates``.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .pagemap import PageStates


def spurious_holes(now: PageStates, placed: np.ndarray) -> np.ndarray:
    """Indices of placed pages that are pte_none now."""
    return np.nonzero(placed & now.hole)[0]


def lost_uffd_wp(before: PageStates, after: PageStates, expected: np.ndarray | None = None) -> np.ndarray:
    """Indices whose uffd-wp bit was reported before and is gone after (restricted to ``expected`` if given)."""
    lost = before.uffd_wp & ~after.uffd_wp
    return np.nonzero(lost if expected is None else lost & expected)[0]


def lost_soft_dirty(before: PageStates, after: PageStates) -> np.ndarray:
    return np.nonzero(before.soft_dirty & ~after.soft_dirty)[0]


def thp_chunks(states: PageStates) -> int:
    """Number of THP-sized chunks whose every page is THP-backed (needs ``with_thp`` snapshots)."""
    if states.thp is None:
        raise ValueError("snapshot taken without kpageflags (with_thp=False)")
    n = states.npages // 512 * 512
    return int(states.thp[:n].reshape(-1, 512).all(axis=1).sum())


def underused_thps(states: PageStates, nonzero: np.ndarray, max_ptes_none: int) -> int:
    """THP-mapped chunks that the shrinker should split: more than ``max_ptes_none`` of their subpages are
    zero-filled according to ``nonzero`` (the model's content; pagemap cannot see inside a THP)."""
    if states.thp is None:
        raise ValueError("snapshot taken without kpageflags (with_thp=False)")
    n = states.npages // 512 * 512
    thp = states.thp[:n].reshape(-1, 512).all(axis=1)
    zero = 512 - nonzero[:n].reshape(-1, 512).sum(axis=1)
    return int((thp & (zero > max_ptes_none)).sum())


def skipped_splits(before: PageStates, after: PageStates, nonzero: np.ndarray, max_ptes_none: int) -> np.ndarray:
    """Chunk indices of THPs that were underused before a shrink and are still whole THPs after it."""
    if before.thp is None or after.thp is None:
        raise ValueError("snapshot taken without kpageflags (with_thp=False)")
    n = before.npages // 512 * 512
    whole_before = before.thp[:n].reshape(-1, 512).all(axis=1)
    whole_after = after.thp[:n].reshape(-1, 512).all(axis=1)
    zero = 512 - nonzero[:n].reshape(-1, 512).sum(axis=1)
    return np.nonzero(whole_before & (zero > max_ptes_none) & whole_after)[0]


def split_expectation(before: PageStates, nonzero: np.ndarray, knobs_reason: str, max_ptes_none: int) -> str:
    """Why no split is expected at this shrink ('' when one is)."""
    if knobs_reason:
        return knobs_reason
    if before.thp is None or not before.thp.any():
        return "no THP was mapped at the shrink"
    if not underused_thps(before, nonzero, max_ptes_none):
        return f"no mapped THP is underused (none has more than max_ptes_none {max_ptes_none} zero subpages)"
    return ""


def addresses(states: PageStates, indices: np.ndarray) -> list[int]:
    return [states.start + int(i) * 4096 for i in indices]


def mixed_thp_anchors(sel: np.ndarray) -> list[int]:
    """For each 2 MiB chunk holding both selected and unselected pages, its first unselected page."""
    n = len(sel) // 512 * 512
    chunks = sel[:n].reshape(-1, 512)
    mixed = chunks.any(axis=1) & ~chunks.all(axis=1)
    return [int(c * 512 + np.argmin(chunks[c])) for c in np.nonzero(mixed)[0]]


def runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first page, page count) of each run of True in ``mask``."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    for lo, hi in zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0], strict=True):
        yield int(lo), int(hi - lo)
