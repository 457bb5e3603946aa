"""The memory axes (issue 11): CRIU's soft-dirty dump sequence, uffd WP features, how THPs are born, memfd RAM.

Each cell runs under today's trigger (the underused shrinker). The self-tests run a sample that proves each axis
can fail (a negative control naming the exact pages) and pass; cells marked ``matrix`` (the rest of the cross
product) run only with ``--matrix=main|nightly``. A cell whose backing the shrinker cannot split (memfd: shmem
THPs) says so in its verdict (``no_split_reason`` with the THPs measured before and after), never silently.
"""
from __future__ import annotations

import numpy as np
import pytest
from split_rules import assert_memory_split, release_of

from suite import memory_axes as ma
from suite import pagemap
from suite import scenario as sc

pytestmark = pytest.mark.host

SNAPSHOT_POINTS = sc.SNAPSHOT_SHRINK_POINTS
SAMPLED_POINT = "after-protect"  # the point where 6.12.43 loses the bits of split zero subpages


def _matrix(values, sampled):
    """Parametrize values: the sampled ones plain, the others marked ``matrix``."""
    return [v if v in sampled else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.matrix)
            for v in values]


def need(features: dict[str, bool], *names: str) -> None:
    lacking = [n for n in names if not features.get(n)]
    if lacking:
        pytest.skip(f"the kernel under test lacks {', '.join(lacking)} (probed on that kernel by targets.preflight)")


def _findings(verdict, kind: str):
    return [f for f in verdict.findings if f.kind == kind]


def _named(scenario: sc.Scenario, finding, selector: str) -> list[int]:
    """The addresses ``selector`` names, based at the region the finding's first address belongs to."""
    idx = np.nonzero(scenario.selector(selector))[0]
    base = finding.addresses[0] - int(idx[0]) * pagemap.PAGE
    return [base + int(i) * pagemap.PAGE for i in idx]


# --- CRIU's sequence -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dump", ma.DUMPS)
def test_criu(run, check_verdict, kernel_features, dump):
    """Every page written since the clear must read soft-dirty / PAGE_IS_WRITTEN after the split, else an
    incremental dump restores stale data."""
    _criu(run, check_verdict, kernel_features, dump, sc.Fill())


@pytest.mark.parametrize("dump", ma.DUMPS)
def test_criu_sparse(run, check_verdict, kernel_features, dump):
    """The same with sparse data pages (one non-zero byte each, suite/content.py): none may read as zeros."""
    _criu(run, check_verdict, kernel_features, dump, SPARSE)


SPARSE = sc.Fill(content="sparse")


def _criu(run, check_verdict, kernel_features, dump: str, fill: sc.Fill) -> None:
    need(kernel_features, *(["soft_dirty"] if dump == "soft-dirty" else ["uffd_wp_async", "pagemap_scan"]))
    scenario = ma.criu_style(dump, fill=fill)
    verdict = run(scenario)
    check_verdict(verdict)
    assert_memory_split(verdict, kernel_features, scenario)


@pytest.mark.parametrize("dump", ma.DUMPS)
def test_criu_negative_control(run, check_verdict, kernel_features, dump):
    """Written pages made to read clean behind the model's back: the dump names exactly those pages."""
    need(kernel_features, *(["soft_dirty"] if dump == "soft-dirty" else ["uffd_wp_async", "pagemap_scan"]))
    scenario = ma.criu_style(dump, sabotage=True)
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    stale = _findings(verdict, "stale-dump")
    assert [f.phase for f in stale] == [f"dump({dump})"], verdict.failure_message()
    assert stale[0].addresses == _named(scenario, stale[0], "sabotage"), verdict.failure_message()
    assert {f.kind for f in verdict.findings} <= {"stale-dump", "lost-soft-dirty"}, verdict.failure_message()


# --- uffd features ---------------------------------------------------------------------------------------------

FEATURE_NEEDS = {"async": ("uffd_wp_async", "uffd_wp_unpopulated", "pagemap_scan"),
                 "unpopulated": ("uffd_wp_unpopulated",)}


