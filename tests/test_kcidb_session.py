"""``--kcidb=FILE`` from a real session: holecheck's postcopy negative control on the host (real QEMU, real
userfaultfd) in a pytest subprocess, its KCIDB file validated by ``kcidb-io``. The outcome mapping on every status
is tests/unit/test_kcidb.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kcidb_io
import pytest

ROOT = Path(__file__).resolve().parent.parent
SESSION_TIMEOUT = 1200.0  # the cell (~30 s) behind other runs' THP knob lock (at most 900 s)


@pytest.mark.qemu
def test_kcidb_file_of_a_real_host_session(tmp_path: Path) -> None:
    out = tmp_path / "kcidb.json"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "tests", "-q",
            "-k", "negative_control_postcopy_zeroed_data", "--kernel=host", f"--kcidb={out}",
            f"--artifacts={tmp_path / 'a'}"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=SESSION_TIMEOUT, check=False,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, f"the session failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
    data = json.loads(out.read_text())
    kcidb_io.schema.LATEST.validate(data)
    release = os.uname().release
    assert [c["id"] for c in data["checkouts"]] == [f"holecheck:host-{release}"]
    assert data["builds"][0]["misc"]["release"] == release
    assert [t["status"] for t in data["tests"]] == ["PASS"]  # the control's sabotage was caught: the test passed
    assert data["tests"][0]["misc"]["nodeid"].startswith("tests/test_postcopy.py::test_negative_control_postcopy")
