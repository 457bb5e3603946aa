"""One QEMU process: its private 0700 directory, its launch, and the one way it (and its helpers) stop.

``QemuProcess`` is what ``machine.RamMachine`` (L2: pc + halting BIOS + qtest + QMP) and ``vm.QemuVm`` (L1:
microvm + virtiofsd + virtio-serial) share, shaped like QEMU's own python/qemu/machine ``QEMUMachine``: a
subclass fills in small hooks and the base runs them in order.

- ``_pre_launch()``   — before QEMU starts; ``self.dir`` exists (start daemons, open listening sockets).
- ``_base_args()``    — QEMU's arguments (the binary and ``extra_args`` are added around them).
- ``_post_launch()``  — QEMU runs: wait until it answers; raise ``launch_failure()`` if it exited.
- ``_ask_to_quit()``  — stop asks QEMU to exit by itself (QMP quit); True if QEMU agreed.
- ``_post_shutdown()``— QEMU and its helpers are gone: close clients and sockets (``self.dir`` is still there).

Every child (QEMU and helpers such as virtiofsd) leads its own process group and gets PR_SET_PDEATHSIG, so even
a SIGKILLed pytest leaves none behind; ``stop()`` ends each group with ``procs.stop_group``. A launch that fails
because QEMU exited raises one ``LaunchError`` carrying the exit code, the command line and the output.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ..errors import HolecheckError, SetupError
from ..procs import stop_group

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
HELPER_STOP_GRACE = 3.0
ArgvPrefix = Callable[[list[str]], list[str]]


class LaunchError(SetupError):
    """QEMU exited while it was being launched. The message is one line; the details are attributes."""

    def __init__(self, name: str, exitcode: int | None, command: list[str], output: str) -> None:
        tail = [ln for ln in output.strip().splitlines() if ln][-5:]
        super().__init__(f"{name}: QEMU exited with status {exitcode} during startup: "
                         + (" | ".join(tail) if tail else "(no output)"))
        self.exitcode = exitcode
        self.command = command
        self.output = output


def die_with_parent() -> None:
    # runs in the child between fork and exec: an interrupted test run must not leave QEMUs behind.
    # Caveat: the signal fires when the *thread* that started the child exits, so start QEMUs from a thread
    # that outlives them (pytest's main thread does), or pass die_with_parent=False.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


TERMINATING = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def terminating_signals_blocked() -> Iterator[None]:
    """SIGINT/SIGTERM held pending (not lost) in this thread until the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a pending signal is delivered here, after Popen returned


