"""tests/machine_state.py names every kind of leftover the run may leave: a host knob not as found (THP, KSM,
the cgroup root's subtree_control) and a mount (debugfs for split_huge_pages). The knob cases compare the live
machine with a baseline that differs in one knob (the machine is shared: a real change would be another run's
leftover); the mount case mounts debugfs for real, as ``split_triggers.debugfs`` does."""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import replace

import pytest
from machine_state import Baseline, ProcessWatch, leftovers

from suite import host_knobs, split_triggers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="reads the host's knobs under the knob lock: needs root")


def lines_for(before: Baseline) -> list[str]:
    return leftovers(before, ProcessWatch(os.getpid()), markers=[])


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    return Baseline.take()


def test_the_machine_as_found_has_no_leftover(baseline: Baseline) -> None:
    assert [ln for ln in lines_for(baseline) if not ln.startswith("process")] == []


@pytest.mark.parametrize("knob", ["cgroup/subtree_control", "ksm/run", "ksm/sleep_millisecs", "enabled"])
def test_a_knob_not_as_found_is_named(baseline: Baseline, knob: str) -> None:
    assert baseline.thp is not None
    if knob not in baseline.thp:
        pytest.skip(f"this kernel has no {knob}")
    before = replace(baseline, thp={**baseline.thp, knob: "holecheck-was-here"})
    assert f"host knob {knob}: holecheck-was-here before, {baseline.thp[knob]} after" in lines_for(before)


def test_every_ksm_knob_is_read() -> None:
    if not split_triggers.KSM.is_dir():
        pytest.skip("this kernel has no KSM")
    names = set(host_knobs.now())
    assert {"ksm/run", "ksm/use_zero_pages", "ksm/pages_to_scan", "ksm/sleep_millisecs"} <= names
    assert list(split_triggers.ksm_current())[-1] == "ksm/run"  # restored last: ksmd restarts as found


def test_a_debugfs_left_mounted_is_named(baseline: Baseline) -> None:
    with tempfile.TemporaryDirectory(prefix="holecheck-test-debugfs-") as tmp:
        subprocess.run(["mount", "-t", "debugfs", "none", tmp], check=True, capture_output=True, timeout=10)
        try:
            found = [ln for ln in lines_for(baseline) if ln.startswith("new mount:")]
        finally:
            subprocess.run(["umount", tmp], check=True, capture_output=True, timeout=10)
    assert any(f" {tmp} debugfs " in ln for ln in found), found


def test_split_triggers_debugfs_leaves_no_mount_and_no_directory(baseline: Baseline) -> None:
    seen = []
    with split_triggers.debugfs() as d:
        seen.append(d)
        assert (d / "split_huge_pages").exists()
    assert [ln for ln in lines_for(baseline) if ln.startswith("new mount:")] == []
    if seen[0].name.startswith("holecheck-debugfs-"):
        assert not seen[0].exists()
