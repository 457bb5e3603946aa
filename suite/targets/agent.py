"""The agent: runs scenarios inside an L1 VM on behalf of the host, over JSON lines on a virtio-serial port.

Guest side (started by the initramfs's /init; ``-S``: site-packages are added after the hello)::

    python -S -m suite.targets.agent /dev/virtio-ports/holecheck

It sends ``{"hello": <uname -r>, "python": <version>, "seconds": <its own start-up>}``, then answers requests

    {"id": N, "method": "run", "scenario": <Scenario JSON text>, "options": {<suite.options.RunOptions.to_wire()>}}
        → {"id": N, "verdict": <Verdict JSON text>}
    {"id": N, "method": "ping"}      → {"id": N, "pong": <guest monotonic time>}
    {"id": N, "method": "uname"}     → {"id": N, "release": …, "version": …, "machine": …}
    {"id": N, "method": "preflight"} → {"id": N, "problems": [<one line each>]}
    {"id": N, "method": "features"}  → {"id": N, "soft_dirty": bool, "shrink_underused": bool}
    {"id": N, "method": "exec", "argv": [...], "seconds": S, "cwd": D} → {"id": N, "rc": …, "stdout": …, "stderr": …, …}
        (a program the host built, e.g. a kselftest: suite.targets.program)
    {"id": N, "method": "shutdown"}  → {"id": N, "ok": true}, then the agent exits and /init ends the VM

and any failure as ``{"id": N, "error": "<one line>", "type": "<exception class>"}`` (the traceback goes to the
guest console, which the host keeps as an artifact). Start-up imports stay light (no pytest, no numpy before
the hello) because every import costs seconds under TCG.

Host side: ``AgentClient`` — every wait is bounded and its message says what was awaited and what was seen last;
a ``watch`` callback (the VM's ``problem()``) turns a kernel panic or a dead QEMU into an immediate error.
"""
from __future__ import annotations

import json
import logging
import os
import select
import sys
import time
from typing import TYPE_CHECKING

from ..errors import HelperError, HolecheckError, SetupError, StallError

if TYPE_CHECKING:  # kept out of the guest's start-up path: every import costs under TCG over virtio-fs
    import socket
    from collections.abc import Callable
    from typing import Any

log = logging.getLogger(__name__)

POLL = 0.2  # seconds between checks of the watch callback while waiting for a reply
MAX_LINE = 64 << 20


class AgentError(HolecheckError):
    """The agent answered with an error, or the channel to it failed."""


ERRORS: dict[str, type[HolecheckError]] = {
    "SetupError": SetupError, "StallError": StallError, "HelperError": HelperError,
}


# --- guest side --------------------------------------------------------------------------------------------------

class LineChannel:
    """JSON lines over a file descriptor (the virtio-serial character device)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg).encode() + b"\n"
        while data:
            data = data[os.write(self.fd, data):]

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None at end of file (the host closed its end)."""
        while b"\n" not in self.buf:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)


def _run(req: dict[str, Any]) -> dict[str, Any]:
    from .. import runner
    from ..options import RunOptions
    from ..scenario import Scenario

    verdict = runner.run(Scenario.from_json(req["scenario"]), RunOptions.from_wire(req.get("options") or {}))
    return {"verdict": verdict.to_json()}


def handle(req: dict[str, Any]) -> dict[str, Any]:
    method = req.get("method")
    if method == "ping":
        return {"pong": time.monotonic()}
    if method == "uname":
        u = os.uname()
        return {"release": u.release, "version": u.version, "machine": u.machine}
    if method == "run":
        return _run(req)
    if method == "preflight":  # what HostTarget checks on the host: root, THP, pagemap PFNs, userfaultfd
        from . import preflight

        return {"problems": preflight.host_problems()}
    if method == "features":  # what tests ask of the kernel under test, answered by that kernel
        from . import preflight

        return preflight.local_features()
    if method == "exec":
        from .program import execute

        return execute([str(a) for a in req["argv"]], float(req["seconds"]), req.get("cwd")).to_wire()
    if method == "shutdown":
        return {"ok": True}
    raise ValueError(f"unknown method {method!r}")


