"""Decoding real pagemap captures (tests/data/capture_pagemap.py); expectations come from what was done to the
pages, not from the decoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from suite import oracle, pagemap
from suite.scenario import Fill

DATA = Path(__file__).parent.parent / "data"
NPAGES = 2048
DATA_MASK = Fill().data_mask(NPAGES)


def load(name: str) -> pagemap.PageStates:
    z = np.load(DATA / f"pagemap-{name}.npz")
    return pagemap.decode(z["raw"].tobytes(), int(z["start"]),
                          pagemap.ZeroPfns(int(z["zero_small"]), int(z["zero_huge"])))


def test_split_under_wp_maps_zero_subpages_to_the_zero_page_and_keeps_uffd_wp():
    s = load("split-wp")
    assert s.npages == NPAGES
    assert np.array_equal(s.data, DATA_MASK)
    assert np.array_equal(s.zero, ~DATA_MASK)
    assert s.present.all() and not s.hole.any() and not s.swapped.any()
    assert s.uffd_wp.all()
    assert s.counts() == {"pages": 2048, "data": 32, "zeropage": 2016, "hole": 0, "swapped": 0, "uffd_wp": 2048,
                          "soft_dirty": 0}


def test_data_pages_have_distinct_frames_and_zero_pages_share_one():
    s = load("split-wp")
    assert len(set(s.pfn[s.data].tolist())) == 32
    assert set(s.pfn[s.zero].tolist()) == {s.zero_pfns.small}


def test_punched_thp_shows_exactly_the_punched_pages_as_holes():
    s = load("thp-punched")
    punched = 2 * 512 + np.array([100, 101])
    assert np.array_equal(np.nonzero(s.hole)[0], punched)
    assert np.array_equal(oracle.spurious_holes(s, np.ones(NPAGES, dtype=bool)), punched)
    assert oracle.addresses(s, punched) == [s.start + int(i) * 4096 for i in punched]
    # intact THPs: physically contiguous, 2 MiB-aligned frames
    first = s.pfn[:512].astype(np.int64)
    assert first[0] % 512 == 0 and np.array_equal(np.diff(first), np.ones(511))
    assert not s.zero.any()


def test_lost_bits_compare_two_snapshots():
    before = load("split-wp")
    raw = before.raw.copy()
    raw[[5, 700]] &= ~np.uint64(1 << pagemap.UFFD_WP)
    after = pagemap.decode(raw, before.start, before.zero_pfns)
    assert oracle.lost_uffd_wp(before, after).tolist() == [5, 700]
    assert oracle.lost_uffd_wp(before, after, expected=np.arange(NPAGES) != 5).tolist() == [700]
    assert oracle.lost_soft_dirty(before, after).size == 0


def test_swapped_entry_is_neither_present_nor_a_hole():
    entry = (1 << pagemap.SWAPPED) | 0x1234  # swap type/offset in the low bits
    s = pagemap.decode(np.array([entry], dtype=np.uint64), 0, pagemap.ZeroPfns(99))
    assert s.swapped.tolist() == [True] and s.present.tolist() == [False] and s.hole.tolist() == [False]
    assert s.pfn.tolist() == [0]


def test_huge_zero_page_subpages_count_as_zero():
    z = pagemap.ZeroPfns(small=10, huge=4096)
    raw = np.array([(1 << pagemap.PRESENT) | p for p in (10, 4096, 4096 + 511, 4096 + 512)], dtype=np.uint64)
    assert pagemap.decode(raw, 0, z).zero.tolist() == [True, True, True, False]


def test_thp_chunks_needs_kpageflags():
    with pytest.raises(ValueError, match="with_thp"):
        oracle.thp_chunks(load("split-wp"))


def test_mixed_thp_anchors_pick_one_unselected_page_per_mixed_chunk():
    sel = np.zeros(3 * 512, dtype=bool)
    sel[0:3] = True  # chunk 0 mixed: first unselected page 3
    sel[512:1024] = True  # chunk 1 all selected: nothing to split
    sel[1024 + 7] = True  # chunk 2 mixed: first unselected page 1024
    assert oracle.mixed_thp_anchors(sel) == [3, 1024]
    assert oracle.mixed_thp_anchors(np.zeros(512, dtype=bool)) == []
