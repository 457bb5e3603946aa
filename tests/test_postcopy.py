"""Real QEMU postcopy migrations, the shrinker fired at each phase (issue: the destination must never turn a
received page into a hole, never stall on one, and both sides hold exactly what holecheck wrote: the model)."""
from __future__ import annotations

import re

import numpy as np
import pytest
from split_rules import assert_split_as_expected

from suite import content
from suite import scenario as sc
from suite.thp import ThpSettings

pytestmark = [pytest.mark.host, pytest.mark.qemu]

THP_SETTINGS = [ThpSettings(max_ptes_none=409), ThpSettings(max_ptes_none=511)]
FILLS = [sc.Fill(8, "spread"), sc.Fill(64, "head")]
# data pages with one non-zero byte each (suite.content): they test the kernel's zero detector itself
SPARSE_FILLS = [sc.Fill(8, "spread", "sparse"), sc.Fill(64, "head", "sparse")]
DST_HAS_THPS = set(sc.POSTCOPY_PHASES[1:])  # from mid-precopy on, the destination holds received THPs


def cells(phases, sampled_phases):
    """(phase, THP knobs, fill) cells: every fill at every phase; of the sparse fills only spread8 at
    ``sampled_phases`` and max_ptes_none 409 outside the cross product (``matrix``: the host's in the main job)."""
    return [pytest.param(p, t, f, id=f"shrink@{p}-{t.id}-{f.id}", marks=() if f.content != "sparse" or (
                f is SPARSE_FILLS[0] and t is THP_SETTINGS[0] and p in sampled_phases) else pytest.mark.matrix)
            for f in FILLS + SPARSE_FILLS for t in THP_SETTINGS for p in phases]