def process_age() -> float:
    """Seconds since this process started (its interpreter start-up included)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _print_exc() -> None:
    import traceback

    traceback.print_exc()


def serve(device: str) -> int:
    return serve_fd(os.open(device, os.O_RDWR | os.O_NOCTTY))


def serve_fd(fd: int) -> int:
    """Hello, then answer requests on ``fd`` until the host closes it or asks for a shutdown."""
    chan = LineChannel(fd)
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    chan.send({"hello": os.uname().release, "python": sys.version.split()[0], "uptime": uptime,
               "agent_startup": round(process_age(), 3)})
    # Warm up while the host prepares its first request. /init starts us with -S (no site: its .pth scan and
    # the editable-install finder cost seconds under TCG), so the venv's site-packages come in only now.
    try:
        if sys.flags.no_site:
            import site

            site.main()
        from .. import runner  # noqa: F401
    except Exception:
        _print_exc()
    while True:
        try:
            req = chan.receive()
        except ValueError as exc:  # a garbled line: say so, keep serving
            chan.send({"id": None, "error": f"garbled request: {exc}", "type": "ValueError"})
            continue
        if req is None:
            return 0
        rid = req.get("id")
        try:
            reply = handle(req)
        except Exception as exc:
            _print_exc()
            one_line = " ".join(str(exc).split()) or type(exc).__name__
            reply = {"error": one_line, "type": type(exc).__name__}
        chan.send({"id": rid, **reply})
        if req.get("method") == "shutdown":
            os.sync()
            return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m suite.targets.agent DEVICE", file=sys.stderr)
        return 2
    level = os.environ.get("HOLECHECK_AGENT_LOG", "WARNING").upper()
    logging.basicConfig(level=level, stream=sys.stderr, format="agent %(levelname)s %(name)s: %(message)s")
    return serve(args[0])


# --- host side ---------------------------------------------------------------------------------------------------

class AgentClient:
    """The host end of the agent's channel. ``watch()`` returns a reason the guest can no longer answer
    (checked every POLL s while waiting), so a panic fails a call at once instead of at its timeout."""

    def __init__(self, sock: socket.socket, watch: Callable[[], str | None] | None = None) -> None:
        self.sock = sock
        self.watch = watch or (lambda: None)
        self.buf = b""
        self.next_id = 1
        self.last_seen = "nothing yet"

    def _read_message(self, what: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if problem := self.watch():
                raise AgentError(f"while waiting for {what}: {problem}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise StallError(f"timed out after {timeout:g} s waiting for {what}; last seen: {self.last_seen}")
            ready, _, _ = select.select([self.sock], [], [], min(POLL, left))
            if not ready:
                continue
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                problem = self.watch()
                raise AgentError(f"agent channel closed while waiting for {what}" + (f": {problem}" if problem else ""))
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise AgentError(f"agent sent over {MAX_LINE} bytes without a newline while waiting for {what}")
        line, _, self.buf = self.buf.partition(b"\n")
        self.last_seen = line[:200].decode(errors="replace")
        try:
            msg: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            raise AgentError(f"garbled line from the agent while waiting for {what}: {self.last_seen!r}") from None
        return msg

    def hello(self, timeout: float) -> dict[str, Any]:
        """The agent's first message (it is sent once the guest has booted and python started)."""
        msg = self._read_message("the agent's hello (kernel boot + /init + python start-up)", timeout)
        if "hello" not in msg:
            raise AgentError(f"agent's first message is not a hello: {self.last_seen}")
        return msg

    def call(self, method: str, timeout: float, **params: Any) -> dict[str, Any]:
        rid, self.next_id = self.next_id, self.next_id + 1
        data = json.dumps({"id": rid, "method": method, **params}).encode() + b"\n"
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise AgentError(f"cannot send '{method}' to the agent: {exc}") from None
        while True:
            msg = self._read_message(f"the agent's reply to '{method}' (id {rid})", timeout)
            if msg.get("id") == rid:
                break
            log.warning("agent: dropping a reply to an earlier request: %s", self.last_seen)
        if "error" in msg:
            cls = ERRORS.get(str(msg.get("type")), AgentError)
            raise cls(f"in the guest: {msg['error']}")
        return msg

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":
    sys.exit(main())
