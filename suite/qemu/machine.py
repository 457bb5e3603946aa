"""A "RAM machine": a QEMU whose guest only halts, whose RAM the test reads and writes through qtest.

QEMU runs ``-machine pc`` with the halting BIOS of ``suite.qemu.bios``: guest RAM is then the single anonymous rw
mapping of exactly ``-m`` bytes in QEMU's address space, and nothing but the test (and migration) touches it.
``pc`` was chosen over ``microvm``: both start in ~0.1 s and both map RAM linearly from gpa 0 (pc.rom/pc.bios
shadow gpa 0xc0000–0xfffff, microvm's bios 0xf0000–0xfffff; tests use gpa >= 1 MiB), but ``pc`` is the machine
QEMU's own migration tests use, so postcopy and background snapshot are best trodden there.

QMP runs on ``qemu.qmp``'s async ``QMPClient`` driven synchronously on a *private* event loop per machine
(``loop.run_until_complete``). Not the legacy ``QEMUMonitorProtocol``: that shim uses the thread's shared
current loop (``get_or_create_event_loop`` also installs it), has one timeout for every command and a different
API for events. A private loop gives every command its own deadline (a destination whose main thread is stuck
in a userfault never answers, and that must become a StallError) and keeps several machines, or an asyncio-using
caller, from sharing loop state. No background thread: events carry QEMU's own timestamps, so reading them only
while we run the loop loses nothing.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qemu.qmp import QMPClient
from qemu.qmp.protocol import ConnectError, Runstate
from qemu.qmp.qmp_client import ExecuteError

from ..errors import HolecheckError, SetupError, StallError
from ..waits import wait_for
from . import binary, bios
from .process import ArgvPrefix, QemuProcess
from .qtest import QtestClient

log = logging.getLogger(__name__)

QMP_TIMEOUT = 10.0
CONNECT_NOT_YET = (OSError, ConnectError, TimeoutError)  # a QMP socket not listening yet
STARTUP_TIMEOUT = 30.0  # ~0.1 s on the host; an L2 QEMU under TCG inside an L1 VM needs ~3 s
MEM_CHUNK = 1 << 20  # /proc/PID/mem transfers: one huge read is slower (and allocates twice)

Accel = Literal["auto", "kvm", "tcg"]


class QmpError(HolecheckError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, machine: str, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{machine}: QMP {command} failed: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True)
class MachineConfig:
    mem_mib: int = 256
    accel: Accel = "auto"
    qemu: str = "qemu-system-x86_64"
    incoming: bool = False  # -incoming defer: a migration destination, started with migrate-incoming
    extra_args: tuple[str, ...] = ()
    machine: str = "pc"
    memfd: bool = False  # guest RAM a memory-backend-memfd,share=on (shmem), not anonymous memory
    mem_merge: bool = False  # QEMU's default (on) lets a host-wide ksmd merge guest RAM: only where KSM is the point


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    flags: frozenset[str]  # smaps VmFlags: "hg" (MADV_HUGEPAGE), "nh" (MADV_NOHUGEPAGE), "um"/"uw" (uffd)
    rss: int  # bytes resident
    anon_huge: int  # bytes in THPs (AnonHugePages)


@dataclass(frozen=True)
class QmpRecord:
    t: float  # time.time() when we sent or received it
    kind: Literal["command", "reply", "error", "timeout", "event"]
    msg: dict[str, Any]

    def line(self) -> str:
        return json.dumps({"t": round(self.t, 6), "kind": self.kind, "msg": self.msg}, default=str)


@dataclass
class QmpTranscript:
    """Every QMP command, reply and event of one machine, in order; written as JSON lines for artifacts."""

    records: list[QmpRecord] = field(default_factory=list)

    def add(self, kind: Literal["command", "reply", "error", "timeout", "event"], msg: dict[str, Any],
            t: float | None = None) -> None:
        self.records.append(QmpRecord(time.time() if t is None else t, kind, msg))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every event received so far (consumed or not), optionally only those called ``name``."""
        return [r.msg for r in self.records if r.kind == "event" and name in (None, r.msg.get("event"))]

    def text(self) -> str:
        return "".join(r.line() + "\n" for r in self.records)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.text())


def resolve_accel(accel: Accel) -> Literal["kvm", "tcg"]:
    """auto: kvm if /dev/kvm opens read-write, else tcg."""
    if accel in ("kvm", "tcg"):
        return accel
    if accel != "auto":
        raise SetupError(f"accel must be auto, kvm or tcg, not {accel!r}")
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return "tcg"
    return "kvm"


