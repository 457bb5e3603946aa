"""Pure parts of the split-trigger axis: scenario ids and parsing, counters and folio sizes from real captures."""
from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from suite import pagemap
from suite import scenario as sc
from suite import split_triggers as st
from suite.ledger import Ledger
from suite.thp import ThpSettings
from suite.verdict import Verdict

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


# --- judged folio by folio (issue 20 item 3) --------------------------------------------------------------------

HEAD, TAIL = np.uint64(1 << st.KPF_COMPOUND_HEAD), np.uint64(1 << st.KPF_COMPOUND_TAIL)
BASE = 0x7F00_0000_0000


def folio_states(npages: int, size: int, split: set[int] = frozenset(), cut: np.ndarray | None = None,
                 pfn0: int = 0x40000) -> st.FolioMap:
    """The folio map of a region of ``npages`` pages mapped by folios of ``size`` pages at consecutive PFNs; the
    folios numbered in ``split`` are order-0 pages now (same PFNs, no compound bits); ``cut`` pages unmapped."""
    pfn = np.arange(pfn0, pfn0 + npages, dtype=np.uint64)
    flags = np.where(np.arange(npages) % size == 0, HEAD, TAIL).astype(np.uint64)
    for f in split:
        flags[f * size : (f + 1) * size] = 0
    present = np.ones(npages, dtype=bool) if cut is None else ~cut
    return st.FolioMap.of(present, pfn, flags)


def ledger() -> Ledger:
    return Ledger(Verdict(scenario="constructed", kernel="constructed"), snap=lambda _: None, npages=512, base=BASE)


def judge(scenario: sc.Scenario, before: st.FolioMap, after: st.FolioMap, due_mask: np.ndarray) -> Ledger:
    """What judged_split does once the trigger fired (no second firing: these folios stay as constructed)."""
    led = ledger()
    due = before.select(before.holding(due_mask))
    skipped = due.select(due.still_whole(after))
    st.name_skipped(led, "shrink@x", scenario, len(due), skipped, "pageout, fired 4 times", {})
    return led


def test_one_of_32_folios_split_names_the_31_it_skipped() -> None:
    k64 = replace(sc.snapshot_style("after-protect", thp=ThpSettings(mthp_kb=64)), split="pageout")
    before, after = folio_states(512, 16), folio_states(512, 16, split={0})
    assert sum(after.by_size().values()) < sum(before.by_size().values())  # "fewer large folios after": passed
    led = judge(k64, before, after, st.due_pages("pageout", sc.Fill().data_mask(512), "unique"))
    [f] = led.verdict.findings
    assert f.kind == "no-split" and f.count == 31 and f.phase == "shrink@x"
    assert f.addresses == [BASE + i * 16 * pagemap.PAGE for i in range(1, 32)]
    assert "64kB folios (origin write, backing anon) that pageout was due to split" in f.detail
    assert "31 of 32 due" in f.detail


def test_every_folio_split_is_no_finding_and_a_reclaimed_folio_counts_as_split() -> None:
    pmd = replace(sc.snapshot_style("after-protect"), split="debugfs")
    before = folio_states(1024, 512)
    assert not judge(pmd, before, folio_states(1024, 512, split={0, 1}), np.ones(1024, bool)).verdict.findings
    elsewhere = folio_states(1024, 512, pfn0=0x80000)  # large folios again, but other ones (swapped in anew)
    assert not judge(pmd, before, elsewhere, np.ones(1024, bool)).verdict.findings
    led = judge(pmd, before, folio_states(1024, 512, split={0}), np.ones(1024, bool))
    assert [(f.count, f.addresses) for f in led.verdict.findings] == [(1, [BASE + 512 * pagemap.PAGE])]
    assert "2048kB folios" in led.verdict.findings[0].detail


def test_partial_unmap_is_due_only_to_the_folios_it_cut() -> None:
    s = replace(sc.snapshot_style("after-protect", thp=ThpSettings(mthp_kb=64)), split="partial-unmap")
    nonzero = s.fill.data_mask(512)
    cut = st.partial_mask(nonzero, 64)
    assert cut.sum() == 8  # spread8: data every 64th page, so 8 of the 32 folios hold data and are cut
    before = folio_states(512, 16)
    after = folio_states(512, 16, split={i for i in range(32) if i % 4}, cut=cut)  # only the uncut ones split
    led = judge(s, before, after, st.due_pages("partial-unmap", nonzero, "unique", cut))
    [f] = led.verdict.findings  # the 8 cut folios, still whole (mapped but their last page): named as 64 kB
    assert f.addresses == [BASE + i * 64 * pagemap.PAGE for i in range(8)] and "64kB folios" in f.detail
    with pytest.raises(ValueError, match="cut"):
        st.due_pages("partial-unmap", nonzero, "unique")