@pytest.mark.parametrize(("phase", "thp_settings", "fill"),
                         cells(sc.POSTCOPY_PHASES, ("before-migrate", "precopy-done", "postcopy-running")))
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
    split would, plus one data page) must be named at once, and must not pass silently once postcopy runs: a
    QEMU that never re-requests a received page stalls the reader (then, once the migration may complete, hands
    it zeros: the data page is lost), or fills the page with zeros at once; a QEMU that re-requests it from the
    source heals it (then the source's postcopy-requests count it). The terminal summary says per QEMU which it
    did, as this run measured it."""
    # nothing slow between the switch and the reads: QEMU >= 10 drains the dirtier's MiB in ~1 s despite the
    # postcopy throttle, and once postcopy is over no reader can stall (a shrink at postcopy-running took 0.9 s)
    scenario = sc.postcopy("precopy-done", sabotage_at="precopy-done")
    verdict = run(scenario)
    handling = missing_page_handling(verdict)
    verdict.notes.append(f"QEMU {verdict.qemu} on a missing received page: {handling}")
    qemu_note(f"a missing received page: {handling}")
    check_verdict(verdict, must_pass=False)
    assert_names_the_holes(verdict, scenario)


def test_negative_control_multifd_postcopy_holes(run, qemu_offers, check_verdict):
    """The same holes with multifd channels: the pages QEMU discards itself at the switch are excused (its
    trace events say which), these never are."""
    if reason := qemu_offers.refusal("multifd"):
        pytest.skip(reason)
    scenario = sc.postcopy("precopy-done", sabotage_at="precopy-done", variant="multifd")
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    assert_names_the_holes(verdict, scenario)


def test_negative_control_postcopy_zeroed_data(run, qemu, check_verdict):
    """Sparse data pages zeroed on the source before the migration, behind the model's back (qtest sets each one's
    non-zero byte to 0), as a zero detector that misjudged them would have: both sides agree, yet the source at the
    switch and the destination at completion must each name exactly those pages as lost data, with the byte."""
    scenario = sc.postcopy("before-migrate", fill=SPARSE_FILLS[0], zeroed_at="before-migrate")
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    zeroed = [int(i) for i in np.flatnonzero(scenario.selector("sabotage-data"))]
    assert [(f.kind, f.phase, f.detail[:7]) for f in verdict.findings] == [
        ("lost-data", "pre-switchover", "src RAM"), ("lost-data", "compare", "dst RAM")], verdict.failure_message()
    for finding in verdict.findings:
        assert finding.addresses == [i * 4096 for i in zeroed] and finding.count == len(zeroed)
        for i in zeroed:
            offset, value = content.sparse_spot(i)
            assert f"gpa {i * 4096:#x}+{offset:#x} reads 0x00, model {value:#04x}" in finding.detail


def assert_names_the_holes(verdict, scenario):
    punched = [int(i) * 4096 for i in np.nonzero(scenario.selector("sabotage-mixed"))[0]]
    data_page = [a for a in punched if scenario.selector("data")[a // 4096]]
    by_kind = {f.kind: f for f in verdict.findings}
    assert by_kind.get("hole") and by_kind["hole"].addresses == punched, verdict.failure_message()
    assert by_kind["hole"].phase == "sabotage-punch(dst, sabotage-mixed)"
    wrong = {"content", "lost-data"} & set(by_kind)  # the data page zero-filled (lost) or otherwise wrong
    for kind in wrong:  # whatever came first, a lost data page is named exactly
        assert by_kind[kind].addresses == data_page, verdict.failure_message()
    if "stall" in by_kind:
        stall = by_kind["stall"]
        assert stall.phase == "read-received" and stall.addresses == punched, verdict.failure_message()
        assert "postcopy-requests=0" in stall.detail and "will not re-request" in stall.detail
        assert set(by_kind) <= {"hole", "stall"} | wrong, verdict.failure_message()
    elif wrong:
        assert set(by_kind) == {"hole"} | wrong and len(wrong) == 1, verdict.failure_message()
    else:  # healed: only if the source was asked for every punched page
        assert requests(verdict) >= len(punched), (
            "a hole among received pages passed silently (no stall, no wrong content, not re-requested):\n"
            + verdict.failure_message() + f"\n  notes: {verdict.notes}")


def requests(verdict) -> int:
    found = [re.search(r"postcopy-requests=(\d+)", n) for n in verdict.notes]
    return max((int(m[1]) for m in found if m), default=0)


def missing_page_handling(verdict) -> str:
    """What the QEMU did with a missing received page, from the run's findings and notes (never from its
    version): stall (and what the reader got in the end), silent zero fill, or re-request."""
    by_kind = {f.kind: f for f in verdict.findings}
    asked = requests(verdict)
    asked_text = f"{asked} postcopy request(s)" if asked else "never re-requested"
    lost = "lost-data" in by_kind
    if lost:  # the wrong data below is the lost data page
        by_kind.setdefault("content", by_kind["lost-data"])
    if "stall" in by_kind:
        after = next((n for n in verdict.notes if n.startswith("after the stall:")), "")
        if m := re.search(r"got gpa \S+ ([\d.]+) s after", after):
            end = "zero fill: data lost" if lost else "wrong data" if "content" in by_kind else "the source's data"
            return f"stall until the migration may complete ({asked_text}), then {end} ({m[1]} s later)"
        return f"stall ({asked_text}; the reader still waits after the migration was let go)"
    late = any(n.startswith("postcopy was over before the reads") for n in verdict.notes)
    reads = next((m for n in verdict.notes if (m := re.search(r"longest after ([\d.]+) s; postcopy was over", n))),
                 None)
    if "content" in by_kind and reads:  # the reader waited until postcopy was over: a stall, cut short
        return (f"stall until postcopy was over ({reads[1]} s here; {asked_text}), then zero fill: data "
                f"{'lost' if lost else 'wrong'}")
    if "content" in by_kind and late:  # not the QEMU's choice: any QEMU zero-fills a page once postcopy is over
        return (f"not measured: postcopy was over before a reader came ({asked_text}; zeros at completion: "
                f"data {'lost' if lost else 'wrong'})")
    if "content" in by_kind:
        return f"silent zero fill ({asked_text}; data lost)" if lost else f"wrong data ({asked_text})"
    return f"re-request ({asked} postcopy requests)" if asked else "nothing (passed silently)"