class RamMachine(QemuProcess):
    """One QEMU process: ``with RamMachine(cfg) as m: m.qtest.write(...); m.qmp("query-status")``."""

    stop_grace = 5.0  # after an acknowledged quit
    stop_signal = None  # a QEMU that cannot answer QMP (stuck in a userfault, SIGSTOPped) is killed at once

    def __init__(self, config: MachineConfig | None = None, *, name: str = "vm",
                 argv_prefix: ArgvPrefix | None = None, qmp_timeout: float = QMP_TIMEOUT,
                 startup_timeout: float = STARTUP_TIMEOUT, die_with_parent: bool = True) -> None:
        self.config = config or MachineConfig()
        super().__init__(name, self.config.qemu, extra_args=self.config.extra_args, argv_prefix=argv_prefix,
                         die_with_parent=die_with_parent)
        self.qmp_timeout = qmp_timeout
        self.startup_timeout = startup_timeout
        self.transcript = QmpTranscript()
        self.accel: Literal["kvm", "tcg"] = resolve_accel(self.config.accel)
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None
        self._lock = threading.Lock()  # one loop, driven by one caller at a time
        self._qtest: QtestClient | None = None
        self._events: list[dict[str, Any]] = []  # received, not yet consumed by events()/wait_event()
        self._ram: tuple[int, int] | None = None
        self._version: str = ""
        self.startup_seconds = 0.0

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> RamMachine:
        binary.check(self.config.qemu)
        t0 = time.monotonic()
        super().start()
        self.startup_seconds = time.monotonic() - t0
        log.debug("%s: QEMU %s pid %d up in %.3f s", self.name, self._version, self._pid, self.startup_seconds)
        return self

    def _base_args(self) -> list[str]:
        assert self.dir is not None
        cfg = self.config
        return [
            "-machine", cfg.machine + (",memory-backend=ram0" if cfg.memfd else "")
            + f",mem-merge={'on' if cfg.mem_merge else 'off'}",
            *(["-object", f"memory-backend-memfd,id=ram0,size={cfg.mem_mib}M,share=on"] if cfg.memfd else []),
            "-accel", self.accel, "-bios", str(bios.path()),
            "-m", str(cfg.mem_mib), "-nodefaults", "-display", "none", "-vga", "none", "-serial", "none",
            "-monitor", "none", "-pidfile", str(self.dir / "qemu.pid"),
            "-qmp", f"unix:{self.dir / 'qmp.sock'},server=on,wait=off",
            "-qtest", f"unix:{self.dir / 'qtest.sock'},server=on,wait=off",
            "-qtest-log", "none",  # else QEMU echoes every qtest request (megabytes of base64) to stderr
            *(["-incoming", "defer"] if cfg.incoming else []),
        ]

    def _post_launch(self) -> None:
        assert self.dir is not None and self._proc is not None
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(self.name)
        sock = str(self.dir / "qmp.sock")

        def probe() -> str:
            if not self.alive():
                return "exited"
            if not os.path.exists(sock):
                return "no QMP socket yet"
            self._run(self._client_or_fail().connect(sock), 2.0)
            return "connected"

        state = wait_for(probe, lambda s: s in ("exited", "connected"), retry_on=CONNECT_NOT_YET,
                         what=f"{self.name}: QEMU to answer QMP on {sock}", timeout=self.startup_timeout)
        if state == "exited":
            raise self.launch_failure()
        self._pid = int((self.dir / "qemu.pid").read_text().strip())  # written before QMP answers
        info = self.qmp("query-version")
        q = info["qemu"]
        self._version = f"{q['major']}.{q['minor']}.{q['micro']}"
        self._qtest = QtestClient(self.dir / "qtest.sock")
        self._ram = self._find_ram()

    def _ask_to_quit(self, timeout: float) -> bool:
        """quit over QMP; only a quit QEMU acknowledged is waited for."""
        if self._client is None or self._client.runstate != Runstate.RUNNING:
            return False
        try:
            self.qmp("quit", timeout=min(2.0, timeout))
        except HolecheckError:
            return False
        return True

    def _post_shutdown(self) -> None:
        if self._qtest is not None:
            self._qtest.close()
            self._qtest = None
        if self._client is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._run(self._client.disconnect(), 2.0)
        self._client = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        self._pid = None

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._pid is None:
            raise HolecheckError(f"{self.name}: not running")
        return self._pid

    @property
    def version(self) -> str:
        """QEMU's version as query-version reports it, e.g. "7.2.22"."""
        return self._version

    @property
    def version_tuple(self) -> tuple[int, int, int]:
        a, b, c = (int(x) for x in self._version.split("."))
        return a, b, c

    @property
    def qtest(self) -> QtestClient:
        if self._qtest is None:
            raise HolecheckError(f"{self.name}: not running")
        return self._qtest

    def stderr_text(self) -> str:
        """What QEMU printed, also after stop (kept as an artifact)."""
        return self.output()

    # -- QMP ------------------------------------------------------------------------------------------------

    def qmp(self, cmd: str, *, timeout: float | None = None, **args: Any) -> Any:
        """Run one QMP command within ``timeout`` s; return its 'return' value.

        Arguments go as given (QMP has both ``-`` and ``_`` names: pass ``**{"max-bandwidth": 1}``).
        Raises QmpError (error reply), StallError (no answer in time), HolecheckError (QEMU gone).
        """
        timeout = self.qmp_timeout if timeout is None else timeout
        client = self._client_or_fail()
        self.transcript.add("command", {"execute": cmd, **({"arguments": args} if args else {})})
        try:
            ret = self._run(client.execute(cmd, args or None), timeout)
        except TimeoutError:
            self.transcript.add("timeout", {"execute": cmd, "after": timeout})
            raise StallError(f"{self.name}: QMP {cmd} got no answer within {timeout:g} s") from None
        except ExecuteError as exc:
            self.transcript.add("error", dict(exc.received))
            raise QmpError(self.name, cmd, exc.error_class, exc.error.error.desc) from None
        except Exception as exc:
            if self._proc is not None and self._proc.poll() is not None:
                raise HolecheckError(f"{self.name}: QEMU exited ({self._proc.returncode}) during QMP {cmd}: "
                                     f"{self.log_tail() or '(no output)'}") from None
            raise HolecheckError(f"{self.name}: QMP {cmd} failed: {type(exc).__name__}: {exc}") from None
        self.transcript.add("reply", {"return": ret})
        return ret

    def events(self) -> list[dict[str, Any]]:
        """Events received since the last call (pumps the connection briefly first)."""
        self._pump(0.0)
        out, self._events = self._events, []
        return out

    def wait_event(self, name: str, *, timeout: float = QMP_TIMEOUT,
                   match: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The first not yet consumed event called ``name`` (and satisfying ``match``); StallError after timeout."""

        def probe() -> dict[str, Any] | None:
            self._pump(0.05)
            for i, ev in enumerate(self._events):
                if ev.get("event") == name and (match is None or match(ev)):
                    return self._events.pop(i)
            return None

        try:
            found = wait_for(probe, lambda ev: ev is not None, what=f"{self.name}: QMP event {name}",
                             timeout=timeout, interval=0.01, max_interval=0.05, alive=self.gone)
        except StallError as exc:
            seen = sorted({e.get("event", "?") for e in self._events})
            raise StallError(f"{exc} (unconsumed events: {seen or 'none'})") from None
        assert found is not None
        return found

    def _client_or_fail(self) -> QMPClient:
        if self._client is None or self._loop is None:
            raise HolecheckError(f"{self.name}: not running")
        return self._client

    def _run(self, coro: Any, timeout: float) -> Any:
        assert self._loop is not None
        with self._lock:
            try:
                return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
            finally:
                self._drain_events()

    def _pump(self, seconds: float) -> None:
        """Let the reader task run so that pending events arrive."""
        if self._client is None or self._loop is None:
            return
        # a few zero sleeps give the selector several polls even when seconds == 0
        self._run(_sleep_then(seconds), seconds + 1.0)

    def _drain_events(self) -> None:
        if self._client is None:
            return
        now = time.time()
        for ev in self._client.events.clear():
            msg = dict(ev)
            self.transcript.add("event", msg, now)
            self._events.append(msg)

    # -- guest RAM ------------------------------------------------------------------------------------------

    def ram_mapping(self) -> tuple[int, int]:
        """(start, size) of guest RAM in QEMU's address space: gpa X (>= 1 MiB) is at start + X."""
        if self._ram is None:
            self._ram = self._find_ram()
        return self._ram

    def _find_ram(self) -> tuple[int, int]:
        size = self.config.mem_mib << 20
        found = []
        with open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                memfd = len(parts) >= 6 and parts[1] == "rw-s" and parts[5].startswith("/memfd:")
                if hi - lo == size and (memfd if self.config.memfd else parts[1] == "rw-p" and parts[4] == "0"
                                        and len(parts) == 5):
                    found.append((lo, size))
        if len(found) != 1:
            raise HolecheckError(f"{self.name}: expected one anonymous rw mapping of {self.config.mem_mib} MiB "
                                 f"in /proc/{self.pid}/maps, found {len(found)}")
        return found[0]

    def ram_vmas(self) -> list[Vma]:
        """The VMAs covering guest RAM, from smaps (madvise and uffd registration can split the mapping)."""
        start, size = self.ram_mapping()
        vmas: list[Vma] = []
        cur: dict[str, int] | None = None
        with open(f"/proc/{self.pid}/smaps") as f:
            for line in f:
                head, _, rest = line.partition(" ")
                if not head.endswith(":"):  # a mapping's first line: "lo-hi perms …"
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    cur = {"lo": lo, "hi": hi} if lo < start + size and hi > start else None
                elif cur is None:
                    continue
                elif head in ("Rss:", "AnonHugePages:"):
                    cur[head] = int(rest.split()[0]) * 1024
                elif head == "VmFlags:":
                    vmas.append(Vma(cur["lo"], cur["hi"], frozenset(rest.split()), cur.get("Rss:", 0),
                                    cur.get("AnonHugePages:", 0)))
                    cur = None
        return vmas

    def ram_rss(self) -> int:
        """Resident bytes of guest RAM."""
        return sum(v.rss for v in self.ram_vmas())

    def ram_flags(self) -> frozenset[str]:
        """VmFlags shared by every VMA of guest RAM (a flag on only part of it is left out)."""
        vmas = self.ram_vmas()
        return frozenset.intersection(*(v.flags for v in vmas)) if vmas else frozenset()

    def read_ram(self, gpa: int, size: int) -> bytes:
        """Guest RAM through /proc/PID/mem: ~1 GB/s, no QEMU involvement (qtest reads ~50 MB/s).

        Reading faults untouched pages in (zero page or huge zero page), like any read would.
        Not an access QEMU sees: in a userfaultfd-registered range a missing page makes the remote read fail at
        once (SIGBUS in handle_userfault: remote GUP cannot retry) and QEMU gets no fault. Use ``qtest.read``
        (QEMU's own, bounded access) to observe what a vCPU would.
        """
        start = self._hva(gpa, size)
        out = bytearray(size)
        view = memoryview(out)
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
            for off in range(0, size, MEM_CHUNK):
                f.seek(start + off)
                want = min(MEM_CHUNK, size - off)
                if f.readinto(view[off : off + want]) != want:
                    raise HolecheckError(f"{self.name}: short read of guest RAM at gpa {gpa + off:#x}")
        return bytes(out)

    def write_ram(self, gpa: int, data: bytes) -> None:
        """Fill guest RAM through /proc/PID/mem (~0.6 GB/s; qtest writes ~25 MB/s).

        Only while no migration is running: QEMU's dirty tracking does not see these writes, so a running
        precopy would not resend the pages. Before ``migrate`` that does not matter (the first pass sends all).
        """
        start = self._hva(gpa, len(data))
        view = memoryview(data)
        with open(f"/proc/{self.pid}/mem", "r+b", buffering=0) as f:
            for off in range(0, len(data), MEM_CHUNK):
                f.seek(start + off)
                if f.write(view[off : off + MEM_CHUNK]) != len(view[off : off + MEM_CHUNK]):
                    raise HolecheckError(f"{self.name}: short write of guest RAM at gpa {gpa + off:#x}")

    def _hva(self, gpa: int, size: int) -> int:
        start, ram_size = self.ram_mapping()
        if gpa < 0 or size < 0 or gpa + size > ram_size:
            raise ValueError(f"gpa range {gpa:#x}+{size:#x} outside {self.config.mem_mib} MiB of RAM")
        return start + gpa


async def _sleep_then(seconds: float) -> None:
    for _ in range(3):
        await asyncio.sleep(0)
    if seconds > 0:
        await asyncio.sleep(seconds)