@pytest.mark.parametrize("shrink_at", _matrix(SNAPSHOT_POINTS, {SAMPLED_POINT}), ids=lambda p: f"shrink@{p}")
@pytest.mark.parametrize("feature", ma.FEATURES)
def test_wp_feature(run, check_verdict, kernel_features, feature, shrink_at):
    """WP_ASYNC (dumped with PAGEMAP_SCAN) / WP_UNPOPULATED: no uffd-wp bit lost across the split, every write
    trapped (WP_UNPOPULATED) or read back as written (WP_ASYNC)."""
    need(kernel_features, *FEATURE_NEEDS[feature])
    scenario = ma.wp_feature_style(feature, shrink_at)
    verdict = run(scenario)
    check_verdict(verdict)
    assert_memory_split(verdict, kernel_features, scenario)


def test_wp_async_negative_control(run, check_verdict, kernel_features):
    """Written pages re-protected behind the model's back read not-written: the dump names exactly them."""
    need(kernel_features, *FEATURE_NEEDS["async"])
    scenario = ma.wp_feature_style("async", SAMPLED_POINT, sabotage=True)
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    stale = _findings(verdict, "stale-dump")
    assert [f.phase for f in stale] == ["dump(written)"] and len(verdict.findings) == 1, verdict.failure_message()
    assert stale[0].addresses == _named(scenario, stale[0], "sabotage")


# --- origin ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backing", _matrix(sc.BACKINGS, {"anon"}))
@pytest.mark.parametrize("origin", _matrix(sc.ORIGINS, {"read", "collapse"}))
def test_origin(run, check_verdict, kernel_features, origin, backing):
    """Every underused THP is split whatever its origin (a skipped one is a no-split finding naming it)."""
    if backing == "memfd":
        need(kernel_features, "shmem_thp")
    _origin(run, check_verdict, kernel_features, ma.origin_style(origin, backing=backing))


@pytest.mark.parametrize("origin", _matrix(sc.ORIGINS, {"read", "collapse"}))
def test_origin_sparse(run, check_verdict, kernel_features, origin):
    """The same with sparse data pages: a THP born from the huge zero page or from collapsed 4 KiB pages keeps
    every data byte across the split."""
    _origin(run, check_verdict, kernel_features, ma.origin_style(origin, fill=SPARSE))


def _origin(run, check_verdict, kernel_features, scenario: sc.Scenario) -> None:
    verdict = run(scenario)
    check_verdict(verdict)
    assert_memory_split(verdict, kernel_features, scenario)


