"""Real QEMU postcopy migrations, the shrinker fired at each phase (issue: the destination must never turn a
received page into a hole, never stall on one, and end with exactly the source's RAM)."""
from __future__ import annotations

import re

import numpy as np
import pytest
from split_rules import assert_split_as_expected

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
    assert_split_as_expected(verdict, kernel_features, thp_settings, side="dst" if phase in DST_HAS_THPS else "src")


@pytest.mark.parametrize("fill", FILLS, ids=lambda f: f.id)
@pytest.mark.parametrize("thp_settings", THP_SETTINGS[:1], ids=lambda t: t.id)
@pytest.mark.parametrize("phase", sc.POSTCOPY_PHASES, ids=lambda p: f"shrink@{p}")
@pytest.mark.parametrize("variant", [v for v in sc.POSTCOPY_VARIANTS if v])
def test_postcopy_variant(run, qemu_offers, check_verdict, kernel_features, variant, phase, thp_settings, fill):
    """The same phases and per-page verdicts with more of QEMU's migration machinery: multifd channels that find
    zero pages themselves (QEMU >= 10.1 takes multifd with postcopy), postcopy-preempt. A received page that is
    not present and never re-requested is a finding whether the kernel or QEMU made it."""
    if reason := qemu_offers.refusal(variant):
        pytest.skip(reason)
    verdict = run(sc.postcopy(phase, fill=fill, thp=thp_settings, variant=variant))
    check_verdict(verdict)
    assert_split_as_expected(verdict, kernel_features, thp_settings, side="dst" if phase in DST_HAS_THPS else "src")


def test_negative_control_postcopy_holes(run, qemu, qemu_note, check_verdict):
    """Holes punched into received destination pages (zero subpages, as a kernel that leaves pte_none after a
    split would, plus one data page) must be named at once, and must not pass silently once postcopy runs:
    QEMU 7.2 stalls for ever on them (it never re-requests a received page); QEMU 10.0 does not stall but
    fills them with zeros without asking the source, which corrupts the data page. A QEMU that re-requests
    them from the source would heal them: then the source's postcopy-requests count them. The terminal summary
    says per QEMU which of the three it did."""
    scenario = sc.postcopy("postcopy-running", sabotage_at="precopy-done")
    verdict = run(scenario)
    handling = missing_page_handling(verdict)
    verdict.notes.append(f"QEMU {verdict.qemu} on a missing received page: {handling}")
    qemu_note(f"a missing received page: {handling}")
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
    elif "content" in by_kind:
        data_page = [a for a in punched if scenario.selector("data")[a // 4096]]
        assert by_kind["content"].addresses == data_page, verdict.failure_message()
        assert set(by_kind) == {"hole", "content"}, verdict.failure_message()
    else:  # healed: only if the source was asked for every punched page
        assert requests(verdict) >= len(punched), (
            "a hole among received pages passed silently (no stall, no wrong content, not re-requested):\n"
            + verdict.failure_message() + f"\n  notes: {verdict.notes}")


def requests(verdict) -> int:
    found = [re.search(r"postcopy-requests=(\d+)", n) for n in verdict.notes]
    return max((int(m[1]) for m in found if m), default=0)


def missing_page_handling(verdict) -> str:
    kinds = {f.kind for f in verdict.findings}
    if "stall" in kinds:
        return "stall (never re-requested; the reader waits for ever)"
    if "content" in kinds:
        return "silent zero fill (not re-requested; data lost)"
    return f"re-request ({requests(verdict)} postcopy requests)" if requests(verdict) else "nothing (passed silently)"