def test_ksm_is_due_to_folios_holding_a_mergeable_page() -> None:
    nonzero = np.zeros(64, dtype=bool)
    nonzero[:16] = True  # 16 kB folios of 4 pages: folios 0-3 hold unique data only, 4-15 zero pages only
    folios = folio_states(64, 4)
    for split in ("ksm", "ksm-zero"):
        unique = folios.holding(st.due_pages(split, nonzero, "unique"))
        assert unique.tolist() == [False] * 4 + [True] * 12, split
        assert folios.holding(st.due_pages(split, nonzero, "same")).all(), split  # twins merge too
    one_zero = np.ones(64, dtype=bool)
    one_zero[5] = False  # one zero page: ksm-zero merges it with the zero page, ksm has no twin for it
    assert folios.holding(st.due_pages("ksm-zero", one_zero, "sparse")).tolist() == [False, True] + [False] * 14
    assert not folios.holding(st.due_pages("ksm", one_zero, "sparse")).any()
    assert folios.holding(st.due_pages("pageout", one_zero, "unique")).all()


def test_folio_map_of_a_captured_region_and_its_partially_mapped_folio() -> None:
    z = np.load(DATA / "folios-mthp64k-pmd.npz")
    states = pagemap.decode(z["raw"], 0, pagemap.ZeroPfns(int(z["zero_small"]), int(z["zero_huge"])))
    m = st.FolioMap.of(states.data, states.pfn, z["flags"])
    assert m.by_size() == {"2048kB": 1, "64kB": 31, "60kB": 1}
    assert m.first[:2].tolist() == [0, 16] and m.first[-1] == 512 and m.pages[0] == 15
    assert m.still_whole(m).all() and not m.still_whole(m.select(m.pages == 16))[0]


def test_folios_larger_than_the_id_names_are_an_error_smaller_ones_a_note() -> None:
    k64, pmd = ThpSettings(mthp_kb=64), ThpSettings()
    assert st.size_check(folio_states(512, 16), k64, "") == ""
    assert st.size_check(folio_states(1024, 512), pmd, "") == ""
    with pytest.raises(st.SplitError, match=r"a 64kB cell mapped larger folios: \{'2048kB': 1\}"):
        st.size_check(folio_states(512, 512), k64, "")
    assert st.size_check(folio_states(512, 8), k64, "x: ") == "x: no 64kB folio was mapped, only smaller ones " \
        "{'32kB': 64}"
    cut = np.zeros(512, dtype=bool)
    cut[15] = True
    assert st.size_check(folio_states(512, 16, cut=cut), k64, "") == \
        "1 of 32 large folios mapped smaller than 64kB: {'60kB': 1}"


LOCKDOWN_ON, LOCKDOWN_OFF = "none [integrity] confidentiality", "[none] integrity confidentiality"


def test_debugfs_refused_by_lockdown_alone_is_cannot_split() -> None:
    reason = st.debugfs_refusal(OSError(errno.EPERM, "Operation not permitted"), LOCKDOWN_ON)
    assert "kernel lockdown integrity restricts debugfs" in reason


@pytest.mark.parametrize(("err", "lockdown"), [(errno.EPERM, LOCKDOWN_OFF), (errno.EPERM, ""),
                                               (errno.EINVAL, LOCKDOWN_ON), (errno.ESRCH, LOCKDOWN_OFF),
                                               (errno.ENOENT, "")])
def test_any_other_debugfs_failure_is_an_error_of_the_run(err: int, lockdown: str) -> None:
    with pytest.raises(st.SplitError, match="not a refusal by lockdown"):
        st.debugfs_refusal(OSError(err, os.strerror(err)), lockdown)


def test_an_mthp_cell_skips_on_a_kernel_without_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(Path(__file__).resolve().parents[1])  # tests/split_rules.py
    from split_rules import skip_unless_size
    no_sizes = {f"mthp_{kb}kB": False for kb in (16, 64)}
    with pytest.raises(pytest.skip.Exception, match=r"lacks 64kB mTHPs .*hugepages-64kB/enabled"):
        skip_unless_size(no_sizes, ThpSettings(mthp_kb=64))
    skip_unless_size(no_sizes, ThpSettings())  # PMD cells run anywhere
    skip_unless_size({"mthp_64kB": True}, ThpSettings(mthp_kb=64))
