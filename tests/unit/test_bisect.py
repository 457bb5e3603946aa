"""Bisection logic: Debian candidate order, the search with skips, classifying pytest sessions.

Data is real: the Debian kernel list as ``python -m kernels.debian list`` printed it, JUnit XML and output of
real VM sessions of this suite (tests/data/junit/), and JUnit XML of real pytest runs of small test files
(``pytester``). The end-to-end test runs the real Runner and Bisection against a tiny project whose verdict
depends on the kernel name: real pytest subprocesses, no VM.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from suite import bisect as bs
from suite.bisect import Candidate, Search
from suite.bisection import step as bisect_step
from suite.bisection import tree as bisect_tree
from suite.bisection.step import StepVerdict
from suite.errors import SetupError

pytest_plugins = ["pytester"]

DATA = Path(__file__).resolve().parent.parent / "data"
VERSIONS = [ln for ln in (DATA / "debian-versions.txt").read_text().splitlines() if ln and not ln.startswith("#")]
ABIS = bs.generic_abis(VERSIONS)
JUNIT = DATA / "junit"


# --- Debian candidates ----------------------------------------------------------------------------------------------

def specs(cands: list[Candidate]) -> list[str]:
    return [c.abi for c in cands]


def test_generic_abis_drop_the_cloud_flavour():
    assert len(ABIS) == len(VERSIONS) // 2
    assert not any(a.endswith("-cloud") for a in ABIS)


def test_range_is_one_build_per_upstream_version_oldest_first():
    a, b = bs.resolve_endpoint("debian:6.12.95", ABIS), bs.resolve_endpoint("debian:6.12.43", ABIS)
    assert specs(bs.candidate_range(ABIS, a, b)) == [
        "6.12.43+deb12", "6.12.57+deb12", "6.12.69+deb12", "6.12.73+deb12", "6.12.74+deb12", "6.12.85+deb12",
        "6.12.86+deb12", "6.12.88+deb12",
        "6.12.90+deb12.1",  # of +deb12, +deb12.1, +deb13, +deb13.1: bookworm-backports, newest rebuild
        "6.12.94+deb12", "6.12.95+deb12"]


def test_range_orders_numerically_and_takes_trixie_only_versions():
    a, b = bs.resolve_endpoint("6.12.95", ABIS), bs.resolve_endpoint("debian:6.12.107", ABIS)
    assert specs(bs.candidate_range(ABIS, a, b)) == [
        "6.12.95+deb12", "6.12.96+deb13", "6.12.100+deb12", "6.12.101+deb12", "6.12.105+deb13", "6.12.107+deb12"]


def test_endpoints_are_kept_as_given_and_newest_specs_resolve():
    a = bs.resolve_endpoint("debian:6.12.90+deb13", ABIS)
    b = bs.resolve_endpoint("debian:newest-6.12+deb12", ABIS)
    assert (a.abi, b.abi) == ("6.12.90+deb13", "6.12.117+deb12")
    assert specs(bs.candidate_range(ABIS, a, b))[:2] == ["6.12.90+deb13", "6.12.94+deb12"]
    assert a.spec == "debian:6.12.90+deb13" and a.label == "debian:6.12.90 (6.12.90+deb13-amd64)"


def test_range_across_series_puts_6_1_abis_first():
    a, b = bs.resolve_endpoint("debian:newest-6.1", ABIS), bs.resolve_endpoint("debian:6.12.57", ABIS)
    assert specs(bs.candidate_range(ABIS, a, b)) == ["6.1.0-56", "6.12.43+deb12", "6.12.57+deb12"]
    assert a.label == "debian:6.1.0-56 (6.1.0-56-amd64)"


@pytest.mark.parametrize(("good", "bad", "message"), [
    ("debian:6.12.44", "debian:6.12.95", "debian:6.12.44: no such Debian kernel package"),
    ("debian:6.12.95-cloud", "debian:6.12.43", "generic flavour only"),
    ("debian:6.12.90", "debian:6.12.90+deb13", "same upstream version: nothing to bisect"),
    ("debian:banana", "debian:6.12.43", "not a Debian kernel version"),
    ("debian:6.12.43", "debian:6.12.95", "--first-good looks for a fix, so the good end must be the newer one"),
])
def test_bad_input_is_one_setup_error_line(good, bad, message):
    with pytest.raises(SetupError, match=re.escape(message)) as exc:
        bs.make_plan(ABIS, good, bad, first_good=True)
    assert "\n" not in str(exc.value)


def test_version_order_of_the_ends_decides_regression_or_fix():
    regression = bs.make_plan(ABIS, "debian:6.12.43", "debian:6.12.95", first_good=False)
    fix = bs.make_plan(ABIS, "debian:6.12.95", "debian:6.12.43", first_good=False)  # --first-good is optional
    assert (regression.old_verdict, regression.looking_for) == (StepVerdict.GOOD, "first bad")
    assert (fix.old_verdict, fix.looking_for) == (StepVerdict.BAD, "first good")
    assert specs(fix.candidates) == specs(regression.candidates)


# --- the search -----------------------------------------------------------------------------------------------------

def drive(size: int, first_new: int, skip: frozenset[int] = frozenset()) -> tuple[list[int], Search]:
    search, tested = Search(size), []
    while (i := search.next()) is not None:
        tested.append(i)
        search.record(i, "skip" if i in skip else ("new" if i >= first_new else "old"))
    return tested, search


def test_search_on_the_11_debian_candidates_takes_the_midpoints():
    tested, search = drive(11, first_new=9)  # 6.12.43 … 6.12.95; the 10th (6.12.94) first new
    assert tested == [5, 7, 8, 9]  # 7.5 and 8.5: the lower on a tie
    assert search.suspects() == [9]


@pytest.mark.parametrize("size", [2, 3, 4, 11, 33])
def test_search_finds_every_boundary_within_log2_steps(size):
    for first_new in range(1, size):
        tested, search = drive(size, first_new)
        assert search.suspects() == [first_new]
        assert len(tested) <= Search(size).steps_left()


def test_a_skipped_midpoint_tries_its_nearest_neighbour():
    search = Search(11)
    assert search.next() == 5
    search.record(5, "skip")
    assert search.next() == 4  # 4 and 6 are as near: the lower one
    search.record(4, "skip")
    assert search.next() == 6


def test_skips_around_the_boundary_leave_several_suspects():
    tested, search = drive(11, first_new=6, skip=frozenset({5, 6}))
    assert search.suspects() == [5, 6, 7]  # 4 old, 7 new, 5 and 6 unknown: like git's "could be any of"
    assert set(tested) >= {5, 6, 7, 4}


def test_record_rejects_nonsense():
    search = Search(5)
    with pytest.raises(ValueError, match="outside"):
        search.record(4, "new")
    with pytest.raises(ValueError, match="expected old, new or skip"):
        search.record(2, "bad")
    with pytest.raises(ValueError, match="two ends"):
        Search(1)


# --- classifying real sessions ----------------------------------------------------------------------------------------

def test_real_vm_session_that_lost_uffd_wp_is_bad():
    """debian:6.12.43, -k "snapshot_style and mpn409": the suite's own verdicts, from a TCG VM."""
    out = bisect_step.classify(1, (JUNIT / "debian-6.12.43-snapshot_style-mpn409.xml").read_text())
    assert out.verdict is StepVerdict.BAD
    assert out.failed == ["test_snapshot_style[shrink@after-protect-mpn409]", "test_snapshot_style_soft_dirty[mpn409]"]
    assert out.reason == ("2 failed: test_snapshot_style[shrink@after-protect-mpn409], "
                          "test_snapshot_style_soft_dirty[mpn409]; 2 passed")
    wp = next(c for c in out.cases if c.status == "failed").message
    assert "16,128 pages lost their uffd-wp bit (pagemap bit 57)" in wp  # the element text: the whole verdict
    assert "raised no WP fault" in wp


