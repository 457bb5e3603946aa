"""Migration step helpers, one per step, in the style of QEMU's tests/qtest/migration framework.

Every wait is bounded; the ``events`` capability is always switched on so the QMP transcript shows
MIGRATION / MIGRATION_PASS events next to the commands. Names of capabilities and parameters may be given
with ``_`` (Python keywords); QMP spells them with ``-``.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import HolecheckError, SetupError, StallError
from ..waits import wait_for
from .machine import RamMachine
from .process import popen_tied, terminating_signals_blocked

MIGRATE_TIMEOUT = 60.0


class MigrationFailed(HolecheckError):
    """query-migrate reported status "failed"."""


def _dashed(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("_", "-"): v for k, v in kwargs.items()}


def migration_uri(dst: RamMachine) -> str:
    """A unix socket inside the destination's private directory."""
    assert dst.dir is not None, "destination not started"
    return f"unix:{dst.dir / 'migrate.sock'}"


@dataclass(frozen=True)
class Variant:
    """How a postcopy migration is driven beyond plain postcopy-ram: capabilities and parameters on both sides."""

    what: str  # for skip reasons: "QEMU 7.2.22 refuses <what>"
    caps: dict[str, bool] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


# QEMU >= 10.1 allows multifd with postcopy; zero-page-detection=multifd has the channels find zero pages, the path
# upstream fixed ("write zero pages when postcopy enabled": marked received, never written, is a hole).
VARIANTS = {
    "": Variant("postcopy"),
    "multifd": Variant("multifd with postcopy (zero-page-detection=multifd)", {"multifd": True},
                       {"multifd_channels": 2, "zero_page_detection": "multifd"}),
    "preempt": Variant("postcopy-preempt", {"postcopy_preempt": True}),
}


def set_variant(machine: RamMachine, variant: str, **caps: bool) -> None:
    """postcopy-ram, ``caps`` and ``variant``'s capabilities and parameters (QmpError if this QEMU refuses them)."""
    v = VARIANTS[variant]
    set_capabilities(machine, postcopy_ram=True, **caps, **v.caps)
    if v.params:
        set_parameters(machine, **v.params)


def set_capabilities(machine: RamMachine, **caps: bool) -> None:
    """migrate-set-capabilities; ``events`` is always on. E.g. ``set_capabilities(m, postcopy_ram=True)``."""
    wanted = {"events": True, **_dashed(caps)}
    machine.qmp("migrate-set-capabilities",
                capabilities=[{"capability": k, "state": bool(v)} for k, v in wanted.items()])


def set_parameters(machine: RamMachine, **params: Any) -> None:
    """migrate-set-parameters, e.g. ``set_parameters(src, max_bandwidth=1 << 20)`` (bytes/s)."""
    machine.qmp("migrate-set-parameters", **_dashed(params))


def start_incoming(dst: RamMachine, uri: str) -> None:
    """migrate-incoming on a machine started with ``incoming=True``."""
    dst.qmp("migrate-incoming", uri=uri)


def start_migrate(src: RamMachine, uri: str) -> None:
    src.qmp("migrate", uri=uri)


def start_postcopy(src: RamMachine) -> None:
    """migrate-start-postcopy: switches only if it arrives while precopy is still running."""
    src.qmp("migrate-start-postcopy")


def query(machine: RamMachine, timeout: float | None = None) -> dict[str, Any]:
    return machine.qmp("query-migrate", timeout=timeout)


