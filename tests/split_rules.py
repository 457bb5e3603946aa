"""When must a shrink split THPs? One rule for every scenario test module (synthetic, postcopy, snapshot).

A shrink is due to split when the kernel has the underused-THP shrinker, the knobs allow underused splits
(``max_ptes_none`` below 511) and THPs exist at that point (``due``: a cell that registers before the first fault
places 4 KiB pages with UFFDIO_COPY). Otherwise the verdict must say why no split was expected.
"""
from __future__ import annotations

import re

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
