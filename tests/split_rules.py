"""When must a shrink split THPs? The rules of every scenario test module, in one place.

The underused shrinker (synthetic, postcopy, snapshot): a shrink is due to split when the kernel has it, the knobs
allow underused splits (``max_ptes_none`` below 511) and THPs exist at that point (``due``: a cell that registers
before the first fault places 4 KiB pages with UFFDIO_COPY); it splits anonymous PMD THPs only (not mTHPs, not
shmem). Other split triggers split every large folio they are due to, of any size (pageout, debugfs: every folio
of the range; partial unmap: the folios it cut; KSM: the folios holding a mergeable page), judged folio by folio;
debugfs may be refused by lockdown alone. mTHP cells run only where the kernel has that size. A THP born by a
read (the huge zero page) exists only from 6.15 on. Whenever no split was expected, the verdict must say why:
never a silent pass.
"""
from __future__ import annotations

import re

import pytest

from suite import scenario as sc
from suite.thp import ThpSettings
from suite.verdict import Verdict


def underused_splits(features: dict[str, bool], thp: ThpSettings) -> bool:
    """Do the kernel and the knobs allow underused splits at all?"""
    return features["shrink_underused"] and thp.max_ptes_none is not None and thp.max_ptes_none < 511


def assert_split_as_expected(verdict: Verdict, features: dict[str, bool], thp: ThpSettings, *, due: bool = True,
                             side: str = "") -> None:
    """The verdict expected a split exactly when one was due (on ``side``'s RAM, for real QEMU, which must then
    hold fewer THPs after the shrink), and names the kernel or knob that ruled it out otherwise."""
    expected = due and underused_splits(features, thp)
    if expected and side:
        split = {s["side"]: s for s in verdict.shrinks}[side]
        assert split["split_expected"] and split["thp_after"] < split["thp_before"], (
            f"the shrink was to split the {side}'s THPs: {verdict.summary()}")
        return
    assert verdict.split_expected == expected, (
        f"cell was to {'split' if expected else 'not split'} THPs: {verdict.summary()}")
    if not underused_splits(features, thp):
        assert re.search("max_ptes_none|no underused shrinker", verdict.no_split_reason), verdict.summary()


ALWAYS_SPLIT = ("pageout", "partial-unmap", "ksm", "ksm-zero")  # on any kernel with THP and these interfaces


def assert_trigger_split(verdict: Verdict, features: dict[str, bool], split: str, thp: ThpSettings) -> None:
    """A split-trigger cell split (every folio it was due to, or a ``no-split`` finding names the rest: the
    runner judges folio by folio, ``split_triggers.judged_split``) or says why it could not: the shrinker on
    mTHPs, debugfs under lockdown (any other debugfs failure is an error of the run), pageout-swap without swap.
    A cell whose kernel mapped no folio of its size says so and fails here, as does one on PMD THPs."""
    assert verdict.split_expected or verdict.no_split_reason, f"no split and no reason: {verdict.summary()}"
    if split == "shrinker" and thp.mthp_kb:
        assert "only splits PMD-sized THPs" in verdict.no_split_reason, verdict.summary()
    if split in ALWAYS_SPLIT:
        assert verdict.split_expected, f"{split} was due to split the {size_of(thp)} folios: {verdict.summary()}"
    if split == "debugfs" and not verdict.split_expected:
        assert "lockdown" in verdict.no_split_reason, verdict.summary()
    if not thp.mthp_kb and split == "shrinker":
        assert verdict.split_expected == features["shrink_underused"], verdict.summary()
    if split == "pageout-swap" and verdict.split_expected:  # swap really used, not the no-swap fallback
        swapped = [s["vmstat"].get("pswpout", 0) for s in verdict.shrinks]
        assert all(swapped), f"pageout-swap swapped nothing out (pswpout {swapped}): {verdict.summary()}"


def size_of(thp: ThpSettings) -> str:
    return f"{thp.mthp_kb}kB" if thp.mthp_kb else "PMD"


def skip_unless_size(features: dict[str, bool], thp: ThpSettings) -> None:
    """An mTHP cell on a kernel without that size's knob would map PMD THPs under the mTHP id: skip, saying so."""
    if thp.mthp_kb and not features.get(f"mthp_{thp.mthp_kb}kB"):
        pytest.skip(f"kernel under test lacks {thp.mthp_kb}kB mTHPs "
                    f"(no /sys/kernel/mm/transparent_hugepage/hugepages-{thp.mthp_kb}kB/enabled)")


def release_of(verdict: Verdict) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", verdict.kernel)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def assert_memory_split(verdict: Verdict, features: dict[str, bool], scenario: sc.Scenario) -> None:
    """A backing / origin cell split what the kernel promises, or its verdict says why not."""
    if scenario.backing == "memfd":
        assert not verdict.split_expected and "anonymous THPs only" in verdict.no_split_reason, verdict.summary()
        return
    can = features["shrink_underused"]
    if scenario.origin == "read" and release_of(verdict) < (6, 15):  # a write to the huge zero page: 4 KiB pages
        can = can and "no THP was mapped" not in verdict.no_split_reason
    assert verdict.split_expected == can, f"split expected {can}: {verdict.summary()}"
