"""Process-tree helpers: the snapshot stream's sink is a grandchild of QEMU (exec: URI → sh → pv); process groups
stopped as a whole; SIGTERM made to unwind like Ctrl-C."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
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


def stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group ``proc`` leads (so it can clean up), SIGKILL it after ``grace`` s; reap."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def sigterm_unwinds() -> None:
    """SIGTERM (kill, CI timeouts, a bisection stopping its step) raises KeyboardInterrupt like Ctrl-C, so every
    ``finally`` and context manager runs: child process groups stopped, temporary dirs removed, knobs restored.
    Python's default for SIGTERM is to die on the spot, leaving children that run in sessions of their own."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
