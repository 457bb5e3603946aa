"""Power tests: the suite must fail on a kernel with the bug it hunts, and pass on the same kernel without it.

Two known-bad kernels, one per class of bug, each with its good twin; nothing here may skip on a fresh machine:

- *holes*: Debian's linux-source-6.12 with kernels/patches/0001-…, which makes the THP split leave zero-filled
  subpages pte_none unless the VMA is userfaultfd-armed (the series' v1 behaviour), built with holecheck's
  minimal config (a few minutes cold, cached by source + patch + config); its twin is the same source without
  the patch: built with the same config and toolchain when cached (``python -m kernels.build --twin``), else
  Debian's own binary of that source version.
- *lost bits*: Debian's own 6.12.43, which drops the uffd-wp and soft-dirty bits of split zero subpages (no
  build needed); its twin is 6.12.57, the first Debian package with upstream's fix.

Each test runs holecheck itself, as a maintainer would, in a subprocess against one kernel and judges its JUnit
XML: which cells fail, and with which message.
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from suite.reports.outcomes import Outcome, parse_junit, worst_per_test

pytestmark = pytest.mark.power
ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 40 * 60

# cell → what its failure message must say on the known-bad kernel ("" = must pass there too)
HOLE_CELLS = {
    # shrink before registration: zero subpages turn pte_none, the registered MISSING fault hits placed pages
    "tests/test_synthetic.py::test_postcopy_style[register@after-discard-shrink@after-place-mpn409]":
        "placed pages became pte_none holes",
    # registered before the shrink: the VMA is uffd-armed, the patch keeps the zero page: must pass
    "tests/test_synthetic.py::test_postcopy_style[register@after-place-shrink@after-nohugepage-mpn409]": "",
    # real QEMU 7.2: received zero subpages become holes on the destination, QEMU never re-requests them
    "tests/test_postcopy.py::test_postcopy[shrink@precopy-done-mpn409-spread8]": "received pages a reader stalls on",
    "tests/test_postcopy.py::test_postcopy[shrink@nohugepage-window-mpn409-spread8]":
        "received pages a reader stalls on",
    # the same through libvirt's API: split during precopy (not yet uffd-armed), stalled on once postcopy runs
    "tests/test_postcopy_libvirt.py::test_postcopy_libvirt[shrink@mid-precopy-mpn409-spread8]":
        "received pages a reader stalls on",
}
LOST_BIT_CELLS = {
    # write-protected, then split: the zero subpages come back as zero-page PTEs without their uffd-wp bit
    "tests/test_synthetic.py::test_snapshot_style[shrink@after-protect-mpn409]": "lost their uffd-wp bit",
    "tests/test_synthetic.py::test_snapshot_style_soft_dirty[mpn409]": "lost their soft-dirty bit",
    # no underused split at max_ptes_none 511: nothing to lose, must pass on the bad kernel too
    "tests/test_synthetic.py::test_snapshot_style[shrink@after-protect-mpn511]": "",
    # the same loss through other split triggers (one common remap path) and on 64 kB mTHPs
    **{f"tests/test_triggers.py::test_trigger[wp-{t}]": "lost their uffd-wp bit"
       for t in ("pageout-pmd", "partial-unmap-pmd", "ksm-zero-pmd", "debugfs-pmd", "pageout-mthp64k")},
    "tests/test_triggers.py::test_trigger[soft-dirty-partial-unmap-pmd]": "lost their soft-dirty bit",
    "tests/test_triggers.py::test_trigger[soft-dirty-fault-pageout-mthp64k]": "lost their soft-dirty bit",
    # the shrinker cannot split mTHPs: the cell says so and passes on the bad kernel too
    "tests/test_triggers.py::test_trigger[wp-shrinker-mthp64k]": "",
    # memory axes: CRIU's dump after zeroing subpages, and uffd WP_ASYNC (PAGEMAP_SCAN) at the same point
    "tests/test_memory_axes.py::test_criu[soft-dirty]": "an incremental dump would restore stale data",
    "tests/test_memory_axes.py::test_wp_feature[async-shrink@after-protect]": "lost their uffd-wp bit",
    # PAGE_IS_WRITTEN: the zeroed pages were written, their uffd-wp bit already clear: nothing to lose, must pass
    "tests/test_memory_axes.py::test_criu[written]": "",
}
# cells where a known finding is due on both kernels: the good twin xfails by the finding's name, within its
# signature; the known-bad kernel's own loss (every zero subpage) lies beyond it and must fail, named
KNOWN_ON_TWIN = {
    "tests/test_triggers.py::test_trigger[wp-same-ksm-pmd]": "ksm-merge-of-duplicates-drops-uffd-wp-and-soft-dirty",
}
LOST_BIT_CELLS |= {cell: "beyond the known finding" for cell in KNOWN_ON_TWIN}


def known_bad() -> Path | str:
    from kernels import build

    return build.build(patched=True)  # cached; cold: a few minutes with the minimal config


def twin() -> Path | str:
    """The built twin if cached, else Debian's own binary of the same source version (same code, Debian's
    config): building a second kernel would double the cold cost (Kbuild's absolute paths defeat reusing the
    patched tree's objects)."""
    from kernels import build, linux_source

    return build.cached(patched=False) or "debian:" + linux_source.source_version().split("-")[0]


@dataclass(frozen=True)
class PowerCase:
    kernel: Callable[[], Path | str]  # resolved at run time: a build may be needed
    cells: dict[str, str]
    known_bad: bool


CASES = {
    "holes-known-bad": PowerCase(known_bad, HOLE_CELLS, known_bad=True),
    "holes-twin": PowerCase(twin, HOLE_CELLS, known_bad=False),
    "lost-bits-6.12.43": PowerCase(lambda: "debian:6.12.43", LOST_BIT_CELLS, known_bad=True),
    "lost-bits-fixed-6.12.57": PowerCase(lambda: "debian:6.12.57", LOST_BIT_CELLS, known_bad=False),
}


def run_suite(kernel: Path | str, cells: list[str], junit: Path) -> dict[str, Outcome]:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--kernel={kernel}", "-q",
            f"--junitxml={junit}", f"--artifacts={junit.parent / 'artifacts'}", *cells]
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"holecheck on {kernel} did not finish within {RUN_TIMEOUT} s", pytrace=False)
    if not junit.exists():
        pytest.fail(f"holecheck on {kernel} wrote no JUnit XML (exit {proc.returncode}):\n{proc.stdout[-2000:]}",
                    pytrace=False)
    return worst_per_test(parse_junit(junit, junit.parent / "artifacts"))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_power(case: PowerCase, tmp_path: Path) -> None:
    kernel = case.kernel()
    cells = run_suite(kernel, list(case.cells), tmp_path / "junit.xml")
    missing = [c for c in case.cells if c not in cells]
    assert not missing, f"cells that did not run: {missing}"
    which = "known-bad" if case.known_bad else "good twin"
    for nodeid, must_say in case.cells.items():
        cell = cells[nodeid]
        if case.known_bad and must_say:
            assert cell.status == "failed", f"{nodeid} {cell.status} on the known-bad kernel {kernel}: no teeth"
            assert must_say in cell.message, f"{nodeid} failed for the wrong reason:\n{cell.message[:2000]}"
        elif nodeid in KNOWN_ON_TWIN:
            assert cell.status == "xfailed" and f"known finding {KNOWN_ON_TWIN[nodeid]}" in cell.message, \
                f"{nodeid} {cell.status} on the {which} kernel {kernel}:\n{cell.message[:2000]}"
        else:
            assert cell.status == "passed", f"{nodeid} {cell.status} on the {which} kernel {kernel}:\n" \
                                            f"{cell.message[:2000]}"
