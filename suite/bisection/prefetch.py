"""Fetch the Debian kernels a bisection may need next, in the background, while the current step runs.

``Prefetcher.step(abi, upcoming)`` before each step queues the kernels that may come next (the likelier first); one
worker thread fetches them one at a time,
each in a child ``python -m suite.bisection.prefetch ABI`` (``kernels.debian.fetch``: cached, SHA256-checked,
unpacked) at nice 19, in its own process group. One at a time because holecheck's apt lock (``kernels.apt``) serializes
fetches anyway: two fetches started together here finished after 21.6 s and 56.4 s, one after the other.

A step never queues behind a background fetch: ``step`` drops the queue and cancels a running fetch that is not
of a possible successor (SIGTERM: the child turns it into SystemExit, so its partial download and unpack
directories are removed and the lock released); if the step's own kernel is not cached yet, it cancels every
other fetch, waits for a running fetch of that kernel or fetches it in the foreground — before the step's pytest
starts, and before anything new is queued. ``close()`` (also on Ctrl-C, as a context manager) cancels everything.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..procs import stop_group

FETCH_TIMEOUT = 1800.0  # one kernel: apt lists, index, up to three .debs, dpkg-deb -x (usually 15–35 s)
CANCEL_GRACE = 10.0  # SIGTERM → SIGKILL


def is_cached(abi: str) -> bool:
    """Whether the generic-flavour kernel ``abi`` is unpacked in the cache (what ``kernels.debian.fetch`` reuses)."""
    from kernels import debian, versions

    return debian.is_complete(debian.kernels_dir() / f"{abi}-{versions.FLAVOURS['']}")


class Prefetcher:
    """Background fetches of Debian kernels (generic flavour), one at a time, cancelled when not needed."""

    def __init__(self, log_dir: Path, cached: Callable[[str], bool] = is_cached,
                 argv: Callable[[str], list[str]] | None = None) -> None:
        self.log_dir, self.cached = log_dir, cached
        self.argv = argv or (lambda abi: ["nice", "-n", "19", sys.executable, "-m", "suite.bisection.prefetch", abi])
        self.queue: list[str] = []
        self.current: tuple[str, subprocess.Popen[bytes]] | None = None
        self.fetched: dict[str, float] = {}  # abi → seconds, fetched in the background
        self.cancelled: list[str] = []
        self.closed = False
        self.cv = threading.Condition()
        self.worker = threading.Thread(target=self._work, name="prefetch", daemon=True)
        self.worker.start()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, abi: str) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"prefetch-{abi}.log", "ab") as log:
            return subprocess.Popen(self.argv(abi), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=Path(__file__).resolve().parents[2])

    @staticmethod
    def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
        """Its exit code, or None after ``timeout`` s (then it is stopped); stopped too on Ctrl-C."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc, CANCEL_GRACE)
            return None
        except BaseException:
            stop_group(proc, CANCEL_GRACE)
            raise

    def _work(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.queue or self.closed)
                if self.closed:
                    return
                abi = self.queue.pop(0)
                if self.cached(abi):
                    continue
                t0, proc = time.monotonic(), self._spawn(abi)
                self.current = (abi, proc)
            code = self._wait(proc, FETCH_TIMEOUT)
            with self.cv:
                self.current = None
                if code == 0:
                    self.fetched[abi] = time.monotonic() - t0
                self.cv.notify_all()

    def _want(self, abis: Sequence[str]) -> None:
        """Fetch these next, in this order (replaces what was queued; a running fetch goes on)."""
        with self.cv:
            running = self.current[0] if self.current else None
            self.queue = [a for a in dict.fromkeys(abis) if a != running]
            self.cv.notify_all()

    def _cancel(self, keep: Sequence[str]) -> str | None:
        """Drop the queue; stop a running fetch unless it is of a kernel in ``keep``; the ABI still running."""
        with self.cv:
            self.queue.clear()
            current = self.current
        if current and current[0] not in keep:
            stop_group(current[1], CANCEL_GRACE)
            self.cancelled.append(current[0])
            with self.cv:
                self.cv.wait_for(lambda: self.current is None, timeout=CANCEL_GRACE + 15)
            return None
        return current[0] if current else None

    def step(self, abi: str, upcoming: Sequence[str], timeout: float = FETCH_TIMEOUT) -> str:
        """Before a step on ``abi`` whose possible successors are ``upcoming`` (likelier first): make ``abi``
        cached if it can be, with no background fetch of another kernel running meanwhile, then queue
        ``upcoming``. Returns how ``abi`` got there (for the step's line)."""
        t0 = time.monotonic()
        if self.cached(abi):
            with self.cv:  # its background fetch may have unpacked it and not yet exited: count it as prefetched
                self.cv.wait_for(lambda: not (self.current and self.current[0] == abi), timeout=timeout)
            self._cancel(keep=upcoming)  # a fetch of a possible successor goes on
            note = f"prefetched in {self.fetched[abi]:.0f} s" if abi in self.fetched else "cached"
        else:
            note = self._fetch_now(abi, t0, timeout)
        self._want(upcoming)
        return note

    def _fetch_now(self, abi: str, t0: float, timeout: float) -> str:
        if self._cancel(keep=[abi]) == abi:
            with self.cv:
                self.cv.wait_for(lambda: self.current is None, timeout=timeout)
            if self.cached(abi):
                return f"waited {time.monotonic() - t0:.0f} s for its background fetch"
        code = self._wait(self._spawn(abi), timeout)
        if code == 0 and self.cached(abi):
            return f"fetched in {time.monotonic() - t0:.0f} s"
        return f"fetch failed (exit {code}, log {self.log_dir / f'prefetch-{abi}.log'}): the step tries again"

    def close(self) -> None:
        self._cancel(keep=())
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        self.worker.join(timeout=CANCEL_GRACE + 15)


def main(argv: Sequence[str]) -> int:
    """``python -m suite.bisection.prefetch ABI``: fetch one kernel; SIGTERM unwinds (temporary directories removed)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from kernels import debian
    from suite.errors import SetupError

    if len(argv) != 1:
        print("usage: python -m suite.bisection.prefetch ABI", file=sys.stderr)
        return 2
    try:
        print(debian.fetch(argv[0]), flush=True)
    except SetupError as exc:
        print(f"holecheck: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
