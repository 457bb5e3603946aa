"""userfaultfd's read-write-protect mode (RWP, Linux 7.3; issue 21) across THP splits.

RWP makes present pages inaccessible (PROT_NONE plus the uffd PTE bit that uffd-wp uses: pagemap bit 57); every
split path that must carry uffd-wp must carry it. Sync mode: every first access to a protected page raises exactly
one RWP fault (the helper un-protects the page). Async mode: the kernel resolves the access itself and PAGEMAP_SCAN's
PAGE_IS_ACCESSED reads the hot set back. ``UFFDIO_SET_MODE`` toggles async at run time (7.3 toggles only
UFFD_FEATURE_RWP_ASYNC). Kernels without RWP (before 7.3) skip every cell, naming the feature. The split triggers
(pageout, partial unmap, KSM, …) × folio sizes run RWP through tests/test_triggers.py (kinds ``rwp*``).
"""
from __future__ import annotations

import numpy as np
import pytest
from split_rules import assert_memory_split

from suite import memory_axes as ma
from suite import pagemap
from suite import scenario as sc

pytestmark = pytest.mark.host

NO_RWP = "kernel lacks userfaultfd RWP (UFFD_FEATURE_RWP)"
NO_RWP_ASYNC = "kernel lacks userfaultfd RWP_ASYNC (UFFD_FEATURE_RWP_ASYNC) or PAGEMAP_SCAN"
# the self-tests' sample (L1 kernels run it in the main job, 10-40 s a cell under TCG); --matrix runs the rest
SAMPLE = {("sync", "after-protect"), ("async", "after-protect"), ("async-sync", "after-protect")}


def need_rwp(features: dict[str, bool], mode: str = "sync") -> None:
    """Skip, naming the feature, on a kernel whose UFFDIO_API (probed on it by targets.preflight) lacks RWP."""
    if not features.get("uffd_rwp"):
        pytest.skip(NO_RWP)
    if mode != "sync" and not (features.get("uffd_rwp_async") and features.get("pagemap_scan")):
        pytest.skip(NO_RWP_ASYNC)


CELLS = [c if c in SAMPLE else pytest.param(*c, marks=pytest.mark.matrix)
         for c in [(m, p) for m in ma.RWP_MODES for p in sc.SNAPSHOT_SHRINK_POINTS]]


@pytest.mark.parametrize(("mode", "shrink_at"), CELLS, ids=[f"{m}-shrink@{p}" for m in ma.RWP_MODES
                                                              for p in sc.SNAPSHOT_SHRINK_POINTS])
def test_rwp(run, check_verdict, kernel_features, mode, shrink_at):
    """No RWP bit lost across the split; sync: exactly one RWP fault per protected page on its first access and
    none on the second; async: PAGEMAP_SCAN's hot / cold sets are exactly the pages accessed / not."""
    need_rwp(kernel_features, mode)
    scenario = ma.rwp_style(mode, shrink_at)
    verdict = run(scenario)
    check_verdict(verdict)
    assert_memory_split(verdict, kernel_features, scenario)


@pytest.mark.parametrize("origin", [pytest.param(o, marks=pytest.mark.matrix) for o in ("read", "collapse")])
def test_rwp_origin(run, check_verdict, kernel_features, origin):
    """THPs born by a read (the huge zero page) or MADV_COLLAPSE, protected, split: the same verdicts."""
    need_rwp(kernel_features)
    scenario = ma.with_memory(ma.rwp_style("sync", "after-protect"), origin=origin)
    verdict = run(scenario)
    check_verdict(verdict)
    assert_memory_split(verdict, kernel_features, scenario)


def _sabotaged(scenario: sc.Scenario, region: int) -> list[int]:
    """The pages the negative control un-protects that were still protected: its zero subpages not read before."""
    idx = np.nonzero(scenario.selector("sabotage") & ~scenario.selector("zero-some-half"))[0]
    return [region + int(i) * pagemap.PAGE for i in idx]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rwp_negative_control(run, check_verdict, kernel_features, mode):
    """Pages un-protected behind the model's back after the split: sync names exactly them as accessed without an
    RWP fault (at the first read of the zero subpages), async as read hot by PAGEMAP_SCAN though never accessed;
    both name them as a lost bit at the sabotage itself."""
    need_rwp(kernel_features, mode)
    scenario = ma.rwp_style(mode, "after-protect", sabotage=True)
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    kind, phase = ("no-rwp-fault", "touch(read, zero)") if mode == "sync" else ("untouched-hot", "dump(accessed)")
    named = [f for f in verdict.findings if f.kind == kind]
    assert [f.phase for f in named][:1] == [phase], verdict.failure_message()
    assert named[0].addresses == _sabotaged(scenario, verdict.region), verdict.failure_message()
    lost = [f for f in verdict.findings if f.kind == "lost-uffd-wp"]
    assert [(f.phase, f.addresses) for f in lost] == [("sabotage-unrwp(0, sabotage)", named[0].addresses)], \
        verdict.failure_message()
    assert {f.kind for f in verdict.findings} <= {kind, "lost-uffd-wp"}, verdict.failure_message()
