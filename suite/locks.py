"""Host-wide locks between holecheck processes that say who holds them.

``held(path, what, timeout)`` flocks ``path`` and writes "pid cmdline" into it while held. A process that
must wait says so at once, naming the holder and how long it has held the lock, then again every
``REPORT_EVERY`` s, and gives up after ``timeout`` s with a StallError (through ``suite.waits``).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .waits import wait_for

log = logging.getLogger(__name__)
REPORT_EVERY = 30.0


def _take(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _cmdline() -> str:
    try:
        raw = Path(f"/proc/{os.getpid()}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(raw.decode(errors="replace").replace("\0", " ").split())[:300]  # one line, even for -c code


def holder(path: Path) -> str:
    """"pid N (cmdline) for N s" from what the holder wrote into the lock file and when."""
    try:
        text, since = path.read_text().strip(), path.stat().st_mtime
    except OSError:
        return "an unknown process"
    pid, _, cmd = text.partition(" ")
    if not pid.isdigit():
        return "an unknown process (it did not write its pid)"
    return f"pid {pid} ({cmd or '?'}) for {max(0.0, time.time() - since):.0f} s"


def _wait(fd: int, path: Path, what: str, deadline: float, t0: float) -> None:
    """Poll ``fd``'s lock until taken, saying at once and every REPORT_EVERY s who holds ``path``."""
    reported = [-REPORT_EVERY]

    def attempt() -> str:
        """"" once taken, else who holds it."""
        if _take(fd):
            return ""
        who, waited = holder(path), time.monotonic() - t0
        if waited - reported[0] >= REPORT_EVERY:
            reported[0] = waited
            log.warning("waiting for %s: held by %s (waited %.0f s, at most %.0f s)", what, who, waited,
                        deadline - t0)
        return who

    wait_for(attempt, lambda who: not who, what=f"{what} (lock file {path})",
             timeout=max(0.1, deadline - time.monotonic()), interval=0.05, max_interval=0.5)


@contextlib.contextmanager
def held(path: Path | str, what: str, timeout: float) -> Iterator[None]:
    """Hold the exclusive lock on ``path`` for the ``with`` body; wait at most ``timeout`` s for it.

    Fair: a waiter first takes ``path``.queue and keeps it while it polls the lock itself, so a holder that
    lets go and comes straight back (a run taking the lock per cell) queues behind the waiter instead of
    winning every race (measured before: a bisect step waited 210-520 s behind a host run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    queue = os.open(path.with_name(path.name + ".queue"), os.O_RDWR | os.O_CREAT, 0o644)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.monotonic()
        try:
            if not _take(queue):
                _wait(queue, path, what, t0 + timeout, t0)
            if not _take(fd):
                _wait(fd, path, what, t0 + timeout, t0)
        finally:
            os.close(queue)  # next in line may queue now
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_cmdline()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
