"""suite.locks between real processes: a waiter is not starved by a holder that takes the lock per cell, and
says at once on whom it waits."""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from suite import locks

# A run that takes the lock for each "cell" (0.3 s) and comes straight back for the next, 20 times (6 s).
GREEDY = """
import sys, time
from suite import locks
for i in range(20):
    with locks.held(sys.argv[1], "test lock", 30):
        if i == 0:
            print("holding", flush=True)
        time.sleep(0.3)
"""


def test_waiter_gets_the_lock_between_cells_of_a_greedy_holder(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    lock = tmp_path / "knobs.lock"
    greedy = subprocess.Popen([sys.executable, "-c", GREEDY, str(lock)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert greedy.stdout is not None and greedy.stdout.readline().strip() == "holding"
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="suite.locks"), locks.held(lock, "test lock", 30):
            waited = time.monotonic() - t0
            assert greedy.poll() is None, "the waiter got the lock only after the greedy run ended: starved"
        assert waited < 2.0, f"waited {waited:.1f} s for a lock released every 0.3 s"
        said = [r.getMessage() for r in caplog.records]
        assert said and said[0].startswith("waiting for test lock: held by pid "), said
        assert str(greedy.pid) in said[0] and "-c" in said[0]  # names the holder and its command
    finally:
        greedy.kill()
        greedy.wait(10)
