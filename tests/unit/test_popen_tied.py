"""``suite.qemu.process.popen_tied`` (how the strace hold starts strace): SIGINT/SIGTERM are held pending in the
parent while it forks and reach the child unblocked; a child whose parent is already gone exits instead of
running. Real processes, real signal masks (``/proc/PID/status``)."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

from suite.qemu.process import popen_tied, terminating_signals_blocked
from suite.waits import wait_for

BITS = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))


def blocked_in(status: str) -> int:
    return int(next(ln for ln in status.splitlines() if ln.startswith("SigBlk:")).split()[1], 16)


def test_child_gets_the_signals_unblocked_and_the_parent_its_mask_back() -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with terminating_signals_blocked():  # as the strace hold calls it: even then the child must see them
        proc = popen_tied(["cat", "/proc/self/status"], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=10)
    assert blocked_in(out) & BITS == 0
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_a_signal_during_the_fork_waits_for_the_parent() -> None:
    """SIGTERM sent while blocked is delivered once the block ends, to the parent's handler, not lost."""
    got: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda sig, frame: got.append(sig))
    try:
        with terminating_signals_blocked():
            # to this thread (the one that blocks it): a process-directed signal may land in another thread of a
            # pytest-xdist worker, which does not block it
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            proc = popen_tied(["true"])
            assert got == []
        assert got == [signal.SIGTERM]
        assert proc.wait(timeout=10) == 0
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_child_whose_parent_died_before_prctl_exits() -> None:
    """The parent here is a Python that forks the tied child and exits at once; the child (sleep 30) must not
    outlive it: either the death signal or the getppid() check ends it."""
    code = ("import subprocess, sys; from suite.qemu.process import popen_tied; "
            "p = popen_tied(['sleep', '30']); print(p.pid, flush=True)")
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                             check=True).stdout)
    def gone() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # dead, awaiting init's reaping
        except OSError:
            return True

    wait_for(gone, bool, timeout=10, what=f"sleep (pid {pid}) to die with its parent")
