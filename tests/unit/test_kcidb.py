"""``--kcidb``: a real pytest session (``pytester``) whose tests pass, fail, skip, error in setup and teardown, stall
with holecheck's own error and xfail by a known finding, written by the plugin and validated by ``kcidb-io``; the
checkout and build of a Debian kernel (a fetched tree's marker and config, constructed) and of a git tree (a real
``git init``). The host session that writes a real file is tests/test_kcidb_session.py.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kcidb_io
import pytest

from suite.kernelspec import KernelSpec
from suite.reports import kcidb

pytest_plugins = ["pytester"]

SESSION_CONFTEST = """
from pathlib import Path
from suite.kernelspec import KernelSpec
from suite.reports.kcidb import KcidbPlugin

def pytest_configure(config):
    config.pluginmanager.register(KcidbPlugin(Path("kcidb.json"), [KernelSpec("host")], "accel tcg"), "kcidb")
"""
SESSION_TESTS = """
import pytest
from suite.errors import StallError

def test_passes(record_property):
    record_property("kernel", "6.18.0-test")

def test_finds_holes():
    pytest.fail("postcopy[shrink@nohugepage-window]: 5 placed pages became pte_none holes", pytrace=False)

def test_not_applicable():
    pytest.skip("no soft-dirty on this kernel")

def test_known_bug(record_property):
    record_property("known_finding", "ksm-merge-drops-uffd-wp")
    pytest.xfail("known finding ksm-merge-drops-uffd-wp: 3 pages lost uffd-wp")

def test_stalls():
    raise StallError("helper did not answer within 10 s (awaited: ready; seen: nothing)")

@pytest.fixture
def broken_setup():
    raise RuntimeError("QEMU did not start")

def test_never_runs(broken_setup):
    pass

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("cgroup left behind")

def test_teardown_breaks(broken_teardown):
    pass
"""
STATUSES = {"test_passes": "PASS", "test_finds_holes": "FAIL", "test_not_applicable": "SKIP", "test_known_bug": "FAIL",
            "test_stalls": "ERROR", "test_never_runs": "MISS", "test_teardown_breaks": "ERROR"}


@pytest.fixture
def session(pytester: pytest.Pytester) -> dict:
    pytester.makeconftest(SESSION_CONFTEST)
    pytester.makepyfile(test_cells=SESSION_TESTS)
    pytester.runpytest_subprocess("-p", "no:cacheprovider")
    return json.loads((pytester.path / "kcidb.json").read_text())


def test_a_session_is_valid_kcidb(session: dict) -> None:
    kcidb_io.schema.LATEST.validate(session)
    assert kcidb_io.schema.LATEST.is_compatible_exactly(session)
    assert (len(session["checkouts"]), len(session["builds"]), len(session["tests"])) == (1, 1, 7)
    assert session["builds"][0]["checkout_id"] == session["checkouts"][0]["id"]
    assert {t["build_id"] for t in session["tests"]} == {session["builds"][0]["id"]}
    assert len({t["id"] for t in session["tests"]}) == 7


def test_outcomes_map_faithfully(session: dict) -> None:
    tests = {t["misc"]["nodeid"].rpartition("::")[2]: t for t in session["tests"]}
    assert {name: t["status"] for name, t in tests.items()} == STATUSES
    known = tests["test_known_bug"]
    assert known["misc"]["known_finding"] == "ksm-merge-drops-uffd-wp"
    assert known["comment"].startswith("known finding ksm-merge-drops-uffd-wp: ")
    assert "3 pages lost uffd-wp" in known["log_excerpt"]
    assert "5 placed pages became pte_none holes" in tests["test_finds_holes"]["log_excerpt"]
    assert tests["test_not_applicable"]["log_excerpt"] == "no soft-dirty on this kernel"
    assert "cgroup left behind" in tests["test_teardown_breaks"]["log_excerpt"]
    assert tests["test_passes"]["path"] == "holecheck.test_cells.test_passes"
    assert session["builds"][0]["misc"]["release"] == "6.18.0-test"  # the release the verdicts named


def test_harness_errors_are_told_by_class() -> None:
    assert kcidb.harness_error("suite.errors.StallError: helper did not answer")
    assert kcidb.harness_error("suite.qemu.process.LaunchError: dst: QEMU exited with status 1 during startup")
    assert not kcidb.harness_error("Failed: postcopy[…]: 5 placed pages became pte_none holes")
    assert not kcidb.harness_error("AssertionError: lost uffd-wp")
    assert not kcidb.harness_error("suite.nosuchmodule.X: y")


def test_path_is_dotted_words() -> None:
    assert kcidb.kcidb_path("tests/test_postcopy.py::test_postcopy[shrink@nohugepage-window-mpn409-spread8]") == (
        "holecheck.test_postcopy.test_postcopy.shrink_nohugepage-window-mpn409-spread8")


def test_debian_checkout_is_the_package_version_and_the_build_its_config(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    release = "7.3.4+deb13-amd64"
    tree = tmp_path / "kernels" / release
    (tree / "boot").mkdir(parents=True)
    (tree / ".complete").write_text("".join(f"linux-{p}-{release}_7.3.4-1~bpo13+1_amd64.deb\n"
                                            for p in ("base", "binary", "modules")))
    (tree / "boot" / f"config-{release}").write_text(
        'CONFIG_CC_VERSION_TEXT="x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0"\nCONFIG_USERFAULTFD=y\n')
    monkeypatch.setenv("HOLECHECK_CACHE", str(tmp_path))
    checkout, build = kcidb.kernel_records(KernelSpec("debian", "7.3.4"), release)
    assert checkout["id"] == "holecheck:debian-7.3.4-1~bpo13+1" and checkout["tree_name"] == "debian"
    assert checkout["misc"]["packages"] == [f"linux-{p}-{release}" for p in ("base", "binary", "modules")]
    assert build["compiler"] == "x86_64-linux-gnu-gcc-14 (Debian 14.2.0-19) 14.2.0"
    assert build["config_name"] == "debian amd64" and build["checkout_id"] == checkout["id"]


def test_tree_checkout_is_its_commit(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    tree.mkdir()
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tree / "Makefile").write_text("")
    subprocess.run([*git, "add", "Makefile"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "v7.3"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    checkout, build = kcidb.kernel_records(KernelSpec("build", str(tree)), "7.3.0-holecheck")
    assert checkout["git_commit_hash"] == head and checkout["id"] == f"holecheck:git-{head}"
    data = {"version": {"major": kcidb.SCHEMA.major, "minor": kcidb.SCHEMA.minor}, "checkouts": [checkout],
            "builds": [build]}
    kcidb_io.schema.LATEST.validate(data)