def test_a_verdict_is_shown_by_its_findings():
    out = bisect_step.classify(1, (JUNIT / "debian-6.12.43-snapshot_style-mpn409.xml").read_text())
    wp, soft_dirty = bisect_step.failure_report(out).values()
    lines = bisect_step.failure_lines(wp)
    assert len(lines) == 3  # the header and both findings; the artifacts line is left out
    assert lines[0] == "snapshot-style[shrink@after-protect-mpn409-spread8] on kernel 6.12.43+deb12-amd64"
    assert lines[1].startswith("[shrink@after-protect] 16,128 pages lost their uffd-wp bit (pagemap bit 57) (first")
    assert lines[2].startswith("[touch(write, zero)] 16,128 writes to write-protected pages raised no WP fault")
    assert len(lines[1]) == 201 and lines[1].endswith("…")
    assert bisect_step.failure_lines(soft_dirty)[1].startswith(
        "[shrink@after-write] 16,128 pages lost their soft-dirty bit (pagemap bit 55)")


def test_real_vm_session_that_passed_is_good():
    out = bisect_step.classify(0, (JUNIT / "debian-6.12.95-snapshot_style-mpn409.xml").read_text())
    assert (out.verdict, out.reason, out.count("passed")) == (StepVerdict.GOOD, "4 passed", 4)