def wait_status(machine: RamMachine, statuses: set[str], timeout: float = MIGRATE_TIMEOUT) -> dict[str, Any]:
    """Poll query-migrate until its status is one of ``statuses``; return that reply.

    "failed" (unless awaited) raises MigrationFailed with QEMU's error-desc; a timeout raises StallError
    naming the statuses awaited and the last status seen (or why query-migrate itself got no answer).
    """
    deadline = time.monotonic() + timeout
    last = ["no reply yet"]

    def probe() -> dict[str, Any]:
        # each query is bounded by what is left of the wait: a stuck destination does not answer QMP at all
        budget = max(0.1, min(machine.qmp_timeout, deadline - time.monotonic()))
        try:
            reply = query(machine, timeout=budget)
        except StallError as exc:  # a destination held in a userfault answers QMP late: not yet
            last[0] = str(exc)
            raise
        last[0] = f"status {reply.get('status', 'none')!r}"
        return reply

    def done(reply: dict[str, Any]) -> bool:
        return reply.get("status") in statuses or reply.get("status") == "failed"

    try:
        reply = wait_for(probe, done, what=f"{machine.name}: migration status in {sorted(statuses)}",
                         timeout=timeout, interval=0.01, max_interval=0.1, retry_on=(StallError,), alive=machine.gone)
    except StallError:
        raise StallError(f"{machine.name}: migration status not in {sorted(statuses)} after {timeout:g} s; "
                         f"last seen: {last[0]}") from None
    if reply.get("status") == "failed" and "failed" not in statuses:
        raise MigrationFailed(f"{machine.name}: migration failed: {reply.get('error-desc', '(no error-desc)')}")
    return reply


# -- the destination's nohugepage window ---------------------------------------------------------------------

SYS_IOCTL = 16  # x86_64 syscall numbers, as /proc/TID/syscall reports them
SYS_USERFAULTFD = 323
USERFAULTFD_IOC_NEW = 0xAA00  # _IO(0xAA, 0x00)
O_NONBLOCK = 0o4000  # QEMU's registration-time uffd is non-blocking; its probes are not
THP_UFFD = frozenset({"hg", "nh", "um", "uw"})  # the VmFlags this module talks about


