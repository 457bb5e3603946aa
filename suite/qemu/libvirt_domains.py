"""RAM machines as libvirt domains, for the libvirt-managed postcopy family (``qemu.libvirt_postcopy``).

The source runs in this process's embedded driver (``targets.libvirt_vm.Embed``); two embedded drivers cannot
migrate to each other, so the destination is a ``libvirtd`` of our own (``DestinationDaemon``) in a private mount
namespace: its ``/etc/libvirt``, ``/var/{lib,cache,log}/libvirt`` and ``/run/libvirt`` are new and ours; its
socket, pid files and logs live in a 0700 dir inside the embed root — nothing of the host's libvirt is read or
written, and a run killed with SIGKILL leaves processes that name that root (``libvirt_vm.reap_leftovers`` finds them).

``DomainRamMachine`` is a ``machine.RamMachine`` whose QEMU libvirt starts: the domain XML adds a QMP and a qtest
socket of ours through ``<qemu:commandline>`` (libvirt keeps its own monitor), so the ledger, qtest reads and QMP
waits of ``qemu.postcopy_run`` work unchanged. Its ``stop()`` destroys the domain.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from qemu.qmp import QMPClient

from ..errors import SetupError
from ..procs import stop_group
from ..targets.libvirt_vm import QEMU_CONF, QEMU_NS, Embed, kill_pidfiles
from ..waits import wait_for
from . import bios
from .machine import CONNECT_NOT_YET, MachineConfig, RamMachine, resolve_accel
from .process import die_with_parent
from .qtest import QtestClient

log = logging.getLogger(__name__)

DAEMON_TIMEOUT = 30.0  # libvirtd probes QEMU's capabilities once on a new root: ~4 s, more on a busy machine
# In the daemon's own mount namespace (CLONE_NEWNS needs no kernel option; overlayfs would, and minimal kernels
# lack it): /etc and /var become tmpfs whose entries link to the host's (bound under $1/host), /var/{lib,cache,log}
# one level deeper, so libvirt's own dirs there are new, empty and ours; /run a tmpfs with $1/run as /run/libvirt.
NAMESPACE_SCRIPT = r"""set -e
links() { for e in "$1"/* "$1"/.[!.]*; do if [ -e "$e" ] || [ -L "$e" ]; then ln -s "$e" "$2/${e##*/}"; fi; done; }
mkdir -p "$1/host/etc" "$1/host/var"
mount --bind /etc "$1/host/etc" && mount --bind /var "$1/host/var"
mount -t tmpfs -o mode=0755 holecheck-etc /etc && links "$1/host/etc" /etc
mount -t tmpfs -o mode=0755 holecheck-var /var && links "$1/host/var" /var
for d in lib cache log; do rm -f "/var/$d"; mkdir "/var/$d"; links "$1/host/var/$d" "/var/$d"; done
rm -f /etc/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
mkdir /etc/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt "$1/log"
mount --bind "$1/log" /var/log/libvirt && mount --bind "$2" /var/cache/libvirt
cp "$1/qemu.conf" /etc/libvirt/qemu.conf
mount -t tmpfs -o mode=0755 holecheck-run /run && mkdir /run/libvirt && mount --bind "$1/run" /run/libvirt
exec libvirtd -f "$1/libvirtd.conf"
"""


class DestinationDaemon:
    """A private ``libvirtd`` (the migration's destination); ``with``, or ``start()`` … ``stop()``."""

    def __init__(self, embed: Embed, argv_prefix: Callable[[list[str]], list[str]] | None = None) -> None:
        self.embed = embed
        self.dir = embed.dir / f"dst-{uuid.uuid4().hex[:8]}"  # inside the embed root: reaped with it
        self.argv_prefix = argv_prefix
        # one capabilities cache for this run's daemons: QEMU's capabilities are probed once (~4 s), not per cell
        self.cache = embed.dir / "dst-cache"
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Any = None

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.dir / 'sock' / 'libvirt-sock'}"

    def __enter__(self) -> DestinationDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> DestinationDaemon:
        if not shutil.which("libvirtd") or not shutil.which("unshare"):
            raise SetupError("libvirt-managed postcopy needs libvirtd (Debian: apt-get install libvirt-daemon)")
        for sub in ("run", "sock"):
            (self.dir / sub).mkdir(parents=True, mode=0o700)
        self.cache.mkdir(mode=0o700, exist_ok=True)
        (self.dir / "qemu.conf").write_text(QEMU_CONF)
        (self.dir / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.dir / "sock"}"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n'
            f'host_uuid = "{uuid.uuid4()}"\n'  # not the source's: libvirt refuses to migrate to itself
            f'log_outputs = "3:file:{self.dir / "libvirtd.log"}"\n')
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", NAMESPACE_SCRIPT, "sh", str(self.dir),
                str(self.cache)]
        with open(self.dir / "daemon.out", "wb") as out:
            self.proc = subprocess.Popen(self.argv_prefix(argv) if self.argv_prefix else argv,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent, start_new_session=True)
        sock = self.dir / "sock" / "libvirt-sock"
        try:
            def probe() -> str:
                if self.proc is not None and self.proc.poll() is not None:
                    raise SetupError(f"libvirtd exited with status {self.proc.returncode}: " + self.output_tail())
                return "socket ready" if sock.exists() else "no socket yet"

            wait_for(probe, lambda s: s == "socket ready", what="the destination libvirtd's socket",
                     timeout=DAEMON_TIMEOUT)
            self.conn = self.embed.libvirt.open(self.uri)
        except BaseException:
            self.stop()
            raise
        return self

    def output_tail(self, lines: int = 3) -> str:
        text = ""
        for name in ("daemon.out", "libvirtd.log"):
            with contextlib.suppress(OSError):
                text += (self.dir / name).read_text(errors="replace")
        return " | ".join([ln for ln in text.splitlines() if ln.strip()][-lines:]) or "(no output)"

    def qemu_log(self, name: str) -> Path:
        return self.dir / "log" / "qemu" / f"{name}.log"

    def stop(self) -> None:
        """Destroy its domains, stop libvirtd, kill what its pid files name. Idempotent."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(self.embed.libvirt.libvirtError):
                for dom in conn.listAllDomains():
                    with contextlib.suppress(self.embed.libvirt.libvirtError):
                        dom.destroy()
                conn.close()
        if self.proc is not None:
            stop_group(self.proc, 5.0, what="destination libvirtd")
            self.proc = None
        kill_pidfiles(self.dir)


def ram_domain_xml(name: str, uid: str, config: MachineConfig, qmp: Path, qtest: Path) -> str:
    """``RamMachine``'s QEMU (pc, halting BIOS, ``-m``) as a domain; QMP and qtest sockets passed through."""
    accel = resolve_accel(config.accel)
    emulator = shutil.which(config.qemu) or config.qemu
    args = ["-qmp", f"unix:{qmp},server=on,wait=off", "-qtest", f"unix:{qtest},server=on,wait=off",
            "-qtest-log", "none", *config.extra_args]
    return (
        f"<domain type='{'kvm' if accel == 'kvm' else 'qemu'}' xmlns:qemu='{QEMU_NS}'>"
        f"<name>{escape(name)}</name><uuid>{uid}</uuid>"
        f"<memory unit='MiB'>{config.mem_mib}</memory><vcpu>1</vcpu>"
        f"{'' if config.mem_merge else '<memoryBacking><nosharepages/></memoryBacking>'}"  # mem-merge=off
        f"<os><type arch='x86_64' machine={quoteattr(config.machine)}>hvm</type>"
        f"<loader type='rom'>{escape(str(bios.path()))}</loader></os>"
        "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
        f"<devices><emulator>{escape(os.path.abspath(emulator))}</emulator>"
        "<controller type='usb' model='none'/><memballoon model='none'/></devices>"
        "<qemu:commandline>" + "".join(f"<qemu:arg value={quoteattr(a)}/>" for a in args)
        + "</qemu:commandline></domain>")