def popen_tied(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Popen a child that dies with this process, without the races of a bare ``preexec_fn=die_with_parent``.

    A SIGINT/SIGTERM between fork and exec would run pytest's handler inside the forked child (which then never
    execs, or execs after the parent unwound), so both stay blocked around the ``Popen``; the child unblocks them
    just before exec (a caller that must record the child before a pending signal lands wraps its assignment in
    its own ``terminating_signals_blocked()``). PR_SET_PDEATHSIG only covers a parent that dies *after* the
    prctl, so the child then checks ``getppid()`` and exits if the parent is already gone (prctl(2)) — else it
    would outlive the run, e.g. a strace left group-stopped with its tracees.
    """
    parent = os.getpid()

    def preexec() -> None:
        die_with_parent()
        if os.getppid() != parent:  # the parent died before the prctl: no death signal will come
            os._exit(1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINATING)  # the mask survives exec: the child must see them

    with terminating_signals_blocked():
        return subprocess.Popen(argv, preexec_fn=preexec, **kwargs)


class QemuProcess:
    """A QEMU process and the helpers it needs; ``with``, or ``start()`` … ``stop()``. Starts once."""

    stop_grace = 3.0  # s a QEMU has to exit after it agreed to quit, or after stop_signal
    # how stop asks a QEMU that did not agree to quit; None: SIGKILL at once (it may be stuck in a userfault)
    stop_signal: signal.Signals | None = signal.SIGTERM

    def __init__(self, name: str, binary: str, *, extra_args: tuple[str, ...] = (),
                 argv_prefix: ArgvPrefix | None = None, die_with_parent: bool = True) -> None:
        self.name = name
        self.binary = binary
        self.extra_args = extra_args
        self.argv_prefix = argv_prefix
        self.die_with_parent = die_with_parent
        self.argv: list[str] = []  # QEMU's command line, without argv_prefix
        self.dir: Path | None = None
        self.started_at = 0.0  # time.monotonic() when QEMU was started
        self._proc: subprocess.Popen[bytes] | None = None
        self._helpers: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._output_final: str | None = None
        self._launched = False

    # -- hooks ----------------------------------------------------------------------------------------------

    def _pre_launch(self) -> None:
        pass

    def _base_args(self) -> list[str]:
        return []

    def _post_launch(self) -> None:
        pass

    def _ask_to_quit(self, timeout: float) -> bool:
        return False

    def _post_shutdown(self) -> None:
        pass

    # -- lifecycle ------------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> Self:
        """Launch QEMU and wait until it answers; on any failure everything started so far is stopped."""
        if self._launched:
            raise HolecheckError(f"{self.name}: a {type(self).__name__} starts once; make a new one")
        self._launched = True
        self.dir = Path(tempfile.mkdtemp(prefix=f"holecheck-{self.name}-"))  # 0700: sockets are ours alone
        try:
            self._pre_launch()
            self.argv = [self.binary, *self._base_args(), *self.extra_args]
            (self.dir / "qemu.argv").write_text(" ".join(self.argv) + "\n")
            log.debug("%s: starting %s", self.name, " ".join(self.argv))
            self.started_at = time.monotonic()
            self._proc = self._popen(self.argv_prefix(list(self.argv)) if self.argv_prefix else self.argv,
                                     "qemu.log")
            self._post_launch()
        except BaseException as exc:
            failure = None
            if isinstance(exc, Exception) and not isinstance(exc, LaunchError) and not self.alive() \
                    and self._proc is not None:
                failure = self.launch_failure()
            self.stop()
            if failure is not None:
                raise failure from exc
            raise
        return self

    def launch_failure(self) -> LaunchError:
        """The error for a QEMU that exited while starting (its exit code, command line and output)."""
        rc = self._proc.poll() if self._proc is not None else None
        return LaunchError(self.name, rc, self.argv, self.output())

    def spawn_helper(self, name: str, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        """Start a process QEMU needs (e.g. virtiofsd); ``stop()`` stops it after QEMU."""
        proc = self._popen(argv, log_name)
        self._helpers.append((name, proc))
        return proc

    def _popen(self, argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
        assert self.dir is not None
        with open(self.dir / log_name, "wb") as out:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=die_with_parent if self.die_with_parent else None,
                                    start_new_session=True)  # a process group: stop_group ends wrappers too

    def stop(self, timeout: float | None = None) -> None:
        """QEMU: asked to quit (``_ask_to_quit``, else ``stop_signal``) → bounded wait → SIGKILL; then its
        helpers likewise with SIGTERM. Always reaps, runs ``_post_shutdown`` and removes the dir. Idempotent."""
        grace = self.stop_grace if timeout is None else timeout
        proc = self._proc
        try:
            if proc is not None:
                quitting = proc.poll() is None and self._ask_to_quit(grace)
                ask = None if quitting else self.stop_signal
                stop_group(proc, grace if quitting or ask else 0.0, ask=ask, what=f"{self.name}: QEMU")
            for name, helper in self._helpers:
                stop_group(helper, HELPER_STOP_GRACE, what=f"{self.name}: {name}")
            self._helpers = []
            self._post_shutdown()
        finally:
            if self.dir is not None:
                self._output_final = self._read_output()
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None
            self._proc = None

    # -- state ----------------------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def gone(self) -> str:
        """'' while QEMU runs, else that it is gone: an ``alive`` for ``waits.wait_for`` (a harness error, not a
        stall, when the QEMU awaited has exited)."""
        if self.alive():
            return ""
        rc = self.exitcode()
        return f"{self.name}: QEMU is gone" + (f" (exit status {rc})" if rc is not None else "")

    def exitcode(self) -> int | None:
        """QEMU's exit status once it exited (negative: killed by that signal), else None."""
        return self._proc.poll() if self._proc is not None else None

    def helper_problem(self) -> str | None:
        """A helper that exited while QEMU still runs, or None."""
        if self.alive():
            for name, proc in self._helpers:
                if proc.poll() is not None:
                    return f"{name} exited with status {proc.returncode}"
        return None

    def output(self) -> str:
        """What QEMU printed (stdout and stderr), also after stop."""
        return self._output_final if self._output_final is not None else self._read_output()

    def log_tail(self, lines: int = 5, log_name: str = "qemu.log") -> str:
        """The last non-empty lines of a log in the private dir, joined into one line with " | "."""
        text = self.output() if log_name == "qemu.log" else self._read_output(log_name)
        return " | ".join([ln for ln in text.strip().splitlines() if ln][-lines:])

    def _read_output(self, log_name: str = "qemu.log") -> str:
        if self.dir is None:
            return ""
        try:
            return (self.dir / log_name).read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""
