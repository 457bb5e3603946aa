"""The userfaultfd helper: a small C program that performs userfaultfd sequences step by step.

It owns ONE anonymous region and obeys one line command at a time (``content``, ``map``, ``madvise``, ``place``,
``register``, ``wp``, ``touch``, ``verify``, ``scrub``, ``quit``; the memory axes' and RWP's blocks add
more), answering one JSON line each. Between commands it is
idle, so the caller can read its /proc/PID/pagemap and fire the THP shrinker exactly when it wants. Its
fault-handler thread resolves MISSING faults with the page's expected content (as QEMU postcopy does) and
WP faults by un-protecting the page (as QEMU's background snapshot does), RWP faults (Linux 7.3) by un-protecting
the page with UFFDIO_RWPROTECT; each reply lists the pages that faulted during that command.

The helper is C rather than Python so that every load/store is exactly the one asked for and the handler
thread runs while the main thread sits in a page fault; see the header of ``uffd_helper.c``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .cache import cache_root, full_is_setup_error, no_space
from .errors import HelperError, SetupError, StallError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("uffd_helper.c")
CFLAGS = ["-O2", "-Wall", "-Wextra", "-pthread"]
QUIT_TIMEOUT = 2.0
STDERR_KEEP = 16384  # bytes of the helper's stderr kept for error messages


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and (path := shutil.which(name)):
            return path
    raise SetupError("no C compiler (cc): apt-get install gcc")


def build(cache_dir: Path | None = None) -> Path:
    """Compile the helper once per source version; return the binary's path.

    The binary lives in ``<cache_dir or cache_root()>/bin/uffd-helper-<sha256[:12] of the source>``, so an
    edited source gets a new binary and a stale one is never run. It is compiled to a temporary name and
    renamed, so concurrent builders (pytest-xdist workers) never see a half-written file.
    """
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    bindir = (cache_dir if cache_dir is not None else cache_root()) / "bin"
    binary = bindir / f"uffd-helper-{digest}"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    cc = _compiler()
    with full_is_setup_error():
        bindir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{binary.name}.", dir=bindir)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0 and os.strerror(errno.ENOSPC) in proc.stderr:
            raise no_space()  # the linker could not write the binary into the cache
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:300])
            raise SetupError(f"compiling {SOURCE} with {cc} failed: {first}")
        if proc.stderr.strip():  # warnings: the source is meant to compile cleanly
            log.warning("uffd helper compiled with warnings:\n%s", proc.stderr)
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    log.debug("built %s", binary)
    return binary


@dataclass
class Faults:
    """Pages (indices from the region start) whose userfaultfd faults the handler resolved during a command."""

    missing: list[int]
    wp: list[int]
    rwp: list[int] = field(default_factory=list)  # RWP faults (UFFD_PAGEFAULT_FLAG_RWP)
    rwp_repeat: list[int] = field(default_factory=list)  # pages that raised more than one RWP fault

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> Faults:
        return cls(missing=list(reply.get("missing", [])), wp=list(reply.get("wp", [])),
                   rwp=list(reply.get("rwp", [])), rwp_repeat=list(reply.get("rwp_repeat", [])))


@dataclass(frozen=True)
class Mismatch:
    """A page that does not hold its expected content: its index, its first differing byte, all zero or not."""

    index: int
    first: int
    zeroed: bool


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
        return f"killed by signal {-rc}"
    return f"exited with status {rc}"


class UffdHelper:
    """One running helper process; use as a context manager so it never outlives the test.

    After a stall the helper is left running (its pagemap and stack are evidence) but refuses further
    commands, since a late reply would be taken for the next command's; ``close()`` kills it.
    """

    def __init__(self, argv_prefix: list[str] | None = None, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.addr: int | None = None
        self.size: int | None = None
        self._stdout_buf = b""
        self._stderr = bytearray()
        self._stderr_lock = threading.Lock()
        self._broken: str | None = None
        binary = build()
        argv = [*(argv_prefix or []), str(binary)]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )
        # With an "exec" prefix (cgroup entry) the helper keeps this pid; map() confirms it from the helper.
        self.pid: int = self._proc.pid
        # Drain stderr in the background: a helper blocked writing to a full stderr pipe would look like a stall.
        self._stderr_thread = threading.Thread(
            target=self._read_stderr, name=f"uffd-helper-{self.pid}-stderr", daemon=True
        )
        self._stderr_thread.start()

    @property
    def stalled(self) -> bool:
        """A command got no reply in time while the helper still runs (blocked in a fault): a kernel finding."""
        return bool(self._broken and self._broken.startswith("no reply")) and self._proc.poll() is None

    # ---- process plumbing ----

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        fd = self._proc.stderr.fileno()
        with contextlib.suppress(OSError):
            while chunk := os.read(fd, 4096):
                with self._stderr_lock:
                    self._stderr += chunk
                    del self._stderr[:-STDERR_KEEP]

    @property
    def stderr(self) -> str:
        """What the helper wrote to stderr so far (the handler thread reports failed ioctls there)."""
        with self._stderr_lock:
            return self._stderr.decode(errors="replace")

    def _stderr_suffix(self) -> str:
        text = self.stderr.strip()
        return f"; helper stderr: {text[-2000:]}" if text else ""

    def _died(self, cmd: str) -> HelperError:
        try:
            rc = self._proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            rc = None
        self._stderr_thread.join(timeout=1.0)
        self._broken = f"died during '{cmd}'"
        return HelperError(
            f"uffd helper (pid {self.pid}) died during '{cmd}': {_describe_exit(rc)}{self._stderr_suffix()}"
        )

    def _read_line(self, cmd: str, timeout: float) -> bytes:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._stdout_buf:
            left = deadline - time.monotonic()
            if left <= 0:
                if self._proc.poll() is not None:  # gone, its stdout held open elsewhere: not a stall
                    raise self._died(cmd)
                self._broken = f"no reply to '{cmd}'"
                raise StallError(
                    f"uffd helper: no reply to '{cmd}' within {timeout:g} s "
                    f"(the helper is blocked in a page fault?){self._stderr_suffix()}"
                )
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise self._died(cmd)
            self._stdout_buf += chunk
        line, _, self._stdout_buf = self._stdout_buf.partition(b"\n")
        return line

    def command(self, cmd: str, timeout: float | None = None) -> dict[str, Any]:
        """Send one protocol line and return its decoded reply; raise HelperError on ok:false."""
        if self._broken:
            raise HelperError(f"uffd helper (pid {self.pid}) is unusable ({self._broken}); cannot send '{cmd}'")
        assert self._proc.stdin is not None
        t = self.timeout if timeout is None else timeout
        log.debug("uffd helper %d <- %s", self.pid, cmd)
        try:
            self._proc.stdin.write(cmd.encode() + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # ValueError: stdin already closed
            raise self._died(cmd) from None
        line = self._read_line(cmd, t)
        try:
            reply: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError as exc:
            self._broken = f"garbled reply to '{cmd}'"
            raise HelperError(f"uffd helper: garbled reply to '{cmd}': {line[:200]!r} ({exc})") from None
        log.debug("uffd helper %d -> %s", self.pid, line[:300])
        if not reply.get("ok"):
            raise HelperError(f"uffd helper: '{cmd}' failed: {reply.get('error', 'no error given')}")
        return reply

    # ---- the protocol ----

    def map(self, size: int, timeout: float | None = None) -> int:
        """mmap a 2 MiB-aligned anonymous private region of ``size`` bytes; return its address."""
        reply = self.command(f"map {size:#x}", timeout)
        self.addr, self.size, self.pid = int(reply["addr"]), size, int(reply["pid"])
        return self.addr

    def madvise(self, advice: str, off: int, length: int, timeout: float | None = None) -> Faults:
        """advice: hugepage | nohugepage | dontneed | populate_read | mergeable. dontneed keeps the expected content."""
        return Faults.from_reply(self.command(f"madvise {advice} {off:#x} {length:#x}", timeout))

    def place(self, off: int, length: int, timeout: float | None = None) -> Faults:
        """Write each page's stamp with plain stores (faults THPs in, like a migration source's data)."""
        return Faults.from_reply(self.command(f"place {off:#x} {length:#x}", timeout))

    def register(self, modes: str, timeout: float | None = None) -> dict[str, Any]:
        """modes: missing | wp | missing,wp. Returns {"features": kernel's API features, "ioctls": range ioctls}."""
        reply = self.command(f"register {modes}", timeout)
        return {"features": int(reply["features"]), "ioctls": int(reply["ioctls"])}

    def wp(self, off: int, length: int, on: bool, timeout: float | None = None) -> Faults:
        """UFFDIO_WRITEPROTECT the range (on) or un-protect it (off)."""
        return Faults.from_reply(self.command(f"wp {off:#x} {length:#x} {int(on)}", timeout))

    def touch(self, kind: str, off: int, length: int, timeout: float | None = None) -> Faults:
        """kind: read (one byte per page) | write (each page gets its WRITTEN pattern)."""
        return Faults.from_reply(self.command(f"touch {kind} {off:#x} {length:#x}", timeout))

    def verify(self, off: int, length: int, timeout: float | None = None) -> tuple[list[int], Faults]:
        """Compare every page to what it must hold; return (mismatching page indices, faults while reading)."""
        mismatches, faults = self.check(off, length, timeout)
        return [m.index for m in mismatches], faults

    def check(self, off: int, length: int, timeout: float | None = None) -> tuple[list[Mismatch], Faults]:
        """``verify`` with each bad page's first differing byte and whether it reads all zero."""
        reply = self.command(f"verify {off:#x} {length:#x}", timeout)
        zeroed = set(reply["zeroed"])
        return ([Mismatch(i, at, i in zeroed) for i, at in zip(reply["mismatch"], reply["first"], strict=True)],
                Faults.from_reply(reply))

    def scrub(self, off: int, length: int, timeout: float | None = None) -> Faults:
        """Negative control: zero the pages behind the model's back (their expected content stays)."""
        return Faults.from_reply(self.command(f"scrub {off:#x} {length:#x}", timeout))

    # ---- memory axes (issue 11): the helper's memory-axes block ----

    def features(self, names: str, timeout: float | None = None) -> int:
        """uffd features for the next register (wp-async, wp-unpopulated, wp-shmem, minor-shmem, comma-separated,
        or none); a feature the kernel lacks fails naming it. Returns the kernel's supported-features mask."""
        return int(self.command(f"features {names or 'none'}", timeout)["supported"])

    def map_memfd(self, size: int, timeout: float | None = None) -> int:
        """Like ``map``, but a 2 MiB-aligned MAP_SHARED memfd (shmem) region."""
        reply = self.command(f"map-memfd {size:#x}", timeout)
        self.addr, self.size, self.pid = int(reply["addr"]), size, int(reply["pid"])
        return self.addr

    def zero(self, off: int, length: int, timeout: float | None = None) -> Faults:
        """Store zeros into the pages (written, and zero-filled)."""
        return Faults.from_reply(self.command(f"zero {off:#x} {length:#x}", timeout))

    def rewrite(self, off: int, length: int, timeout: float | None = None) -> Faults:
        """Store every page's expected content again (it reads soft-dirty / written afterwards)."""
        return Faults.from_reply(self.command(f"rewrite {off:#x} {length:#x}", timeout))

    def collapse(self, off: int, length: int, timeout: float | None = None) -> Faults:
        return Faults.from_reply(self.command(f"collapse {off:#x} {length:#x}", timeout))

    def scan(self, off: int, length: int, clear: bool, timeout: float | None = None) -> tuple[list[int], Faults]:
        """PAGEMAP_SCAN: the pages reading PAGE_IS_WRITTEN; ``clear`` write-protects them (uffd WP_ASYNC)."""
        reply = self.command(f"scan {off:#x} {length:#x} {int(clear)}", timeout)
        return list(reply["written"]), Faults.from_reply(reply)

    def content(self, kind: str, timeout: float | None = None) -> None:
        """'same': every page's stamp the same bytes (KSM merges data pages); 'unique' (default): its own;
        'sparse': one non-zero byte per page (``suite.content``)."""
        self.command(f"content {kind}", timeout)

    # ---- RWP (Linux 7.3): the helper's RWP block ----

    def rwp(self, off: int, length: int, on: bool, timeout: float | None = None) -> Faults:
        """UFFDIO_RWPROTECT the range (on: present pages become inaccessible) or un-protect it (off)."""
        return Faults.from_reply(self.command(f"rwp {off:#x} {length:#x} {int(on)}", timeout))

    def set_mode(self, mode: str, timeout: float | None = None) -> Faults:
        """UFFDIO_SET_MODE: 'async' enables UFFD_FEATURE_RWP_ASYNC, 'sync' disables it."""
        return Faults.from_reply(self.command(f"set-mode {mode}", timeout))

    def scan_accessed(self, off: int, length: int, cold: bool,
                      timeout: float | None = None) -> tuple[list[int], Faults]:
        """PAGEMAP_SCAN PAGE_IS_ACCESSED: the pages accessed since protection (hot), or, ``cold``, the resident
        pages not accessed (the category inverted)."""
        reply = self.command(f"scan-accessed {off:#x} {length:#x} {int(cold)}", timeout)
        return list(reply["pages"]), Faults.from_reply(reply)

    def scan_huge(self, off: int, length: int, timeout: float | None = None) -> list[int]:
        """PAGEMAP_SCAN PAGE_IS_HUGE: the pages mapped by a PMD now."""
        return list(self.command(f"scan-huge {off:#x} {length:#x}", timeout)["pages"])

    def minor_faults(self, timeout: float | None = None) -> int:
        """MINOR faults resolved with UFFDIO_CONTINUE so far (``register("minor")`` on memfd)."""
        return int(self.command("minor-faults", timeout)["minor"])

    # ---- lifetime ----

    def close(self) -> None:
        """Ask the helper to quit, kill it if it doesn't within QUIT_TIMEOUT s, and reap it. Idempotent."""
        proc = self._proc
        if proc.poll() is None and not self._broken:
            with contextlib.suppress(OSError, ValueError, HelperError, StallError):
                self.command("quit", timeout=QUIT_TIMEOUT)
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=QUIT_TIMEOUT if not self._broken else 0)
        if proc.poll() is None:
            proc.kill()  # SIGKILL also ends a helper stuck in a fault or stopped
            proc.wait()
        self._broken = self._broken or "closed"
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._stderr_thread.join(timeout=1.0)
        if proc.stderr is not None:
            with contextlib.suppress(OSError):
                proc.stderr.close()

    def __enter__(self) -> UffdHelper:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
