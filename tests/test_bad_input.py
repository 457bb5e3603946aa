"""Bad input gives one clear line (what, why, what to do) and a set-up exit code, never a traceback.

Each test runs holecheck itself (pytest in a subprocess, from this checkout) with one bad value and a cheap
selection: the bad value must stop the session before the selected test starts.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from suite.errors import SetupError
from suite.qemu import binary as qemu_binary
from suite.targets import vm

PROJECT = Path(__file__).resolve().parent.parent
SETUP_EXIT = 4  # pytest.UsageError and conftest's pytest.exit(..., returncode=4)
CHEAP_UNIT = "tests/unit/test_scenario.py::test_selectors"
# the quickest real scenario: registration before the first fault, max_ptes_none 511 (no split to wait for)
CHEAP_CELL = ("tests/test_synthetic.py::"
              "test_postcopy_style[register@before-first-fault-shrink@before-first-fault-mpn511]")
NOBODY = 65534
TIMEOUT = 120

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts a tmpfs, or drops to another user)")


def holecheck(*args: str, env: dict[str, str] | None = None,
              as_user: int | None = None) -> subprocess.CompletedProcess[str]:
    pytest_args = ["-m", "pytest", "-p", "no:cacheprovider", "-q", *args]
    run_env = {**os.environ, **(env or {})}
    if as_user is None:
        argv, cwd = [sys.executable, *pytest_args], PROJECT
    else:
        drop = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups"]
        if reachable_by_others(PROJECT):
            argv, cwd = [*drop, sys.executable, *pytest_args], PROJECT
        else:
            return in_bound_checkout(drop, pytest_args, run_env)
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False, env=run_env)


def reachable_by_others(path: Path) -> bool:
    """Can any user walk down to ``path`` (a checkout in /root, 0700 on Debian, is not)?"""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def in_bound_checkout(drop: list[str], pytest_args: list[str],
                      env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run pytest as another user where it can reach the checkout: the same files bound onto a world-readable
    directory, in a mount namespace of its own (the bind goes with the process)."""
    with tempfile.TemporaryDirectory(prefix="holecheck-as-user-") as tmp:
        os.chmod(tmp, 0o755)
        python = Path(sys.executable)
        if python.is_relative_to(PROJECT):  # the checkout's venv: the same venv under the bound path
            python = Path(tmp) / python.relative_to(PROJECT)
        script = 'mount --bind "$0" "$1" && cd "$1" && shift && exec "$@"'
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(PROJECT), tmp,
                *drop, str(python), *pytest_args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False, env=env)


