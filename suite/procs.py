"""Process-tree helpers: the snapshot stream's sink is a grandchild of QEMU (exec: URI → sh → pv); every child we
start leads its own process group, which ``stop_group`` ends; SIGTERM made to unwind like Ctrl-C."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def children(pid: int) -> list[int]:
    """``pid``'s children now ([] once it is gone: a process may exit while its tree is walked)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    return found


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


def stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0, *,
               ask: signal.Signals | None = signal.SIGTERM, what: str = "") -> None:
    """Stop the process group ``proc`` leads and reap ``proc``: ``ask`` (SIGTERM, so it can clean up; None when
    the caller already asked another way, e.g. QMP quit), wait up to ``grace`` s, then SIGKILL.

    ``what`` names the process for the warning logged when it outlives a non-zero grace.
    """
    if ask is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, ask)
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        if what and grace > 0:
            log.warning("%s (pid %d) did not exit within %g s: SIGKILL", what, proc.pid, grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10.0)


def sigterm_unwinds() -> None:
    """SIGTERM (kill, CI timeouts, a bisection stopping its step) raises KeyboardInterrupt like Ctrl-C, so every
    ``finally`` and context manager runs: child process groups stopped, temporary dirs removed, knobs restored.
    Python's default for SIGTERM is to die on the spot, leaving children that run in sessions of their own."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