def test_real_kernel_that_did_not_boot_is_skipped_with_its_reason():
    note = bisect_step.last_word((JUNIT / "boot-failure.log").read_text())
    assert note.startswith("/tmp/bogus/bzImage: L1 VM did not bring up the agent (tcg, pc)")
    out = bisect_step.classify(4, (JUNIT / "boot-failure.xml").read_text(), note)
    assert out.verdict is StepVerdict.SKIP
    assert out.reason.startswith("boot/setup failed: /tmp/bogus/bzImage: L1 VM did not bring up")


@pytest.mark.parametrize(("code", "junit", "verdict", "reason"), [
    (None, None, StepVerdict.SKIP, "no result: t"),
    (5, None, StepVerdict.ABORT, "no tests collected"),
    (2, None, StepVerdict.ABORT, "pytest interrupted"),
    (3, None, StepVerdict.ABORT, "pytest internal error"),
    (-9, None, StepVerdict.SKIP, "pytest died (exit -9)"),
    (1, None, StepVerdict.SKIP, "exit 1 but no JUnit XML"),
    (1, "<testsuites><testsuite", StepVerdict.SKIP, "unreadable JUnit XML"),
])
def test_sessions_without_a_verdict(code, junit, verdict, reason):
    out = bisect_step.classify(code, junit, "t")
    assert out.verdict is verdict and out.reason.startswith(reason)


CASES = """
import pytest
from suite.errors import SetupError

@pytest.fixture
def broken():
    raise RuntimeError("no helper binary")

def test_pass():
    pass

def test_fail():
    pytest.fail("snapshot-style[x] on kernel k\\n  [touch(write, zero)] 3 writes raised no WP fault", pytrace=False)

def test_error(broken):
    pass

def test_skip():
    pytest.skip("kernel lacks CONFIG_MEM_SOFT_DIRTY")

def test_setup_error():
    raise SetupError("no memory cgroup v2")
"""


@pytest.fixture
def session(pytester: pytest.Pytester):
    """Run real pytest on CASES with a -k selection; return (exit code, JUnit XML text)."""
    pytester.makepyfile(test_cases=CASES)

    def run(expr: str) -> tuple[int, str]:
        xml = pytester.path / "out.xml"
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", expr, f"--junitxml={xml}")
        return int(result.ret), xml.read_text() if xml.exists() else ""

    return run


@pytest.mark.parametrize(("expr", "verdict", "reason"), [
    ("test_pass", StepVerdict.GOOD, "1 passed"),
    ("test_pass or test_skip", StepVerdict.GOOD, "1 passed; 1 skipped"),
    ("test_pass or test_fail or test_error", StepVerdict.BAD, "1 failed: test_fail; 1 passed; 1 error"),
    ("test_pass or test_error", StepVerdict.SKIP, '1 passed; 1 error, no verdict: failed on setup with "RuntimeError'),
    ("test_setup_error", StepVerdict.SKIP, "1 error, no verdict: suite.errors.SetupError: no memory cgroup v2"),
    ("test_skip", StepVerdict.SKIP, "no test ran (1 skipped)"),
])
def test_real_pytest_sessions_classify(session, expr, verdict, reason):
    code, xml = session(expr)
    out = bisect_step.classify(code, xml)
    assert (out.verdict, out.reason[:len(reason)]) == (verdict, reason)


def test_a_selection_matching_nothing_aborts(session):
    code, xml = session("nothing_matches_this")
    assert bisect_step.classify(code, xml).verdict is StepVerdict.ABORT


@pytest.mark.parametrize(("verdict", "first_good", "code"), [
    (StepVerdict.GOOD, False, 0), (StepVerdict.BAD, False, 1), (StepVerdict.GOOD, True, 1),
    (StepVerdict.BAD, True, 0), (StepVerdict.SKIP, False, 125), (StepVerdict.ABORT, True, 128),
])
def test_git_bisect_run_exit_codes(verdict, first_good, code):
    assert bisect_tree.exit_status(verdict, first_good) == code


# --- running steps for real (pytest subprocesses of a tiny project) ---------------------------------------------