def uffd_open_mode(machine: RamMachine) -> Literal["syscall", "dev"]:
    """How this QEMU creates userfaultfds: QEMU >= 8.1 opens /dev/userfaultfd once (at its first probe) and
    keeps it to ioctl(USERFAULTFD_IOC_NEW) every later uffd; older ones, or when the device is unusable, call
    userfaultfd(2). Only meaningful after the first probe (migrate-set-capabilities postcopy-ram on a destination).
    """
    fd_dir = Path(f"/proc/{machine.pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == "/dev/userfaultfd":
                return "dev"
    return "syscall"


class HoldUffdRegistration:
    """Hold a postcopy destination inside its "nohugepage window" until released.

    At the postcopy switch QEMU's destination does MADV_NOHUGEPAGE on its RAM, discards the pages not received,
    creates its userfaultfd and only then UFFDIO_REGISTERs (QEMU 7.2: ~2 ms in all). There is no QMP pause point
    in there, so strace holds the thread at the entry of the uffd creation (``delay_enter``) until ``release()``
    (strace then detaches; the call proceeds) or until ``hold`` seconds pass. Meanwhile RAM is ``nh`` and not
    ``um``: the window is open. The destination's main thread is the one held, so its QMP and qtest do not
    answer during the window: observe it through /proc.

    Which call is held: the first uffd creation *after* strace attaches (``when=1``; strace counts per thread).
    A postcopy destination creates uffds at three points: the capability probe (migrate-set-capabilities,
    2 calls on 7.2), the ADVISE probe at the start of the incoming stream (1 call) and the registration (1
    call). So attach after ADVISE: ``__enter__`` waits until the destination holds a received RAM page
    (the ADVISE precedes all RAM in the stream; the source needs some non-zero RAM, zero pages stay unmapped).
    The held call must carry O_NONBLOCK (only the registration-time uffd does): checked, else HolecheckError.

    Usage: after ``start_migrate`` (with precopy throttled)::

        with HoldUffdRegistration(dst, hold=30) as hold:
            start_postcopy(src)
            hold.wait_open()
            ...  # the window is open
        # released here; RAM becomes "um" within milliseconds
    """

    def __init__(self, dst: RamMachine, *, hold: float = 30.0, strace: str = "strace",
                 advise_timeout: float = 10.0) -> None:
        self.dst = dst
        self.hold = hold
        self.strace = strace
        self.advise_timeout = advise_timeout
        self.mode: Literal["syscall", "dev"] = "syscall"
        self.argv: list[str] = []
        self.opened_at: float | None = None  # time.monotonic() when wait_open() first saw the window
        self.released_at: float | None = None
        self.log = ""  # strace's trace (syscall mode: the userfaultfd and madvise calls, with times)
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    def __enter__(self) -> HoldUffdRegistration:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def attach(self) -> None:
        if shutil.which(self.strace) is None:
            raise SetupError(f"{self.strace} not found: holding the nohugepage window needs strace")
        dst = self.dst
        wait_for(dst.ram_rss, lambda rss: rss > 0, timeout=self.advise_timeout, alive=dst.gone,
                 what=f"{dst.name}: a received RAM page (proof that the ADVISE probe is over) before attaching strace")
        self.mode = uffd_open_mode(dst)
        delay = f"delay_enter={int(self.hold * 1e6)}:when=1"
        if self.mode == "syscall":
            filters = ["-e", "trace=userfaultfd,madvise", "-e", f"inject=userfaultfd:{delay}"]
        else:  # -P: only ioctls on /dev/userfaultfd are traced, counted and delayed (checked with strace 6.1)
            filters = ["-P", "/dev/userfaultfd", "-e", "trace=ioctl", "-e", f"inject=ioctl:{delay}"]
        self._dir = Path(tempfile.mkdtemp(prefix="holecheck-strace-"))
        self.argv = [self.strace, "-f", "-qq", "-tt", "-p", str(dst.pid), *filters, "-o", str(self._dir / "trace")]
        try:
            # strace dies with us too: a SIGKILLed or interrupted pytest must not leave it holding the destination;
            # a signal arriving meanwhile lands once self._proc is set, so release() below stops it
            with open(self._dir / "stderr", "wb") as err, terminating_signals_blocked():
                self._proc = popen_tied(self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
            wait_for(self._traced_threads, lambda n: n == -1 or n == 0, timeout=10.0,
                     what=f"strace to attach to every thread of {dst.name} (pid {dst.pid})")
            if self._proc.poll() is not None:
                raise SetupError(f"strace could not attach to {dst.name}: {self._stderr()}")
        except BaseException:
            self.release()
            raise

    def _traced_threads(self) -> int:
        """Threads of the destination not yet traced by our strace; -1 if strace is gone."""
        assert self._proc is not None
        if self._proc.poll() is not None:
            return -1
        untraced = 0
        for task in Path(f"/proc/{self.dst.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                status = (task / "status").read_text()
                if f"TracerPid:\t{self._proc.pid}\n" not in status:
                    untraced += 1
        return untraced

    def held_thread(self) -> int | None:
        """The destination thread stopped at the entry of the registration-time uffd creation, if any."""
        for task in Path(f"/proc/{self.dst.pid}/task").iterdir():
            try:
                call = (task / "syscall").read_text().split()
            except OSError:
                continue
            if len(call) < 4 or not call[0].isdigit():  # "running"
                continue
            nr, args = int(call[0]), [int(a, 16) for a in call[1:4]]
            if self.mode == "syscall" and nr == SYS_USERFAULTFD:
                flags = args[0]
            elif self.mode == "dev" and nr == SYS_IOCTL and args[1] == USERFAULTFD_IOC_NEW:
                flags = args[2]
            else:
                continue
            if not flags & O_NONBLOCK:
                raise HolecheckError(f"{self.dst.name}: strace holds a probe's uffd creation (flags {flags:#x}), "
                                     "not the registration's: attached before the ADVISE probe?")
            return int(task.name)
        return None

    def is_open(self) -> bool:
        """Held at the uffd creation, RAM madvised NOHUGEPAGE and not yet registered."""
        if self.held_thread() is None:
            return False
        flags = self.dst.ram_flags()
        return "nh" in flags and "um" not in flags

    def wait_open(self, timeout: float = 10.0) -> float:
        """Wait until the window is open; return how long that took (StallError names what was seen last)."""
        t0 = time.monotonic()

        def probe() -> tuple[bool, str]:
            if self._proc is None or self._proc.poll() is not None:
                return True, f"strace exited before the window opened: {self._stderr()}"
            try:
                held = self.held_thread()
            except HolecheckError as exc:  # holding the wrong call: waiting longer will not help
                return True, str(exc)
            flags = self.dst.ram_flags()
            seen = f"{f'thread {held} held' if held else 'no thread held'}, RAM VmFlags {sorted(flags & THP_UFFD)}"
            return held is not None and "nh" in flags and "um" not in flags, seen

        _, seen = wait_for(probe, lambda r: r[0], timeout=timeout, interval=0.005, max_interval=0.05,
                           what=f"{self.dst.name}: the nohugepage window (a thread held at its uffd creation, "
                                "RAM nh and not um)")
        if not seen.startswith("thread "):
            raise HolecheckError(seen)
        if self.opened_at is None:
            self.opened_at = time.monotonic()
        return self.opened_at - t0

    def release(self) -> None:
        """Detach strace (the held call proceeds at once) and clean up. Idempotent."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()  # strace detaches from every thread on SIGTERM
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()  # a SIGKILLed strace releases its tracees too (the kernel detaches them)
                    proc.wait()
            if self.released_at is None:
                self.released_at = time.monotonic()
            self._proc = None
        if self._dir is not None:
            with contextlib.suppress(OSError):
                self.log = (self._dir / "trace").read_text(errors="replace")
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def window_seconds(self) -> float | None:
        """From wait_open() seeing the window to release()."""
        if self.opened_at is None or self.released_at is None:
            return None
        return self.released_at - self.opened_at

    def _stderr(self) -> str:
        if self._dir is None:
            return "(no output)"
        try:
            text = (self._dir / "stderr").read_text(errors="replace").strip()
        except OSError:
            return "(no output)"
        return " | ".join(text.splitlines()[-3:]) or "(no output)"


def wait_ram_flags(machine: RamMachine, *, present: Collection[str] = (), absent: Collection[str] = (),
                   timeout: float = 10.0) -> frozenset[str]:
    """Wait until guest RAM's VmFlags include ``present`` and none of ``absent`` (e.g. snapshot armed: "uw")."""
    return wait_for(machine.ram_flags, lambda f: set(present) <= f and not (set(absent) & f), timeout=timeout,
                    alive=machine.gone,
                    interval=0.005, max_interval=0.05,  # flags flip within ms of the event; smaps reads ~1 ms
                    what=f"{machine.name}: RAM VmFlags with {sorted(present)} and without {sorted(absent)}")


# -- background snapshot -----------------------------------------------------------------------------------

# stdin → FILE at RATE bytes/s; used where pv is missing. Written for `python3 -c`.
_THROTTLE = (
    "import sys,time\n"
    "rate=int(sys.argv[1]);out=open(sys.argv[2],'wb');inp=sys.stdin.buffer;t0=time.monotonic();n=0\n"
    "while True:\n"
    "    b=inp.read1(65536)\n"
    "    if not b: break\n"
    "    out.write(b);n+=len(b);d=t0+n/rate-time.monotonic()\n"
    "    if d>0: time.sleep(d)\n"
)


def throttled_sink(path: str | Path, rate: int | None) -> str:
    """A shell command that writes stdin to ``path``, at most ``rate`` bytes/s (None: as fast as possible)."""
    target = shlex.quote(str(path))
    if rate is None:
        return f"cat > {target}"
    if shutil.which("pv"):
        return f"pv -q -L {int(rate)} > {target}"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(_THROTTLE)} {int(rate)} {target}"


def start_snapshot(src: RamMachine, path: str | Path, throttle_bytes_per_s: int | None = None) -> str:
    """Start a background snapshot of ``src`` into ``path``; returns the migrate URI.

    QEMU 7.2 ignores max-bandwidth for background snapshots, so the stream is throttled by the pipe it goes
    into. RAM is write-protected (uffd-wp, VmFlags "uw") ~20–35 ms later (``wait_ram_flags(src, present={"uw"})``)
    until the snapshot completes. Incompatible with postcopy-ram and pause-before-switchover.
    """
    set_capabilities(src, background_snapshot=True)
    uri = f"exec:{throttled_sink(path, throttle_bytes_per_s)}"
    start_migrate(src, uri)
    return uri


def start_restore(dst: RamMachine, path: str | Path) -> None:
    """Load a snapshot file into a machine started with ``incoming=True`` (same -m)."""
    set_capabilities(dst)
    start_incoming(dst, f"exec:cat {shlex.quote(str(path))}")


def restore(dst: RamMachine, path: str | Path, timeout: float = MIGRATE_TIMEOUT) -> dict[str, Any]:
    """start_restore, then wait for it to complete."""
    start_restore(dst, path)
    return wait_status(dst, {"completed"}, timeout)
