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


@contextlib.contextmanager
def held(path: Path | str, what: str, timeout: float) -> Iterator[None]:
    """Hold the exclusive lock on ``path`` for the ``with`` body; wait at most ``timeout`` s for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _take(fd):
            t0 = time.monotonic()
            reported = [-REPORT_EVERY]

            def attempt() -> str:
                """"" once taken, else who holds it."""
                if _take(fd):
                    return ""
                who, waited = holder(path), time.monotonic() - t0
                if waited - reported[0] >= REPORT_EVERY:
                    reported[0] = waited
                    log.warning("waiting for %s: held by %s (waited %.0f s, at most %g s)", what, who, waited,
                                timeout)
                return who

            wait_for(attempt, lambda who: not who, what=f"{what} (lock file {path})", timeout=timeout,
                     interval=0.1, max_interval=1.0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_cmdline()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