@pytest.mark.parametrize("origin", _matrix(sc.ORIGINS, {"collapse"}))
def test_origin_negative_control(run, check_verdict, kernel_features, origin):
    """THPs filled behind the model's back are not underused, the split skips them: named as no-split."""
    if not kernel_features["shrink_underused"]:
        pytest.skip("kernel under test has no underused-THP shrinker: no split is due, none can be skipped")
    scenario = ma.origin_style(origin, sabotage=True)
    verdict = run(scenario)
    if origin == "read" and release_of(verdict) < (6, 15) and "no THP was mapped" in verdict.no_split_reason:
        pytest.skip(f"{verdict.kernel}: a write to the huge zero page maps 4 KiB pages before 6.15: no THP to skip")
    check_verdict(verdict, must_pass=False)
    skipped = _findings(verdict, "no-split")
    assert len(verdict.findings) == 1 and len(skipped) == 1, verdict.failure_message()
    chunks = np.unique(np.nonzero(scenario.selector("sabotage-chunks"))[0] // pagemap.PAGES_PER_THP)
    base = skipped[0].addresses[0] - int(chunks[0]) * pagemap.THP_SIZE
    assert skipped[0].addresses == [base + int(c) * pagemap.THP_SIZE for c in chunks], verdict.failure_message()
    assert f"origin {origin}" in skipped[0].detail


# --- backing ---------------------------------------------------------------------------------------------------

POSTCOPY_MEMFD = [("after-discard", "after-place"), ("after-place", "after-nohugepage")]


@pytest.mark.parametrize("shrink_at", _matrix(SNAPSHOT_POINTS, {SAMPLED_POINT}), ids=lambda p: f"shrink@{p}")
def test_memfd_snapshot_style(run, check_verdict, kernel_features, shrink_at):
    """uffd-wp on shmem: protected pages keep their bit (a PTE marker when zapped) and every write traps."""
    need(kernel_features, "shmem_thp", "uffd_wp_shmem")
    scenario = ma.with_memory(sc.snapshot_style(shrink_at), backing="memfd")
    verdict = run(scenario)
    check_verdict(verdict)
    assert_memory_split(verdict, kernel_features, scenario)


@pytest.mark.parametrize(("register_at", "shrink_at"), _matrix(POSTCOPY_MEMFD, {POSTCOPY_MEMFD[0]}),
                         ids=[f"register@{r}-shrink@{s}" for r, s in POSTCOPY_MEMFD])
def test_memfd_postcopy_style(run, check_verdict, kernel_features, register_at, shrink_at):
    """MISSING mode on shmem: no placed page may raise a MISSING fault (discards punch the page cache)."""
    need(kernel_features, "shmem_thp")
    scenario = ma.with_memory(sc.postcopy_style(register_at, shrink_at), backing="memfd")
    verdict = run(scenario)
    check_verdict(verdict)
    assert_memory_split(verdict, kernel_features, scenario)


def test_memfd_negative_controls(run, check_verdict, kernel_features):
    """Punched page cache and un-protected pages on memfd: named exactly, as on anonymous memory."""
    need(kernel_features, "shmem_thp", "uffd_wp_shmem")
    holes = ma.with_memory(sc.postcopy_style("after-discard", "after-place", sabotage=True), backing="memfd")
    verdict = run(holes)
    check_verdict(verdict, must_pass=False)
    faults = _findings(verdict, "missing-fault")
    assert [f.phase for f in faults] == ["touch(read)"] and len(verdict.findings) == 1, verdict.failure_message()
    assert faults[0].addresses == _named(holes, faults[0], "sabotage")
    unprotect = ma.with_memory(sc.snapshot_style("after-protect", sabotage=True), backing="memfd")
    verdict = run(unprotect)
    check_verdict(verdict, must_pass=False)
    untrapped = _findings(verdict, "no-wp-fault")
    assert [f.phase for f in untrapped] == ["touch(write, zero)"], verdict.failure_message()
    assert untrapped[0].addresses == _named(unprotect, untrapped[0], "sabotage")
    assert {f.kind for f in verdict.findings} <= {"no-wp-fault", "lost-uffd-wp"}


@pytest.mark.parametrize("shrink_at", _matrix(ma.MINOR_POINTS, {"after-zap"}), ids=lambda p: f"shrink@{p}")
def test_memfd_minor(run, check_verdict, kernel_features, shrink_at):
    """MINOR mode on shmem: every zapped page comes back through UFFDIO_CONTINUE with its data."""
    need(kernel_features, "shmem_thp", "uffd_minor_shmem")
    scenario = ma.minor_style(shrink_at)
    verdict = run(scenario)
    check_verdict(verdict)
    assert_memory_split(verdict, kernel_features, scenario)
    assert any("MINOR faults resolved" in n and not n.endswith(": 0 MINOR faults resolved with UFFDIO_CONTINUE")
               for n in verdict.notes), verdict.notes


def test_memfd_minor_negative_control(run, check_verdict, kernel_features):
    """Pages punched out of the page cache under MINOR mode read zeros: the content check names exactly them."""
    need(kernel_features, "shmem_thp", "uffd_minor_shmem")
    scenario = ma.minor_style("after-zap", sabotage=True)
    verdict = run(scenario)
    check_verdict(verdict, must_pass=False)
    content = _findings(verdict, "content")
    assert [f.phase for f in content] == ["verify"] and len(verdict.findings) == 1, verdict.failure_message()
    assert content[0].addresses == _named(scenario, content[0], "sabotage")


# --- real QEMU on memfd RAM (memory-backend-memfd,share=on) ----------------------------------------------------

REAL_MEMFD = {"postcopy-shrink@precopy-done": lambda: sc.postcopy("precopy-done"),
              "snapshot-shrink@snapshot-running": lambda: sc.snapshot("snapshot-running")}


@pytest.mark.qemu
@pytest.mark.parametrize("cell", _matrix(REAL_MEMFD, {"postcopy-shrink@precopy-done"}))
def test_qemu_memfd(run, qemu, check_verdict, kernel_features, cell):
    """Real QEMU with shared memfd RAM: the same per-page verdicts; each shrink says the shrinker cannot split
    shmem THPs (measured on QEMU 7.2: its memfd RAM is mapped 4 KiB off a 2 MiB boundary, so no shmem THP at
    all)."""
    need(kernel_features, "shmem_thp")
    scenario = ma.with_memory(REAL_MEMFD[cell](), backing="memfd")
    verdict = run(scenario)
    check_verdict(verdict)
    assert_memory_split(verdict, kernel_features, scenario)
