"""A client for QEMU's qtest protocol: the test reads and writes guest-physical memory itself.

QEMU serves it on ``-qtest unix:PATH,server=on,wait=off``: one line per request, one ``OK …``/``FAIL …``
line per answer, plus asynchronous ``IRQ …`` lines (only with irq_intercept; skipped anyway). Every request
has a deadline: a read of a guest page that sits in a userfaultfd-registered range nobody resolves blocks
QEMU's main thread forever, and that must surface as a StallError naming the address, not as a hung test.
After a timeout the late answer may still arrive; it is counted and skipped before the next request's answer,
so the client stays usable (e.g. to see that the read returned once the migration completed).
"""
from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

from ..errors import HolecheckError, StallError

CHUNK = 1 << 20  # bytes per b64read/b64write command: bounds one answer line (~1.4 MB of base64)
DEFAULT_TIMEOUT = 10.0


class QtestError(HolecheckError):
    """QEMU answered a qtest request with FAIL, or the connection broke."""


class QtestClient:
    """Guest-physical memory access over one qtest connection. ``timeout`` bounds each request: a transfer
    larger than CHUNK is several requests, each with its own deadline (override per call with ``timeout=``)."""

    def __init__(self, path: str | Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise QtestError(f"cannot connect to the qtest socket {self.path}: {exc}") from None
        self._buf = bytearray()
        self._broken = ""  # why the stream can no longer be used (a request was cut off mid-line)
        self._unanswered: list[str] = []  # requests whose answer we gave up waiting for; it still comes, in order

    # -- memory commands --------------------------------------------------------------------------------

    def memset(self, addr: int, size: int, byte: int, *, timeout: float | None = None) -> None:
        _check_range(addr, size)
        if not 0 <= byte <= 0xFF:
            raise ValueError(f"memset byte {byte:#x} out of range")
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            what = f"qtest memset of gpa {addr + off:#x} ({n} bytes)"
            self._command(f"memset {addr + off:#x} {n:#x} {byte:#x}", what, timeout)

    def write(self, addr: int, data: bytes, *, timeout: float | None = None) -> None:
        _check_range(addr, len(data))
        view = memoryview(data)
        for off in range(0, len(data), CHUNK):
            chunk = view[off : off + CHUNK]
            b64 = base64.b64encode(chunk).decode()
            self._command(f"b64write {addr + off:#x} {len(chunk):#x} {b64}",
                          f"qtest write of gpa {addr + off:#x} ({len(chunk)} bytes)", timeout)

    def read(self, addr: int, size: int, *, timeout: float | None = None) -> bytes:
        _check_range(addr, size)
        out = bytearray()
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            reply = self._command(f"b64read {addr + off:#x} {n:#x}", f"qtest read of gpa {addr + off:#x} ({n} bytes)",
                                  timeout)
            data = base64.b64decode(reply)
            if len(data) != n:
                raise QtestError(f"qtest read of gpa {addr + off:#x}: asked {n} bytes, got {len(data)}")
            out += data
        return bytes(out)

    def writeq(self, addr: int, value: int, *, timeout: float | None = None) -> None:
        _check_range(addr, 8)
        self._command(f"writeq {addr:#x} {value & (2**64 - 1):#x}", f"qtest writeq of gpa {addr:#x}", timeout)

    def readq(self, addr: int, *, timeout: float | None = None) -> int:
        _check_range(addr, 8)
        return int(self._command(f"readq {addr:#x}", f"qtest readq of gpa {addr:#x}", timeout), 16)

    # -- plumbing -------------------------------------------------------------------------------------------

    @property
    def unanswered(self) -> list[str]:
        """The requests that timed out and whose late answers have not been read yet."""
        return list(self._unanswered)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QtestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _command(self, line: str, what: str, timeout: float | None) -> str:
        """Send one request, return the text after ``OK``; StallError naming ``what`` past the deadline."""
        if self._broken:
            raise QtestError(f"{what}: qtest connection unusable ({self._broken})")
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            while self._unanswered:  # answers to requests we timed out on come first
                self._answer(deadline)
                self._unanswered.pop(0)
        except OSError as exc:
            if not isinstance(exc, TimeoutError):
                raise QtestError(f"{what}: qtest connection lost ({exc})") from None
            raise StallError(f"{what} not sent: the earlier {self._unanswered[0]} is still unanswered "
                             f"{timeout:g} s later") from None
        try:
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            self._sock.sendall(line.encode() + b"\n")
        except TimeoutError:  # QEMU stopped reading mid-line: the stream cannot be resynchronised
            self._broken = f"{what} was cut off after {timeout:g} s"
            raise StallError(f"{what}: QEMU did not take the request within {timeout:g} s") from None
        except OSError as exc:
            raise QtestError(f"{what}: qtest connection lost ({exc})") from None
        try:
            answer = self._answer(deadline)
        except TimeoutError:
            self._unanswered.append(what)
            raise StallError(f"{what} got no answer within {timeout:g} s") from None
        except OSError as exc:
            raise QtestError(f"{what}: qtest connection lost ({exc})") from None
        if answer == "OK" or answer.startswith("OK "):
            return answer[3:]
        raise QtestError(f"{what}: QEMU answered {answer[:200]!r}")

    def _answer(self, deadline: float) -> str:
        while True:
            line = self._line(deadline)
            if not line.startswith("IRQ"):
                return line

    def _line(self, deadline: float) -> str:
        while (end := self._buf.find(b"\n")) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._sock.settimeout(remaining)
            data = self._sock.recv(1 << 20)
            if not data:
                raise ConnectionResetError("QEMU closed the qtest socket")
            self._buf += data
        line = bytes(self._buf[:end]).decode()
        del self._buf[: end + 1]
        return line


def _check_range(addr: int, size: int) -> None:
    # qtest g_assert()s on malformed numbers: a bad request would abort QEMU, so refuse it here
    if addr < 0 or size < 0 or addr + size > 2**64:
        raise ValueError(f"bad guest-physical range {addr:#x}+{size:#x}")
