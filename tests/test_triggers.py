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
from pathlib import Path

import numpy as np
import pytest
from split_rules import assert_trigger_split, skip_unless_size
from test_rwp import need_rwp

from suite import known_findings, pagemap, split_triggers
from suite import memory_axes as ma
from suite import scenario as sc
from suite.targets import preflight
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
# The content axis (suite/content.py): data pages holding one non-zero byte each, at offsets all over the page. A
# zero-subpage detector that looks at part of a page (or words, or bits) takes them for zero-filled and maps the
# zero page over data: ``lost-data``. Both uffd modes, every trigger and size in the product
SPARSE_KINDS = {f"{kind}-sparse": (lambda k: lambda thp: replace(KINDS[k](thp), fill=sc.Fill(content="sparse")))(kind)
                for kind in ("wp", "missing")}
PMD, K64 = SIZES[0], ThpSettings(mthp_kb=64)
# (kind, split, size): the self-test's sample — every trigger on PMD THPs, the mTHP axis on a few triggers
SAMPLE = ([("wp", split, PMD) for split in sc.SPLITS]
          + [("wp", split, K64) for split in ("shrinker", "pageout", "partial-unmap", "ksm-zero")]
          + [("soft-dirty", split, PMD) for split in ("pageout", "partial-unmap", "ksm-zero")]
          + [("soft-dirty-fault", "pageout", K64)]
          + [("missing", split, PMD) for split in ("pageout", "partial-unmap")]
          + [(kind, "ksm", PMD) for kind in SAME_KINDS]
          + [("wp-sparse", split, PMD) for split in sc.SPLITS]
          + [("missing-sparse", split, size) for split, size in (("shrinker", PMD), ("pageout", K64))]
          + [("rwp", "partial-unmap", PMD), ("rwp", "pageout", K64)])


def size_id(thp: ThpSettings) -> str:
    return f"mthp{thp.mthp_kb}k" + ("" if thp.mthp_enabled == "always" else f"-{thp.mthp_enabled}") \
        if thp.mthp_kb else "pmd"


def cell_id(kind: str, split: str, thp: ThpSettings) -> str:
    return f"{kind}-{split}-{size_id(thp)}"


def scenario_for(kind: str, split: str, thp: ThpSettings) -> sc.Scenario:
    return replace((KINDS | SAME_KINDS | SPARSE_KINDS)[kind](thp), split=split)


def skip_host_swap(kernel_spec, split: str) -> None:
    if split == "pageout-swap" and kernel_spec.kind == "host":
        pytest.skip("pageout-swap sets up swap (zram) only inside an L1 VM (--kernel=debian:…): "
                    "the host's swap is never changed")


def _run_cell(run, check_verdict, kernel_features, kernel_spec, kind: str, split: str, thp: ThpSettings) -> None:
    skip_host_swap(kernel_spec, split)
    if why := preflight.lacking(kernel_features, split):
        pytest.skip(why)
    skip_unless_size(kernel_features, thp)
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


PRODUCT = list(itertools.product([*KINDS, *SPARSE_KINDS], sc.SPLITS, SIZES))


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
    if why := preflight.lacking(kernel_features, split):
        pytest.skip(why)
    scenario = replace(sc.snapshot_style("after-protect", sabotage=True), split=split)
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    assert not verdict.ok, f"the oracle missed pages un-protected on purpose after a {split} split"
    untrapped = [f for f in verdict.findings if f.kind == "no-wp-fault"]
    assert [f.phase for f in untrapped] == ["touch(write, zero)"], verdict.failure_message()
    sabotaged = {verdict.region + int(i) * pagemap.PAGE for i in np.nonzero(scenario.selector("sabotage"))[0]}
    known = known_findings.known_pages(verdict, kernel_features, "lost-uffd-wp")
    assert set(untrapped[0].addresses) == sabotaged | known, verdict.failure_message()
    assert untrapped[0].count == len(sabotaged | known), verdict.failure_message()
    assert {f.kind for f in verdict.findings} <= {"no-wp-fault", "lost-uffd-wp"}, verdict.failure_message()


def test_trigger_negative_control_beyond_known_finding(run, check_verdict, kernel_features):
    """A ``-same-by-ksm`` cell (the known finding ksm-merge-of-duplicates… due) whose zero subpages are also
    un-protected behind the model's back: the finding accounts for the merged duplicate data pages only, so the
    cell is not absorbed: exactly the sabotaged pages are named beyond it, and the untrapped writes are those plus
    exactly the pages its signature allows, as full sets and counts. (A kernel whose split itself loses the zero
    subpages' bits, Debian 6.12.43, has those named beyond it too: that is its own bug.)"""
    scenario = replace(sc.snapshot_style("after-protect", sabotage=True, fill=sc.Fill(content="same")), split="ksm")
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    known = known_findings.applying(verdict, kernel_features)
    assert [k.name for k in known] == ["ksm-merge-of-duplicates-drops-uffd-wp-and-soft-dirty"], verdict.summary()
    sabotaged = {verdict.region + int(i) * pagemap.PAGE for i in np.nonzero(scenario.selector("sabotage"))[0]}
    extra = known_findings.beyond(verdict, known)
    assert [(f.kind, f.phase) for f in extra] == [("lost-uffd-wp", "sabotage-unprotect(sabotage)")], \
        "\n".join(f.message() for f in extra) or verdict.failure_message()
    assert set(extra[0].addresses) == sabotaged and extra[0].count == len(sabotaged), extra[0].message()
    signed = known_findings.known_pages(verdict, kernel_features, "no-wp-fault")
    assert signed and signed <= verdict.page_set("data"), verdict.failure_message()
    untrapped = [a for f in verdict.findings if f.kind == "no-wp-fault" for a in f.addresses]
    assert sorted(untrapped) == sorted(sabotaged | signed), verdict.failure_message()


