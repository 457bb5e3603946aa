"""Bounded reads of another process's memory, for stall detection during postcopy.

A read of a page that is missing from a userfaultfd-registered range waits until the fault is resolved — and a
postcopy destination never resolves a fault on a page it believes it received. Such a read can only be bounded
from outside, so it runs in a child process (``python -m suite.memreader PID``) that reads one range per
request line ("START LENGTH", hex) and answers "ok" when done; a range with no answer in time is a stall. The
child is killed afterwards (it leaves its wait when the target's userfaultfd goes away).
"""
from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time

from .errors import StallError

CHUNK = 1 << 20


class MemReader:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.proc = subprocess.Popen([sys.executable, "-m", "suite.memreader", str(pid)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def read(self, start: int, length: int, timeout: float) -> None:
        """Read [start, start+length) of the target; StallError if that does not finish within ``timeout`` s."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{start:x} {length:x}\n".encode())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(b"ok"):
                    return
                raise StallError(f"memory reader of pid {self.pid} failed at {start:#x}: {line.decode().strip()!r}")
            if left <= 0:
                raise StallError(f"read of {length:#x} bytes at {start:#x} in pid {self.pid} did not return within "
                                 f"{timeout:g} s")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()

    def reap(self, timeout: float = 5.0) -> None:
        """Wait for the killed child: it can only die once its read is released (the target exited)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)

    def __enter__(self) -> MemReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    for line in sys.stdin:
        start, length = (int(x, 16) for x in line.split())
        try:
            for off in range(0, length, CHUNK):
                os.pread(fd, min(CHUNK, length - off), start + off)
            sys.stdout.write("ok\n")
        except OSError as exc:
            sys.stdout.write(f"error {exc}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
