"""Soak aggregation on captured JUnit XML (tests/data/junit/): real VM sessions of the snapshot-style cells on
Debian 6.12.43 (two cells fail: uffd-wp and soft-dirty bits lost) and 6.12.95 (all pass), a session whose kernel
did not boot (no test cases), and a pytest session with a teardown error (teardown-error.xml)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from suite import soak
from suite.reports.outcomes import Outcome, parse_junit

DATA = Path(__file__).parent.parent / "data" / "junit"
GOOD, BAD = DATA / "debian-6.12.95-snapshot_style-mpn409.xml", DATA / "debian-6.12.43-snapshot_style-mpn409.xml"
LOST_WP = "tests/test_synthetic.py::test_snapshot_style[shrink@after-protect-mpn409]"
LOST_SD = "tests/test_synthetic.py::test_snapshot_style_soft_dirty[mpn409]"
BEFORE = "tests/test_synthetic.py::test_snapshot_style[shrink@before-register-mpn409]"
PROJECT = Path(__file__).resolve().parent.parent.parent


def runs(*files: Path) -> list[soak.Run]:
    return [soak.Run(i, 0 if f == GOOD else 1, 60.0, f, f.with_suffix(".log"), tuple(parse_junit(f)))
            for i, f in enumerate(files, 1)]


def test_a_cell_that_both_passed_and_failed_is_flaky_and_listed_first() -> None:
    done = runs(GOOD, BAD, GOOD)
    cells = soak.aggregate([r.outcomes for r in done])
    assert [c.nodeid for c in cells[:2]] == sorted([LOST_SD, LOST_WP])
    assert all(c.kind(3) == "flaky" for c in cells[:2]) and all(c.kind(3) == "passed" for c in cells[2:])
    wp = next(c for c in cells if c.nodeid == LOST_WP)
    assert (wp.count("passed"), wp.failures) == (2, 1)
    assert wp.first_problem is not None and wp.first_problem[0] == 2
    assert wp.first_problem[1] == "[shrink@after-protect] 16,128 pages lost their uffd-wp bit (pagemap bit 57)"
    before = next(c for c in cells if c.nodeid == BEFORE)
    assert before.spread() == (35.983, 35.983, 46.942)  # min, median, max of the JUnit times
    lines, good = soak.report(cells, done)
    assert not good
    assert lines[-1].startswith("soak: NOT OK: 4 cells x 3 runs: 2 flaky, 2 passed;")
    assert lines[1].startswith("FLAKY   2/3 passed, 1 failed") and lines[1].endswith(LOST_WP)
    assert lines[2].strip() == "run 2: [shrink@after-protect] 16,128 pages lost their uffd-wp bit (pagemap bit 57)"


def test_failing_every_time_is_failed_not_flaky() -> None:
    cells = soak.aggregate([r.outcomes for r in runs(BAD, BAD)])
    assert [c.kind(2) for c in cells] == ["failed", "failed", "passed", "passed"]


def test_all_passing_runs_are_ok() -> None:
    done = runs(GOOD, GOOD)
    lines, good = soak.report(soak.aggregate([r.outcomes for r in done]), done)
    assert good and lines[-1].startswith("soak: OK: 4 cells x 2 runs: 4 passed;")


def test_a_run_that_judged_nothing_makes_the_soak_fail() -> None:
    """A session whose kernel did not boot: no test cases; the cells it lacks are 'missing', the run unusable."""
    done = runs(GOOD, DATA / "boot-failure.xml")
    done[1] = soak.Run(2, 4, 3.0, done[1].junit, done[1].log, (), "pytest exit 4: L1 VM did not boot")
    cells = soak.aggregate([r.outcomes for r in done])
    assert {c.kind(2) for c in cells} == {"missing"}
    lines, good = soak.report(cells, done)
    assert not good and any("run 2: pytest exit 4: L1 VM did not boot" in ln for ln in lines)
    assert "1 unusable runs" in lines[-1]


def test_a_teardown_error_counts_as_a_failure() -> None:
    errored = tuple(parse_junit(DATA / "teardown-error.xml"))
    passed = tuple(Outcome(o.nodeid, "passed", 0.001) for o in errored)
    cells = soak.aggregate([passed, errored])
    flaky = cells[0]
    assert flaky.nodeid.endswith("test_passes_then_teardown_fails") and flaky.kind(2) == "flaky"
    assert flaky.first_problem == (2, "RuntimeError: teardown: 1 memory cgroup left behind")


def test_one_test_reported_twice_in_a_run_counts_once_at_its_worst() -> None:
    call = Outcome("t.py::test_x", "passed", 1.0)
    teardown = Outcome("t.py::test_x", "error", 0.5, "E   OSError: busy")
    [cell] = soak.aggregate([[call, teardown]])
    assert cell.outcomes == ["error"] and cell.seconds == [1.5]


def test_the_command_runs_a_selection_n_times(tmp_path: Path) -> None:
    """The CLI end to end on a pure unit test: two pytest sessions, their JUnit XML kept in --out."""
    proc = subprocess.run([sys.executable, "-m", "suite.soak", "-n", "2", "--out", str(tmp_path),
                           "tests/unit/test_scenario.py::test_selectors", "-q"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("soak: OK: 1 cells x 2 runs: 1 passed;"), proc.stdout
    assert (tmp_path / "run-1.xml").is_file() and (tmp_path / "run-2.log").is_file()


def test_a_cell_skipped_every_time_says_why() -> None:
    """tests/data/report/junit.xml: a real 6.18 session, whose kernel lacks soft-dirty."""
    once = tuple(parse_junit(DATA.parent / "report" / "junit.xml"))
    done = [soak.Run(i, 1, 20.0, DATA.parent / "report" / "junit.xml", Path("run.log"), once) for i in (1, 2)]
    lines, _ = soak.report(soak.aggregate([once, once]), done)
    at = next(i for i, ln in enumerate(lines) if ln.startswith("SKIPPED"))
    assert lines[at + 1].strip().startswith("skipped: ") and "SOFT_DIRTY" in lines[at + 1]