@pytest.mark.parametrize("thp_settings", [PMD, K64], ids=size_id)
def test_split_negative_control(run, check_verdict, kernel_features, thp_settings):
    """The zero subpages of chunks 1 and 5 filled behind the model's back just before a ksm-zero split: their
    folios hold no page ksmd can merge, so it leaves them whole while the model holds them due. The verdict
    names exactly those folios as ``no-split`` (first page of each, its size, its origin), and nothing else."""
    skip_unless_size(kernel_features, thp_settings)
    scenario = replace(ma.origin_style("write", sabotage=True, thp=thp_settings), split="ksm-zero")
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    assert [f.kind for f in verdict.findings] == ["no-split"], verdict.failure_message()
    [skipped] = verdict.findings
    n = split_triggers.folio_pages_named(thp_settings)
    chunks = np.unique(np.nonzero(scenario.selector("sabotage-chunks"))[0] // pagemap.PAGES_PER_THP)
    firsts = [verdict.region + (int(c) * pagemap.PAGES_PER_THP + i) * pagemap.PAGE
              for c in chunks for i in range(0, pagemap.PAGES_PER_THP, n)]
    assert skipped.count == len(firsts) and skipped.addresses == firsts, verdict.failure_message()
    assert f"{n * pagemap.PAGE // 1024}kB folios (origin write, backing anon)" in skipped.detail, skipped.detail


@pytest.mark.parametrize("split", sc.SPLITS)
def test_trigger_lost_data_negative_control(run, check_verdict, kernel_spec, split):
    """Sparse data pages zeroed behind the model's back before each trigger's split (what a zero detector that
    misjudges them would do) are named exactly as lost-data, nothing else: at the split where it maps them to the
    zero page, else at the verify where they read zero."""
    skip_host_swap(kernel_spec, split)
    scenario = ma.lost_data_control(split)
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    lost = [f for f in verdict.findings if f.kind == "lost-data"]
    assert lost and {f.kind for f in verdict.findings} == {"lost-data"}, verdict.failure_message()
    assert {f.phase for f in lost} <= {"shrink@after-place", "verify"}, verdict.failure_message()
    zeroed = {verdict.region + int(i) * pagemap.PAGE for i in np.nonzero(scenario.selector("sabotage-data"))[0]}
    named = [a for f in lost for a in f.addresses]
    assert sum(f.count for f in lost) == len(named) == len(zeroed) and set(named) == zeroed, verdict.failure_message()


# Real QEMU: the trigger fired on QEMU's RAM from outside (process_madvise, debugfs with QEMU's pid and RAM range,
# ksmd: QEMU's RAM is MADV_MERGEABLE by default, mem-merge=on). partial-unmap is synthetic only. "ksm-same": every
# data page holds the same bytes, so KSM merges write-protected data pages too, on any kernel
QEMU_CELLS = [("snapshot", "pageout"), ("snapshot", "ksm-zero"), ("snapshot", "ksm-same"), ("snapshot", "debugfs"),
              ("postcopy", "pageout")]
QEMU_KINDS = {"snapshot": lambda fill: sc.snapshot("snapshot-running", fill=fill),
              "postcopy": lambda fill: sc.postcopy("precopy-done", fill=fill)}


@pytest.mark.qemu
@pytest.mark.parametrize(("kind", "split"), QEMU_CELLS, ids=[f"{k}-{s}" for k, s in QEMU_CELLS])
def test_trigger_qemu(run, qemu, check_verdict, kernel_features, kind, split):
    """A real QEMU's RAM split by each trigger: no received page lost, no uffd-wp bit lost, the same restore."""
    fill = sc.Fill(content="same") if split.endswith("-same") else sc.Fill()
    split = split.removesuffix("-same")
    if why := preflight.lacking(kernel_features, split):
        pytest.skip(why)
    verdict = run(replace(QEMU_KINDS[kind](fill), split=split))
    check_verdict(verdict)
    assert_trigger_split(verdict, kernel_features, split, ThpSettings())


def test_debugfs_split_failure_is_an_error_of_the_run(target, kernel_spec):
    """A debugfs split the kernel refuses for another reason than lockdown (here: no such process, ESRCH) is an
    error of the run, not "cannot split"; under lockdown (this host: integrity) the refusal is lockdown's alone."""
    if kernel_spec.kind != "host":
        pytest.skip("the debugfs write is made from this process: the host kernel only")
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    mode = split_triggers.lockdown()
    if "[none]" in mode or not mode:
        with pytest.raises(split_triggers.SplitError, match=r"No such process.*not a refusal by lockdown"):
            split_triggers.debugfs_split(pid_max + 1, 0x7F00_0000_0000, 2 << 20)
    else:
        why = split_triggers.debugfs_split(pid_max + 1, 0x7F00_0000_0000, 2 << 20)
        assert "Operation not permitted (kernel lockdown" in why, why
