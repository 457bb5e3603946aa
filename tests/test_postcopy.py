"""Real QEMU postcopy migrations, the shrinker fired at each phase (issue: the destination must never turn a
received page into a hole, never stall on one, and end with exactly the source's RAM)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from suite import scenario as sc
from suite.thp import ThpSettings

pytestmark = [pytest.mark.host, pytest.mark.qemu]

THP_SETTINGS = [ThpSettings(max_ptes_none=409), ThpSettings(max_ptes_none=511)]
FILLS = [sc.Fill(8, "spread"), sc.Fill(64, "head")]
DST_HAS_THPS = set(sc.POSTCOPY_PHASES[1:])  # from mid-precopy on, the destination holds received THPs


@pytest.mark.parametrize("fill", FILLS, ids=lambda f: f.id)
@pytest.mark.parametrize("thp_settings", THP_SETTINGS, ids=lambda t: t.id)
@pytest.mark.parametrize("phase", sc.POSTCOPY_PHASES, ids=lambda p: f"shrink@{p}")
def test_postcopy(run, qemu, check_verdict, kernel_features, phase, thp_settings, fill):
    verdict = run(sc.postcopy(phase, fill=fill, thp=thp_settings))
    check_verdict(verdict)
    splits = {s["side"]: s for s in verdict.shrinks}
    if kernel_features["shrink_underused"] and thp_settings.max_ptes_none < 511:
        side = "dst" if phase in DST_HAS_THPS else "src"
        assert splits[side]["split_expected"] and splits[side]["thp_after"] < splits[side]["thp_before"], (
            f"the shrink at {phase} was to split the {side}'s THPs: {verdict.summary()}")
    else:
        assert not verdict.split_expected, verdict.summary()
        assert re.search("max_ptes_none|no underused shrinker", verdict.no_split_reason), verdict.summary()


def test_negative_control_postcopy_holes(run, qemu, check_verdict):
    """Holes punched into received destination pages (zero subpages, as a kernel that leaves pte_none after a
    split would, plus one data page) must be named at once, and must not pass silently once postcopy runs:
    QEMU 7.2 stalls for ever on them (it never re-requests a received page); QEMU 10.0 does not stall but
    fills them with zeros without asking the source, which corrupts the data page."""
    scenario = sc.postcopy("postcopy-running", sabotage_at="precopy-done")
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    punched = [int(i) * 4096 for i in np.nonzero(scenario.selector("sabotage-mixed"))[0]]
    by_kind = {f.kind: f for f in verdict.findings}
    assert by_kind.get("hole") and by_kind["hole"].addresses == punched, verdict.failure_message()
    assert by_kind["hole"].phase == "sabotage-punch(dst, sabotage-mixed)"
    if "stall" in by_kind:
        stall = by_kind["stall"]
        assert stall.phase == "read-received" and stall.addresses == punched, verdict.failure_message()
        assert "postcopy-requests=0" in stall.detail and "will not re-request" in stall.detail
        assert set(by_kind) == {"hole", "stall"}, verdict.failure_message()
    else:
        data_page = [a for a in punched if scenario.selector("data")[a // 4096]]
        assert "content" in by_kind and by_kind["content"].addresses == data_page, (
            "a hole among received pages passed silently:\n" + verdict.failure_message())
        assert set(by_kind) == {"hole", "content"}, verdict.failure_message()