def test_a_step_over_its_timeout_is_stopped_and_skipped(tmp_path):
    with open(tmp_path / "log", "w") as log:
        code = bisect_step.run_bounded([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, log,
                                       timeout=0.5)
    assert code is None
    assert bisect_step.classify(code, None, "no result within 0.5 s").verdict is StepVerdict.SKIP


def test_runner_argv_is_the_documented_command(tmp_path):
    argv = bisect_step.Runner("snapshot_style", extra=("--accel=tcg",)).argv("debian:6.12.57+deb12", tmp_path / "x.xml",
                                                                    tmp_path / "a")
    assert argv[1:] == ["-m", "pytest", "-p", "no:cacheprovider", "tests", "--kernel=debian:6.12.57+deb12",
                        "-k", "snapshot_style", "-m", "host and not bench", f"--junitxml={tmp_path / 'x.xml'}", "-q",
                        f"--artifacts={tmp_path / 'a'}", "--accel=tcg"]


PROJECT_CONFTEST = """
def pytest_addoption(parser):
    parser.addoption("--kernel")
    parser.addoption("--artifacts")

def pytest_configure(config):
    config.addinivalue_line("markers", "host: scenario")
"""
PROJECT_TESTS = """
import re
import pytest

pytestmark = pytest.mark.host
FIXED_IN = {FIXED!r}
DOES_NOT_BOOT = {BROKEN!r}

@pytest.fixture(scope="session")
def abi(request):
    abi = request.config.getoption("kernel").removeprefix("debian:")
    if abi in DOES_NOT_BOOT:
        pytest.exit(f"holecheck: debian:{{abi}}: L1 VM did not bring up the agent", returncode=4)
    return abi

def test_snapshot_style(abi):
    assert tuple(int(x) for x in re.findall(r"\\d+", abi.split("+")[0])) >= FIXED_IN, "lost uffd-wp"
"""


def fake_project(path: Path, fixed_in: tuple[int, ...], broken: set[str]) -> Path:
    """A project whose test fails on kernels older than ``fixed_in`` and whose ``broken`` kernels do not boot."""
    (path / "tests").mkdir(parents=True)
    (path / "conftest.py").write_text(PROJECT_CONFTEST)
    (path / "tests" / "test_fake.py").write_text(PROJECT_TESTS.format(FIXED=fixed_in, BROKEN=broken))
    return path


def test_debian_bisection_end_to_end(tmp_path, capsys):
    """The real Runner and Bisection over the real candidate list: fixed in 6.12.88; 6.12.85 does not boot."""
    plan = bs.make_plan(ABIS, "debian:6.12.95", "debian:6.12.43", first_good=True)
    project = fake_project(tmp_path / "p", (6, 12, 88), {"6.12.85+deb12"})
    log = tmp_path / "bisect" / "run.json"
    assert bs.Bisection(plan, bisect_step.Runner("snapshot_style", timeout=120, project=project), log, {}).run() == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("bisecting 11 Debian kernels, debian:6.12.43 (6.12.43+deb12-amd64) … debian:6.12.95 "
                        "(6.12.95+deb12-amd64), for the first good (old end expected bad, new end good): both ends, "
                        "then ~4 steps")
    assert lines[1].startswith("old end (expected bad): debian:6.12.43 (6.12.43+deb12-amd64) → bad "
                               "(1 failed: test_snapshot_style) in ")
    assert lines[2].startswith("new end (expected good): debian:6.12.95 (6.12.95+deb12-amd64) → good (1 passed) in ")
    assert [ln.split(" (")[0] for ln in lines[3:7]] == [
        "step 1/4: debian:6.12.85", "step 2/5: debian:6.12.74", "step 3/5: debian:6.12.88", "step 4/4: debian:6.12.86"]
    assert "→ skip (boot/setup failed: debian:6.12.85+deb12: L1 VM did not bring up the agent) in " in lines[3]
    assert lines[7:10] == [
        "first good: debian:6.12.88 (6.12.88+deb12-amd64); last bad: debian:6.12.86 (6.12.86+deb12-amd64)",
        "  debian:6.12.86+deb12 test_snapshot_style:",
        "    AssertionError: lost uffd-wp"]
    data = json.loads(log.read_text())
    assert data["result"] == {"exit": 0, "found": "debian:6.12.88+deb12", "last_old": "debian:6.12.86+deb12"}
    assert [s["verdict"] for s in data["steps"]] == ["bad", "good", "skip", "bad", "good", "bad"]
    assert data["steps"][0]["failures"]["test_snapshot_style"]["summary"].startswith("AssertionError: lost uffd-wp")
    assert (log.with_suffix("") / "6.12.43+deb12.xml").exists()


def test_debian_bisection_with_a_skip_next_to_the_change_names_both(tmp_path, capsys):
    """6.12.85 does not boot and 6.12.86 is the first fixed one: either may be the first good."""
    project = fake_project(tmp_path / "p", (6, 12, 86), {"6.12.85+deb12"})
    plan = bs.make_plan(ABIS, "debian:6.12.95", "debian:6.12.43", first_good=True)
    assert bs.Bisection(plan, bisect_step.Runner("snapshot_style", timeout=120, project=project), tmp_path / "r.json",
                        {}).run() == 3
    out = capsys.readouterr().out
    assert ("only skipped kernels left: the first good is one of debian:6.12.85+deb12, debian:6.12.86+deb12 "
            "(last bad: debian:6.12.74 (6.12.74+deb12-amd64))") in out


def test_debian_bisection_across_unfetchable_versions_ends_with_their_range(tmp_path, capsys):
    """The real captured Packages index: fixed in 7.0, where only unfetchable builds exist. None of the 20 is tried;
    the plan says so before the first step, and the result is the range they leave, not a version."""
    from kernels import debian, packages
    index = packages.KernelIndex(s for suite in ("bookworm-backports", "trixie-backports", "forky")
                                 for s in packages.parse((DATA / "debian-packages" / f"{suite}.Packages").read_text(),
                                                         suite))
    plan = bs.make_plan(bs.generic_abis(debian.abis(index)), "debian:7.3.4", "debian:6.17.13", first_good=True,
                        unfetchable=debian.unfetchable(index))
    project = fake_project(tmp_path / "p", (7, 0), set())
    log = tmp_path / "run.json"
    assert bs.Bisection(plan, bisect_step.Runner("snapshot_style", timeout=120, project=project), log, {}).run() == 3
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bisecting 6 Debian kernels, debian:6.17.13")
    assert lines[2] == "  6.18.5 … 7.1.13 (20): a change there is located only to 6.17.13 … 7.2.6"
    assert not any(ln.startswith("step") and ("6.18." in ln or "6.19." in ln or "7.0." in ln or "7.1." in ln)
                   for ln in lines)
    assert ("the first good is one of debian:7.2.6+deb13 or of the 20 versions before that cannot be fetched "
            "(6.18.5 … 7.1.13) (last bad: debian:6.17.13 (6.17.13+deb13-amd64))") in lines
    data = json.loads(log.read_text())
    assert data["left_out"] == plan.notes() and len(data["result"]["unfetchable"]) == 20


def test_debian_bisection_refuses_ends_that_do_not_hold(tmp_path, capsys):
    plan = bs.make_plan(ABIS, "debian:6.12.95", "debian:6.12.88", first_good=True)  # 6.12.88 passes already
    runner = bisect_step.Runner("snapshot_style", timeout=120, project=fake_project(tmp_path / "p", (6, 12, 86), set()))
    assert bs.Bisection(plan, runner, tmp_path / "run.json", {}).run() == 1
    out = capsys.readouterr().out
    assert "cannot bisect: debian:6.12.88+deb12 was given as bad but is good; nothing bisected" in out


# --- git bisect run helper ----------------------------------------------------------------------------------------

def test_run_tree_that_does_not_build_is_skipped(tmp_path, capsys):
    """kernels.git_tree.build_tree for real on a directory that is no Linux tree: exit 125, logged."""
    (tmp_path / "notlinux").mkdir()
    runner = bisect_step.Runner("postcopy_style", project=tmp_path / "project")
    assert bisect_tree.run_tree(tmp_path / "notlinux", runner) == 125
    assert "does not build: build:" in capsys.readouterr().out
    entry = json.loads((tmp_path / "project/.holecheck/bisect/run-tree.jsonl").read_text())
    assert (entry["verdict"], entry["exit"], entry["head"]) == ("skip", 125, "?")
    assert "not a Linux source tree" in entry["reason"]


def test_run_tree_with_an_in_tree_config_is_skipped(tmp_path):
    tree = tmp_path / "linux"
    (tree / "mm").mkdir(parents=True)
    (tree / "Makefile").write_text("")
    (tree / ".config").write_text("CONFIG_USERFAULTFD=y\n")
    assert bisect_tree.run_tree(tree, bisect_step.Runner("postcopy_style", project=tmp_path / "project")) == 125


def test_run_tree_usage_errors_abort_git_bisect(capsys):
    assert bs.main(["run-tree", "."]) == 128  # no -k: exit 2 would tell git "bad"
    with pytest.raises(SystemExit) as exc:
        bs.main(["debian", "--good", "debian:6.12.95"])
    assert exc.value.code == 2