def one_line(proc: subprocess.CompletedProcess[str], pattern: str, exit_code: int = SETUP_EXIT) -> str:
    """The run ended with ``exit_code`` and said ``pattern`` on exactly one line, with no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == exit_code, f"exit {proc.returncode}, not {exit_code}:\n{out}"
    assert "Traceback" not in out and not re.search(r"^E\s", out, re.M), f"a traceback:\n{out}"
    hits = [ln for ln in out.splitlines() if re.search(pattern, ln)]
    assert len(hits) == 1, f"{len(hits)} lines match {pattern!r}:\n{out}"
    return hits[0]


# --- option values, refused when pytest configures ------------------------------------------------------------


def test_artifacts_under_a_missing_parent_is_a_usage_error() -> None:
    proc = holecheck(CHEAP_UNIT, "--artifacts=/proc/nope/artifacts")
    one_line(proc, r"--artifacts=/proc/nope/artifacts: cannot create directories in /proc .*: "
                   r"give --artifacts a directory you can write")


def test_artifacts_under_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    proc = holecheck(CHEAP_UNIT, f"--artifacts={tmp_path}/file/artifacts")
    one_line(proc, rf"--artifacts=.*/file/artifacts: {tmp_path}/file is not a directory: give --artifacts")


@pytest.mark.parametrize(("value", "why"), [("-1", "must be a finite number of seconds above 0"),
                                            ("0", "must be a finite number of seconds above 0"),
                                            ("inf", "must be a finite number of seconds above 0"),
                                            ("ten", "not a number of seconds")], ids=["-1", "0", "inf", "ten"])
def test_helper_timeout_must_be_positive_seconds(value: str, why: str) -> None:
    proc = holecheck(CHEAP_UNIT, f"--helper-timeout={value}")
    one_line(proc, rf"--helper-timeout={value}: {why}.*: give e\.g\. --helper-timeout=10")


def _truncated_elf(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    with open(sys.executable, "rb") as f:  # a real ELF file cut short
        path.write_bytes(f.read(64 << 10))
    return path


@pytest.mark.parametrize(("make", "why"), [
    (lambda tmp: Path("/etc/passwd"), r"neither a bzImage \(no 'HdrS' setup header\) nor an ELF vmlinux"),
    (lambda tmp: (tmp / "bzImage").write_bytes(b"") or tmp / "bzImage", "it is empty"),
    (_truncated_elf, r"a truncated ELF file \(65536 bytes; its headers need \d+\)"),
], ids=["passwd", "empty", "truncated-elf"])
def test_kernel_that_is_not_a_kernel_is_named_with_why(tmp_path: Path, make, why: str) -> None:
    image = make(tmp_path)
    proc = holecheck(CHEAP_UNIT, f"--kernel={image}")
    one_line(proc, rf"--kernel={re.escape(str(image))}: not a kernel image: {why}; give a bzImage/vmlinuz or vmlinux")


@root_only
def test_a_kernel_that_cannot_be_had_stops_an_xdist_session_with_one_line() -> None:
    """As ``./holecheck main --kernel=…`` runs: the controller resolves the one kernel before workers start (a
    worker cannot stop the session: each of its cells would fail instead)."""
    proc = holecheck("tests/test_synthetic.py", "-n", "2", "--dist", "loadgroup", "--kernel=debian:nonexistent")
    one_line(proc, r"^ERROR: debian:nonexistent: not a Debian kernel version \(e\.g\. ")
    assert "INTERNALERROR" not in proc.stdout + proc.stderr and " failed" not in proc.stdout, proc.stdout


# --- QEMU: checked at session start for the selected real-QEMU tests, and again at every boot ---------------


def _qemu_candidates(tmp: Path) -> list[tuple[str, str]]:
    old = tmp / "qemu-6.0"
    old.write_text("#!/bin/sh\necho 'QEMU emulator version 6.0.0'\n")
    old.chmod(0o755)
    plain = tmp / "qemu-not-executable"
    plain.write_text("")
    found = [(str(tmp / "missing"), "does not exist"), (str(plain), "is not an executable file"),
             ("/bin/true", r"is not a QEMU system emulator \(`--version` printed 'true"),
             (str(old), r"is QEMU 6\.0\.0, too old: holecheck needs >= 7\.1\.0"),
             ("no-such-qemu", "is not on \\$PATH")]
    if Path("/usr/bin/qemu-img").exists():
        found.append(("/usr/bin/qemu-img", r"is not a QEMU system emulator \(`--version` printed 'qemu-img version"))
    return found


@pytest.mark.parametrize("selection", ["tests/test_postcopy.py", "tests/test_snapshot.py"])
def test_unusable_qemu_stops_the_session_before_any_test(tmp_path: Path, selection: str) -> None:
    for binary, why in _qemu_candidates(tmp_path):
        proc = holecheck(selection, f"--qemu={binary}")
        line = one_line(proc, rf"--qemu=\S+: .*{why}.*: point --qemu at a qemu-system-x86_64 >= 7\.1\.0")
        # "no tests ran", or "N deselected" where the selection deselects cells of other matrices: nothing ran
        assert not re.search(r"\d+ (passed|failed|error|xfailed|skipped)", proc.stdout), \
            f"{binary}: something ran:\n{proc.stdout}"
        assert line.startswith("ERROR: --qemu="), line


def test_unusable_qemu_stops_an_xdist_session_before_its_workers_start() -> None:
    proc = holecheck("tests/test_snapshot.py", "-n", "2", "--dist", "loadgroup", "--qemu=/bin/true")
    one_line(proc, r"^ERROR: --qemu=/bin/true: /bin/true is not a QEMU system emulator")
    assert "INTERNALERROR" not in proc.stdout + proc.stderr


def test_unusable_qemu_does_not_stop_unit_tests() -> None:
    """Only tests that start QEMU need it: the pure ones run whatever --qemu says."""
    proc = holecheck(CHEAP_UNIT, "--qemu=/bin/true")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_vm_boot_checks_its_qemu_before_starting_anything(tmp_path: Path) -> None:
    for binary, why in _qemu_candidates(tmp_path):
        spec = vm.VmSpec(kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd", cmdline="",
                         console_log=tmp_path / "console.log", qemu=binary, shares=(vm.Share("root", Path("/")),))
        machine = vm.QemuVm(spec)
        try:
            with pytest.raises(SetupError, match=why) as err:
                machine.start()
            assert "\n" not in str(err.value)
            assert machine._proc is None and not machine._helpers, "started something with an unusable QEMU"
        finally:
            machine.stop()


def test_the_qemu_here_passes_the_check() -> None:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        pytest.skip("no qemu-system-x86_64 on this machine")
    assert qemu_binary.check(binary) >= qemu_binary.MIN_QEMU


# --- the environment ------------------------------------------------------------------------------------------


@root_only
@pytest.mark.host
def test_full_cache_is_one_line_and_leaves_no_half_written_helper(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "holecheck-test", str(cache)], check=True)
    try:
        # no room left for the uffd helper the target builds
        with open(cache / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while f.write(b"\0" * 4096):
                pass
        proc = holecheck(CHEAP_CELL, env={"HOLECHECK_CACHE": str(cache)})
        one_line(proc, rf"holecheck: no space left in the cache {cache}: free space or point HOLECHECK_CACHE "
                       r"elsewhere")
        left = sorted(p.name for p in (cache / "bin").iterdir()) if (cache / "bin").is_dir() else []
        assert left == [], f"files a later run might trust: {left}"
    finally:
        subprocess.run(["umount", str(cache)], check=True)


@root_only
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop to nobody")
def test_not_root_is_one_line_and_unit_tests_still_run() -> None:
    for workers in ((), ("-n", "2")):  # also under pytest-xdist, as ./holecheck main runs
        proc = holecheck(CHEAP_CELL, *workers, as_user=NOBODY)
        one_line(proc, r"^ERROR: holecheck needs root: scenarios read page frame numbers from pagemap and "
                       r"kpageflags, set THP knobs and create memory cgroups; run it as root")
    unit = holecheck(CHEAP_UNIT, as_user=NOBODY)
    assert unit.returncode == 0 and "1 passed" in unit.stdout, unit.stdout + unit.stderr
