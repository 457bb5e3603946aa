"""``python -m suite.report --compare``: what changed between two runs, on real captured JUnit XML."""
from __future__ import annotations

from pathlib import Path

import pytest

from suite import report
from suite.reports import compare

JUNIT = Path(__file__).parent.parent / "data" / "junit"
BROKEN = JUNIT / "debian-6.12.43-snapshot_style-mpn409.xml"  # loses uffd-wp and soft-dirty bits
FIXED = JUNIT / "debian-6.12.57-snapshot_style-mpn409.xml"  # the first Debian package with the fix
LATER = JUNIT / "debian-6.12.95-snapshot_style-mpn409.xml"
NO_BOOT = JUNIT / "boot-failure.xml"  # a kernel that never brought up the agent: no test case at all
HOST_RUN = Path(__file__).parent.parent / "data" / "report" / "junit.xml"  # 6.18.44: soft-dirty skipped
PROTECT = "tests/test_synthetic.py::test_snapshot_style[shrink@after-protect-mpn409]"
SOFT_DIRTY = "tests/test_synthetic.py::test_snapshot_style_soft_dirty[mpn409]"


def changes(old: Path, new: Path) -> dict[str, compare.Change]:
    return {c.nodeid: c for c in compare.compare(compare.load(old), compare.load(new))}


def test_the_fix_shows_as_fixed_cells_with_the_old_failure():
    got = changes(BROKEN, FIXED)
    assert set(got) == {PROTECT, SOFT_DIRTY}
    assert {c.kind for c in got.values()} == {"fixed"}
    c = got[PROTECT]
    assert c.transition == "failed → passed"
    assert c.kernel == "6.12.57+deb12-amd64 (was 6.12.43+deb12-amd64)"
    assert c.message == ("[shrink@after-protect] 16,128 pages lost their uffd-wp bit (pagemap bit 57) "
                         "(first va 0x7f0d1b801000, …)")


def test_a_regression_is_a_new_failure_and_exits_1(capsys: pytest.CaptureFixture[str]):
    assert compare.main(LATER, BROKEN) == 1
    out = capsys.readouterr().out
    assert "2 new failures, 0 fixed, 0 other changes (4 cells)" in out.splitlines()[0]
    assert out.index("NEW FAILURES") < out.index(PROTECT)
    assert "16,128 pages lost their soft-dirty bit (pagemap bit 55)" in out
    assert compare.main(BROKEN, LATER) == 0  # fixes only


def test_same_verdicts_on_another_kernel_are_no_change():
    assert changes(FIXED, LATER) == {}


def test_other_changes_come_after_failures_and_fixes():
    """Host run (6.18.44, no soft-dirty: skipped; two sabotaged cells failing) → 6.12.95."""
    ordered = compare.compare(compare.load(HOST_RUN), compare.load(LATER))
    kinds = [c.kind for c in ordered]
    assert kinds == sorted(kinds, key=["new failure", "fixed", "other"].index)
    by_id = {c.nodeid: c for c in ordered}
    assert by_id[SOFT_DIRTY].transition == "skipped → passed"
    assert "CONFIG_MEM_SOFT_DIRTY" in by_id[SOFT_DIRTY].message  # why it was skipped
    assert by_id[PROTECT].transition == "new cell → passed"
    removed = [c for c in ordered if c.new is None]
    assert removed and all(c.kind == "other" for c in removed)


def test_a_run_that_never_reached_its_tests_is_flagged(capsys: pytest.CaptureFixture[str]):
    assert compare.main(FIXED, NO_BOOT) == 1
    assert "no cells at all" in capsys.readouterr().out


def test_a_report_directory_compares_like_its_junit(tmp_path: Path):
    report.write(tmp_path / "report", tmp_path / "no-artifacts", [BROKEN])
    from_dir = compare.load(tmp_path / "report")
    assert {k: (r.status, r.kernel) for k, r in from_dir.items()} == \
        {k: (r.status, r.kernel) for k, r in compare.load(BROKEN).items()}
    assert [c.kind for c in compare.compare(from_dir, compare.load(FIXED))] == ["fixed", "fixed"]


@pytest.mark.parametrize(("pytest_id", "junit_id"), [
    ("tests/test_x.py::test_a[p-q]", "tests/test_x.py::test_a[p-q]"),
    ("tests/unit/test_x.py::TestC::test_a", "tests/unit/test_x/TestC.py::test_a"),  # report.parse_junit's guess
])
def test_pytest_and_junit_ids_name_the_same_cell(pytest_id: str, junit_id: str):
    assert compare.cell_key(pytest_id) == compare.cell_key(junit_id)


@pytest.mark.parametrize(("message", "line"), [
    ("Failed: postcopy-style[x] on kernel 6.18.44\n  [touch(read)] 5 MISSING faults", "[touch(read)] 5 MISSING faults"),
    ("def f():\n>   raise SetupError('x')\nE   suite.errors.SetupError: no QEMU\n\nconftest.py:9: SetupError",
     "suite.errors.SetupError: no QEMU"),
    ("Skipped: kernel lacks CONFIG_MEM_SOFT_DIRTY", "kernel lacks CONFIG_MEM_SOFT_DIRTY"),
])
def test_first_line_says_what_went_wrong(message: str, line: str):
    assert compare.first_line(message) == line


def test_unreadable_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert compare.main(tmp_path / "nope.xml", FIXED) == 2
    assert compare.main(tmp_path, FIXED) == 2  # a directory without outcomes.json
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no such file" in err[0] and "outcomes.json" in err[1]
