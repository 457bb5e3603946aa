"""Split triggers × folio sizes: every way the kernel splits a large anonymous folio, PMD THPs and mTHPs.

The same synthetic sequences as test_synthetic.py (background-snapshot WP, soft-dirty, postcopy destination), their
``shrink`` step firing ``Scenario.split`` (``suite.split_triggers``) on folios of one size. A trigger that cannot
split here (the shrinker on mTHPs, debugfs under kernel lockdown) says so in the cell, never silently passes.

The self-test run samples the axes (``SAMPLE``); the full trigger × size product (``test_trigger_product``, marker
``matrix``) runs when ``--matrix`` is given explicitly (main: host only; nightly: every kernel).
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from split_rules import assert_trigger_split
from test_rwp import need_rwp

from suite import known_findings, pagemap
from suite import memory_axes as ma
from suite import scenario as sc
from suite.thp import MTHP_SIZES_KB, ThpSettings

pytestmark = pytest.mark.host

SIZES = [ThpSettings(), *(ThpSettings(mthp_kb=kb) for kb in MTHP_SIZES_KB),
         ThpSettings(mthp_kb=64, mthp_enabled="madvise")]
KINDS = {
    "wp": lambda thp: sc.snapshot_style("after-protect", thp=thp),
    "soft-dirty": lambda thp: sc.soft_dirty_style(thp=thp),
    # clear_refs on the empty region (the VMA's VM_SOFTDIRTY, which pagemap ORs into every page, goes), then
    # the fault marks every subpage soft-dirty. On PTE-mapped mTHPs "soft-dirty" above has nothing to lose:
    # its clear_refs clears every subpage and the write re-marks only the data subpage
    "soft-dirty-fault": lambda thp: sc.Scenario(
        name="soft-dirty-fault", kind="snapshot-style", thp=thp,
        steps=(sc.Step("map", "hugepage"), sc.Step("clear-soft-dirty"), sc.Step("place", pages="data"),
               sc.Step("shrink", label="shrink@after-place"), sc.Step("verify"))),
    "missing": lambda thp: sc.postcopy_style("after-discard", "after-place", thp=thp),
    # RWP (Linux 7.3; tests/test_rwp.py): protected and read pages side by side at the split
    "rwp": lambda thp: ma.rwp_style("sync", "after-protect", thp=thp),
    "rwp-async": lambda thp: ma.rwp_style("async", "after-protect", thp=thp),
}
# Duplicate data pages (Fill content "same"): KSM then merges write-protected data pages too, not only the zero
# subpages a split leaves behind. Only KSM cares what the data is: this kind runs with ksm alone. (The soft-dirty
# sibling lost 255 bits on 7.3.4 every time, on 6.12.118 once in 5 runs: too unsteady for a strict cell)
SAME_KINDS = {"wp-same": lambda thp: replace(KINDS["wp"](thp), fill=sc.Fill(content="same")),
              "rwp-same": lambda thp: replace(KINDS["rwp"](thp), fill=sc.Fill(content="same"))}
PMD, K64 = SIZES[0], ThpSettings(mthp_kb=64)
# (kind, split, size): the self-test's sample — every trigger on PMD THPs, the mTHP axis on a few triggers
SAMPLE = ([("wp", split, PMD) for split in sc.SPLITS]
          + [("wp", split, K64) for split in ("shrinker", "pageout", "partial-unmap", "ksm-zero")]
          + [("soft-dirty", split, PMD) for split in ("pageout", "partial-unmap", "ksm-zero")]
          + [("soft-dirty-fault", "pageout", K64)]
          + [("missing", split, PMD) for split in ("pageout", "partial-unmap")]
          + [(kind, "ksm", PMD) for kind in SAME_KINDS]
          + [("rwp", "partial-unmap", PMD), ("rwp", "pageout", K64)])


def size_id(thp: ThpSettings) -> str:
    return f"mthp{thp.mthp_kb}k" + ("" if thp.mthp_enabled == "always" else f"-{thp.mthp_enabled}") \
        if thp.mthp_kb else "pmd"


def cell_id(kind: str, split: str, thp: ThpSettings) -> str:
    return f"{kind}-{split}-{size_id(thp)}"


def scenario_for(kind: str, split: str, thp: ThpSettings) -> sc.Scenario:
    return replace((KINDS | SAME_KINDS)[kind](thp), split=split)


def skip_host_swap(kernel_spec, split: str) -> None:
    if split == "pageout-swap" and kernel_spec.kind == "host":
        pytest.skip("pageout-swap sets up swap (zram) only inside an L1 VM (--kernel=debian:…): "
                    "the host's swap is never changed")


def _run_cell(run, check_verdict, kernel_features, kernel_spec, kind: str, split: str, thp: ThpSettings) -> None:
    skip_host_swap(kernel_spec, split)
    if kind.startswith("soft-dirty") and not kernel_features["soft_dirty"]:
        pytest.skip("kernel under test lacks CONFIG_MEM_SOFT_DIRTY: pagemap bit 55 is never set")
    if kind.startswith("rwp"):
        need_rwp(kernel_features, "async" if kind.endswith("async") else "sync")
    verdict = run(scenario_for(kind, split, thp))
    check_verdict(verdict)
    assert_trigger_split(verdict, kernel_features, split, thp)


@pytest.mark.parametrize(("kind", "split", "thp_settings"), SAMPLE, ids=[cell_id(*c) for c in SAMPLE])
def test_trigger(run, check_verdict, kernel_features, kernel_spec, kind, split, thp_settings):
    """No uffd-wp / soft-dirty bit lost, no hole, no untrapped write, whatever split the folios."""
    _run_cell(run, check_verdict, kernel_features, kernel_spec, kind, split, thp_settings)


PRODUCT = list(itertools.product(KINDS, sc.SPLITS, SIZES))


@pytest.mark.matrix
@pytest.mark.parametrize(("kind", "split", "thp_settings"), PRODUCT, ids=[cell_id(*c) for c in PRODUCT])
def test_trigger_product(run, check_verdict, kernel_features, kernel_spec, kind, split, thp_settings):
    """The full trigger × size × kind product (selected with an explicit ``--matrix``)."""
    _run_cell(run, check_verdict, kernel_features, kernel_spec, kind, split, thp_settings)


@pytest.mark.parametrize("split", sc.SPLITS)
def test_trigger_negative_control(run, check_verdict, kernel_spec, kernel_features, split):
    """Pages un-protected behind the model's back after each trigger's split are named exactly, at that phase
    (plus, on a kernel with a known bug in this trigger, exactly the pages that bug un-protected: they lost their
    uffd-wp bit at the split)."""
    skip_host_swap(kernel_spec, split)
    scenario = replace(sc.snapshot_style("after-protect", sabotage=True), split=split)
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    assert not verdict.ok, f"the oracle missed pages un-protected on purpose after a {split} split"
    untrapped = [f for f in verdict.findings if f.kind == "no-wp-fault"]
    assert [f.phase for f in untrapped] == ["touch(write, zero)"], verdict.failure_message()
    sabotaged = {verdict.region + int(i) * pagemap.PAGE for i in np.nonzero(scenario.selector("sabotage"))[0]}
    known = known_findings.known_pages(verdict, kernel_features, "lost-uffd-wp")
    assert set(untrapped[0].addresses) == sabotaged | known, verdict.failure_message()
    assert {f.kind for f in verdict.findings} <= {"no-wp-fault", "lost-uffd-wp"}, verdict.failure_message()


# Real QEMU: the trigger fired on QEMU's RAM from outside (process_madvise, debugfs with QEMU's pid and RAM range,
# ksmd: QEMU's RAM is MADV_MERGEABLE by default, mem-merge=on). partial-unmap is synthetic only. "ksm-same": every
# data page holds the same bytes, so KSM merges write-protected data pages too, on any kernel
QEMU_CELLS = [("snapshot", "pageout"), ("snapshot", "ksm-zero"), ("snapshot", "ksm-same"), ("snapshot", "debugfs"),
              ("postcopy", "pageout")]
QEMU_KINDS = {"snapshot": lambda fill: sc.snapshot("snapshot-running", fill=fill),
              "postcopy": lambda fill: sc.postcopy("precopy-done", fill=fill)}


@pytest.mark.qemu
@pytest.mark.parametrize(("kind", "split"), QEMU_CELLS, ids=[f"{k}-{s}" for k, s in QEMU_CELLS])
def test_trigger_qemu(run, qemu, check_verdict, kind, split):
    """A real QEMU's RAM split by each trigger: no received page lost, no uffd-wp bit lost, the same restore."""
    fill = sc.Fill(content="same") if split.endswith("-same") else sc.Fill()
    split = split.removesuffix("-same")
    verdict = run(replace(QEMU_KINDS[kind](fill), split=split))
    check_verdict(verdict)
    assert verdict.split_expected or verdict.no_split_reason, f"no split and no reason: {verdict.summary()}"
    if split != "debugfs":
        assert verdict.split_expected, f"{split} was due to split QEMU's THPs: {verdict.summary()}"
