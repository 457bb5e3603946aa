"""Pure parts of the split-trigger axis: scenario ids and parsing, counters and folio sizes from real captures."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from suite import pagemap
from suite import scenario as sc
from suite import split_triggers as st
from suite.thp import ThpSettings

DATA = Path(__file__).resolve().parents[1] / "data" / "split"


def test_default_split_keeps_every_id() -> None:
    s = sc.snapshot_style("after-protect")
    assert s.split == "shrinker" and s.id == "snapshot-style[shrink@after-protect-mpn409-spread8]"
    assert replace(s, split="pageout").id == "snapshot-style[shrink@after-protect-mpn409-spread8-by-pageout]"


def test_split_round_trips_and_old_json_reads_as_shrinker() -> None:
    s = replace(sc.soft_dirty_style(thp=ThpSettings(mthp_kb=64, mthp_enabled="madvise")), split="ksm-zero")
    assert sc.Scenario.from_json(s.to_json()) == s
    old = s.to_json().replace(', "split": "ksm-zero"', "")
    assert sc.Scenario.from_json(old).split == "shrinker"


def test_bad_split_is_refused() -> None:
    with pytest.raises(ValueError, match="no split trigger 'reclaim'"):
        replace(sc.snapshot_style("after-protect"), split="reclaim")
    with pytest.raises(ValueError, match="postcopy scenario has no split trigger 'partial-unmap'"):
        replace(sc.postcopy("mid-precopy"), split="partial-unmap")


def test_mthp_size_in_ids() -> None:
    assert ThpSettings().id == "mpn409"
    assert ThpSettings(mthp_kb=64).id == "mpn409-mthp64k"
    assert ThpSettings(mthp_kb=1024, mthp_enabled="madvise").id == "mpn409-mthp1024k-madvise"


def test_counters_from_captured_vmstat_and_stats() -> None:
    stats = dict(line.removeprefix("hugepages-").split() for line in
                 (DATA / "stats-split-6.18.44.txt").read_text().splitlines())
    got = st.parse_counters((DATA / "vmstat-6.18.44").read_text(), stats)
    assert got["thp_split_page"] == int(next(line.split()[1] for line in (DATA / "vmstat-6.18.44").read_text()
                                             .splitlines() if line.startswith("thp_split_page ")))
    assert got["split-2048kB"] == 1003 and got["split-64kB"] == 768 and got["split-8kB"] == 57
    assert set(got) >= {"thp_split_page", "thp_split_page_failed", "thp_deferred_split_page",
                        "thp_underused_split_page"}
    assert not any(k.startswith("nr_") for k in got)


def test_folio_sizes_from_captured_pagemap_and_kpageflags() -> None:
    z = np.load(DATA / "folios-mthp64k-pmd.npz")
    states = pagemap.decode(z["raw"], 0, pagemap.ZeroPfns(int(z["zero_small"]), int(z["zero_huge"])))
    pages = st.folio_pages(states.data, states.pfn, z["flags"])
    # 32 64 kB folios in the first 2 MiB, the first one missing its last subpage; then one PMD THP
    assert st.by_size(pages) == {"2048kB": 1, "64kB": 31, "60kB": 1}
    assert pages[15] == 0 and (pages[:15] == 15).all() and (pages[512:] == 512).all()


def test_folio_mapped_from_its_middle_is_not_counted() -> None:
    head, tail = np.uint64(1 << st.KPF_COMPOUND_HEAD), np.uint64(1 << st.KPF_COMPOUND_TAIL)
    flags = np.array([tail, tail, head, tail, 0], dtype=np.uint64)
    pfn = np.array([11, 12, 20, 21, 0], dtype=np.uint64)
    data = np.array([True, True, True, True, False])
    assert st.folio_pages(data, pfn, flags).tolist() == [0, 0, 2, 2, 0]


def test_partial_mask_takes_the_last_zero_subpage_of_each_folio_with_data() -> None:
    nonzero = sc.Fill().data_mask(1024)  # spread8: data every 64th subpage
    pmd = st.partial_mask(nonzero, 0)
    assert np.nonzero(pmd)[0].tolist() == [511, 1023]
    k64 = st.partial_mask(nonzero, 64)  # 16-page blocks; only those holding data
    assert np.nonzero(k64)[0].tolist() == [i * 64 + 15 for i in range(16)]
    assert not (k64 & nonzero).any()


def test_no_split_reason_says_why_per_cell() -> None:
    assert "only splits PMD-sized THPs: cannot split 64kB" in st.no_split_reason("shrinker", 64, {"64kB": 3}, "")
    assert st.no_split_reason("shrinker", 0, {"2048kB": 3}, "max_ptes_none is 511") == "max_ptes_none is 511"
    assert st.no_split_reason("pageout", 64, {}, "") == "no large folio was mapped at the split"
    assert st.no_split_reason("ksm", 0, {"2048kB": 1}, "shrink_underused is 0") == ""


def test_swap_is_never_set_up_outside_an_l1_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    from suite import l1_swap

    monkeypatch.delenv("HOLECHECK_L1", raising=False)
    assert "the host's swap is never changed" in l1_swap.why_not()
    with pytest.raises(l1_swap.SwapUnavailable, match="only set up inside an L1 VM"), l1_swap.zram_swap():
        pass
