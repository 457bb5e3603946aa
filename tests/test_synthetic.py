"""Synthetic userfaultfd sequences: QEMU's postcopy destination and background snapshot, without QEMU.

Each cell places registration and the shrink at chosen points; the oracle judges every 4 KiB page.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from split_rules import assert_split_as_expected

from suite import pagemap
from suite import scenario as sc
from suite.thp import ThpSettings

pytestmark = pytest.mark.host

THP_SETTINGS = [ThpSettings(max_ptes_none=409), ThpSettings(max_ptes_none=511)]
POINTS = sc.POSTCOPY_POINTS
POSTCOPY_CELLS = (
    [(r, s) for r, s in itertools.product(POINTS, POINTS)]
    + [("after-shrink", s) for s in POINTS]
    + [(r, "after-register") for r in POINTS]
)


def due(register_at: str, shrink_at: str) -> bool:
    """THPs exist at the shrink: not when it or registration comes before the first fault (UFFDIO_COPY then
    places 4 KiB pages)."""
    shrink_point = register_at if shrink_at == "after-register" else shrink_at
    return "before-first-fault" not in (shrink_point, register_at)


@pytest.mark.parametrize("thp_settings", THP_SETTINGS, ids=lambda t: t.id)
@pytest.mark.parametrize(("register_at", "shrink_at"), POSTCOPY_CELLS,
                         ids=[f"register@{r}-shrink@{s}" for r, s in POSTCOPY_CELLS])
def test_postcopy_style(run, check_verdict, kernel_features, register_at, shrink_at, thp_settings):
    """No placed page may turn into a hole, and no placed page may raise a MISSING fault."""
    scenario = sc.postcopy_style(register_at, shrink_at, thp=thp_settings)
    verdict = run(scenario)
    check_verdict(verdict)
    assert_split_as_expected(verdict, kernel_features, thp_settings, due=due(register_at, shrink_at))


@pytest.mark.parametrize("thp_settings", THP_SETTINGS, ids=lambda t: t.id)
@pytest.mark.parametrize("shrink_at", sc.SNAPSHOT_SHRINK_POINTS, ids=lambda p: f"shrink@{p}")
def test_snapshot_style(run, check_verdict, kernel_features, shrink_at, thp_settings):
    """Every write to a write-protected page must trap, and no uffd-wp bit may be lost across the split."""
    verdict = run(sc.snapshot_style(shrink_at, thp=thp_settings))
    check_verdict(verdict)
    assert_split_as_expected(verdict, kernel_features, thp_settings)


@pytest.mark.parametrize("thp_settings", THP_SETTINGS[:1], ids=lambda t: t.id)
def test_snapshot_style_soft_dirty(run, check_verdict, kernel_features, thp_settings):
    """Soft-dirty bits reported before the split must still be reported after it."""
    if not kernel_features["soft_dirty"]:
        pytest.skip("kernel under test lacks CONFIG_MEM_SOFT_DIRTY: pagemap bit 55 is never set")
    verdict = run(sc.soft_dirty_style(thp=thp_settings))
    check_verdict(verdict)
    assert_split_as_expected(verdict, kernel_features, thp_settings)


# The content axis: data pages with one non-zero byte each (suite/content.py); a data page that reads zero or maps
# the zero page after the split is lost-data. Every snapshot point and a sample of the postcopy points
SPARSE = sc.Fill(content="sparse")
SPARSE_POSTCOPY = [("after-discard", "after-place"), ("after-place", "after-nohugepage"),
                   ("after-shrink", "after-discard")]


@pytest.mark.parametrize("shrink_at", sc.SNAPSHOT_SHRINK_POINTS, ids=lambda p: f"shrink@{p}")
def test_snapshot_style_sparse(run, check_verdict, kernel_features, shrink_at):
    """Sparse data pages keep their byte across the split, every write traps, no uffd-wp bit is lost."""
    verdict = run(sc.snapshot_style(shrink_at, fill=SPARSE, thp=THP_SETTINGS[0]))
    check_verdict(verdict)
    assert_split_as_expected(verdict, kernel_features, THP_SETTINGS[0])


@pytest.mark.parametrize(("register_at", "shrink_at"), SPARSE_POSTCOPY,
                         ids=[f"register@{r}-shrink@{s}" for r, s in SPARSE_POSTCOPY])
def test_postcopy_style_sparse(run, check_verdict, kernel_features, register_at, shrink_at):
    """Placed sparse data pages stay placed and keep their byte across the split."""
    verdict = run(sc.postcopy_style(register_at, shrink_at, fill=SPARSE, thp=THP_SETTINGS[0]))
    check_verdict(verdict)
    assert_split_as_expected(verdict, kernel_features, THP_SETTINGS[0], due=due(register_at, shrink_at))


def _sabotaged(scenario: sc.Scenario, base: int) -> list[int]:
    return [base + int(i) * pagemap.PAGE for i in np.nonzero(scenario.selector("sabotage"))[0]]


def _findings(verdict, kind: str):
    return [f for f in verdict.findings if f.kind == kind]


def test_negative_control_holes(run, check_verdict):
    """Holes punched into placed zero subpages must be named exactly: as holes, then as MISSING faults."""
    scenario = sc.postcopy_style("after-discard", "after-place", sabotage=True)
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    assert not verdict.ok, "the oracle missed holes punched on purpose"
    holes, faults = _findings(verdict, "hole"), _findings(verdict, "missing-fault")
    assert [f.phase for f in holes] == ["sabotage-punch(sabotage)"], verdict.failure_message()
    assert [f.phase for f in faults] == ["touch(read)"], verdict.failure_message()
    base = holes[0].addresses[0] - int(np.nonzero(scenario.selector("sabotage"))[0][0]) * pagemap.PAGE
    assert holes[0].addresses == faults[0].addresses == _sabotaged(scenario, base)
    assert {f.kind for f in verdict.findings} <= {"hole", "missing-fault", "lost-soft-dirty"}
    assert "sabotage-punch(sabotage)] 5 placed pages became pte_none holes (first va 0x" in verdict.failure_message()


def test_negative_control_unprotect(run, check_verdict):
    """Pages un-protected behind the model's back must be named exactly: writes went through untrapped."""
    scenario = sc.snapshot_style("after-protect", sabotage=True)
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    assert not verdict.ok, "the oracle missed pages un-protected on purpose"
    untrapped = _findings(verdict, "no-wp-fault")
    assert [f.phase for f in untrapped] == ["touch(write, zero)"], verdict.failure_message()
    idx = np.nonzero(scenario.selector("sabotage"))[0]
    base = untrapped[0].addresses[0] - int(idx[0]) * pagemap.PAGE
    assert untrapped[0].addresses == _sabotaged(scenario, base)
    lost = _findings(verdict, "lost-uffd-wp")
    if any(p.counts["uffd_wp"] for p in verdict.phases):  # the kernel reports bit 57: the oracle must see it go
        assert [f.addresses for f in lost] == [untrapped[0].addresses], verdict.failure_message()
    assert {f.kind for f in verdict.findings} <= {"no-wp-fault", "lost-uffd-wp"}