def qemu_pid_naming(path: Path) -> int | None:
    """The QEMU whose command line names ``path`` (libvirt's QEMUs are not our children)."""
    needle = str(path).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes()
                if needle in cmd and b"qemu-system" in cmd.split(b"\0", 1)[0]:
                    return int(proc.name)
    return None


class DomainRamMachine(RamMachine):
    """A RAM machine whose QEMU a libvirt connection starts (``launch``) or a migration creates (``attach``)."""

    def __init__(self, config: MachineConfig, *, name: str, dom_name: str, dom_uuid: str, workdir: Path,
                 conn_of: Callable[[], Any], log_path: Callable[[], Path]) -> None:
        super().__init__(config, name=name)
        self.dom_name, self.dom_uuid = dom_name, dom_uuid
        self.conn_of, self.log_path = conn_of, log_path
        self.dir = workdir / name
        self.dir.mkdir(mode=0o700)
        self._launched = True
        self.xml = ram_domain_xml(dom_name, dom_uuid, config, self.dir / "qmp.sock", self.dir / "qtest.sock")

    def start(self) -> DomainRamMachine:  # type: ignore[override]
        raise SetupError(f"{self.name}: a domain RAM machine is started by launch() or a migration (attach())")

    def launch(self) -> DomainRamMachine:
        """Create the (transient) domain, then attach."""
        libvirt = Embed.get().libvirt
        try:
            self.conn_of().createXML(self.xml, 0)
        except libvirt.libvirtError as exc:
            raise SetupError(f"{self.name}: libvirt did not start the RAM machine: {exc}") from None
        return self.attach(self.startup_timeout)

    def attach(self, timeout: float) -> DomainRamMachine:
        """Connect QMP and qtest to the domain's QEMU once it runs (libvirt started it)."""
        assert self.dir is not None
        sock = self.dir / "qmp.sock"
        self.started_at = time.monotonic()
        self._pid = wait_for(lambda: qemu_pid_naming(sock), lambda p: p is not None,
                             what=f"{self.name}: libvirt's QEMU (its command line naming {sock})", timeout=timeout)
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(self.name)

        def probe() -> str:
            if not self.alive():
                return "exited"
            if not sock.exists():
                return "no QMP socket yet"
            self._run(self._client_or_fail().connect(str(sock)), 2.0)
            return "connected"

        state = wait_for(probe, lambda s: s in ("exited", "connected"), what=f"{self.name}: QEMU to answer QMP",
                         timeout=timeout, retry_on=CONNECT_NOT_YET)
        if state == "exited":
            raise SetupError(f"{self.name}: libvirt's QEMU exited: {self.log_tail(3)}")
        q = self.qmp("query-version")["qemu"]
        self._version = f"{q['major']}.{q['minor']}.{q['micro']}"
        self._qtest = QtestClient(self.dir / "qtest.sock")
        self._ram = self._find_ram()
        return self

    def domain(self) -> Any:
        with contextlib.suppress(Exception):
            return self.conn_of().lookupByUUIDString(self.dom_uuid)
        return None

    def alive(self) -> bool:
        return self._pid is not None and Path(f"/proc/{self._pid}").exists()

    def exitcode(self) -> int | None:
        return None

    def _read_output(self, log_name: str = "qemu.log") -> str:
        with contextlib.suppress(OSError):
            return self.log_path().read_text(errors="replace")
        return ""

    def stop(self, timeout: float | None = None) -> None:
        """Close our QMP/qtest clients, destroy the domain (if still ours), kill its QEMU if it lingers."""
        if self.dir is None:
            return
        self._output_final = self._read_output()
        pid = self._pid
        self._post_shutdown()
        if (dom := self.domain()) is not None:
            with contextlib.suppress(Exception):
                dom.destroy()
        if pid is not None and Path(f"/proc/{pid}").exists() and qemu_pid_naming(self.dir / "qmp.sock") == pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        self.dir = None

