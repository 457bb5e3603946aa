"""Power tests: the suite must fail on a kernel with the bug it hunts, and pass on the same kernel without it.

The known-bad kernel is Debian's linux-source-6.12 with kernels/patches/0001-…: the THP split leaves zero-filled
subpages pte_none unless the VMA is userfaultfd-armed (the series' v1 behaviour); its twin is the same source,
config and toolchain without the patch. Each test runs holecheck itself, as a maintainer would, in a subprocess
against one of them and judges its JUnit XML: which cells fail, and with which message.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.power
ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 40 * 60

# cell → what its failure message must say on the known-bad kernel ("" = must pass there too)
CELLS = {
    # shrink before registration: zero subpages turn pte_none, the registered MISSING fault hits placed pages
    "tests/test_synthetic.py::test_postcopy_style[register@after-discard-shrink@after-place-mpn409]":
        "placed pages became pte_none holes",
    # registered before the shrink: the VMA is uffd-armed, the patch keeps the zero page: must pass
    "tests/test_synthetic.py::test_postcopy_style[register@after-place-shrink@after-nohugepage-mpn409]": "",
    # real QEMU 7.2: received zero subpages become holes on the destination, QEMU never re-requests them
    "tests/test_postcopy.py::test_postcopy[shrink@precopy-done-mpn409-spread8]": "received pages a reader stalls on",
    "tests/test_postcopy.py::test_postcopy[shrink@nohugepage-window-mpn409-spread8]":
        "received pages a reader stalls on",
}


@dataclass
class Cell:
    outcome: str  # passed, failed, error, skipped
    message: str


def run_suite(kernel: Path | str, cells: list[str], junit: Path) -> dict[str, Cell]:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--kernel={kernel}", "-q",
            f"--junitxml={junit}", f"--artifacts={junit.parent / 'artifacts'}", *cells]
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"holecheck on {kernel} did not finish within {RUN_TIMEOUT} s", pytrace=False)
    if not junit.exists():
        pytest.fail(f"holecheck on {kernel} wrote no JUnit XML (exit {proc.returncode}):\n{proc.stdout[-2000:]}",
                    pytrace=False)
    out: dict[str, Cell] = {}
    for case in ET.parse(junit).iter("testcase"):
        nodeid = f"{case.get('file') or case.get('classname', '').replace('.', '/') + '.py'}::{case.get('name')}"
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(bad.tag, "") if bad is not None \
            else "passed"
        out[nodeid] = Cell(outcome, (bad.get("message", "") + "\n" + (bad.text or "")) if bad is not None else "")
    return out


def known_bad_image(patched: bool) -> Path | str:
    """The built kernel; built here only when allowed (a cold build takes ~20-40 min on 2 cores). Without a built
    twin, Debian's own binary of the same source version stands in for it (same code, Debian's config)."""
    from kernels import build

    image = build.cached(patched)
    if image is None and not patched and os.environ.get("HOLECHECK_BUILD_KNOWN_BAD") != "1":
        return "debian:" + build.source_version().split("-")[0]
    if image is None:
        if os.environ.get("HOLECHECK_BUILD_KNOWN_BAD") != "1":
            pytest.skip(f"the {'known-bad' if patched else 'twin'} kernel is not built yet: run "
                        f"`python -m kernels.build --{'patched' if patched else 'twin'}` once (or set "
                        "HOLECHECK_BUILD_KNOWN_BAD=1) — the power tests need it")
        image = build.build(patched)
    return image


@pytest.mark.parametrize("patched", [True, False], ids=["known-bad", "twin"])
def test_power(patched: bool, tmp_path: Path) -> None:
    image = known_bad_image(patched)
    cells = run_suite(image, list(CELLS), tmp_path / "junit.xml")
    missing = [c for c in CELLS if c not in cells]
    assert not missing, f"cells that did not run: {missing}"
    for nodeid, must_say in CELLS.items():
        cell = cells[nodeid]
        if patched and must_say:
            assert cell.outcome == "failed", f"{nodeid} {cell.outcome} on the known-bad kernel: no teeth"
            assert must_say in cell.message, f"{nodeid} failed for the wrong reason:\n{cell.message[:2000]}"
        else:
            assert cell.outcome == "passed", f"{nodeid} {cell.outcome} on the {'known-bad' if patched else 'twin'} " \
                                             f"kernel:\n{cell.message[:2000]}"
