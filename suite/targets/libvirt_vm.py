"""``--backend=libvirt``: the L1 VM as a transient libvirt domain, through libvirt-python's embedded QEMU driver.

No daemon: ``qemu:///embed?root=DIR`` runs libvirt's QEMU driver inside this process (one embed root per process,
so one per run: ``Embed``), with an event-loop thread and a private 0700 root under the run's temp dir. The domain
mirrors ``vm.QemuVm``: direct kernel boot (``<os><kernel>``), memfd shared RAM, one virtio-fs ``<filesystem>`` per
share (libvirt starts virtiofsd), the agent's virtio-serial ``<channel>`` connecting to a socket we listen on, the
console to a file, TCG or KVM, ``--qemu`` as ``<emulator>``.

QEMUs libvirt starts do not die with Python (no PR_SET_PDEATHSIG), so: every domain is transient and destroyed by
``stop()`` (also on Ctrl-C/SIGTERM, which unwind), by ``Embed.close`` at exit, and a new run first kills what a
killed run left — QEMUs (and virtiofsds) whose command line names an embed root of a holecheck process that is gone.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ..errors import SetupError, StallError
from ..qemu import binary as qemu_binary
from ..waits import wait_for
from . import vm as vmmod

log = logging.getLogger(__name__)

ROOT_PREFIX = "hclv-"  # + the owning pid + "-": how a later run tells a leftover from a live run (short: see below)
# libvirt puts QEMU's monitor socket at <root>/lib/qemu/domain-N-<name, 20 chars>/monitor.sock (52 more bytes);
# a unix socket path has 107: a root whose path would leave less goes to /tmp instead of $TMPDIR.
SOCKET_TAIL = 52 + 1

ROOT_RE = re.compile(re.escape(ROOT_PREFIX) + r"(\d+)-")
QEMU_CONF = ('user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
             'security_driver = "none"\nnamespaces = []\nstdio_handler = "file"\ncgroup_controllers = []\n')
RUN_DIR = Path("/run/libvirt")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def root_parent() -> Path:
    """Where a run's embed root goes: $TMPDIR, unless QEMU's monitor socket under it would be too long."""
    tmp = Path(tempfile.gettempdir())
    root_len = len(str(tmp)) + 1 + len(ROOT_PREFIX) + 7 + 1 + 8  # pid up to 7 digits, mkdtemp's 8 characters
    return tmp if root_len + SOCKET_TAIL <= 107 else Path("/tmp")


def libvirt_module(log_file: Path | None = None):  # type: ignore[no-untyped-def]
    """libvirt-python, or one line saying what is missing. Its log (warnings and errors; by default on stderr)
    goes to ``log_file`` when this is the first import."""
    if log_file is not None:
        os.environ.setdefault("LIBVIRT_LOG_OUTPUTS", f"3:file:{log_file}")
    try:
        import libvirt
    except ImportError:
        raise SetupError("--backend=libvirt: libvirt-python is not installed (./holecheck setup installs it)") from None
    return libvirt


def call(fn, *args):  # type: ignore[no-untyped-def]
    """A libvirt call; Ctrl-C / SIGTERM during it stays a KeyboardInterrupt (libvirt-python, whose C call returns
    with the interrupt pending, turns it into a SystemError)."""
    try:
        return fn(*args)
    except SystemError as exc:
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise


def reap_leftovers() -> list[int]:
    """Kill processes (QEMU, virtiofsd) naming the embed root of a holecheck run that is gone; remove such roots."""
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        owners = {int(m) for m in ROOT_RE.findall(cmdline)}
        if owners and not any(Path(f"/proc/{o}").exists() for o in owners):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
    for root in {p for d in (Path(tempfile.gettempdir()), Path("/tmp")) for p in d.glob(ROOT_PREFIX + "*")}:
        m = ROOT_RE.match(root.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            killed += kill_pidfiles(root)  # virtiofsd's command line does not name the root; its pid file does
            shutil.rmtree(root, ignore_errors=True)
    if killed:
        log.warning("libvirt: killed %d process(es) a killed run left behind: %s", len(killed), killed)
    return killed


def kill_pidfiles(root: Path) -> list[int]:
    """SIGKILL the QEMUs, virtiofsds and libvirtds whose pid files libvirt keeps under ``root`` (…/run/qemu)."""
    killed = []
    for pidfile in [*root.glob("run/qemu/*.pid"), *root.glob("*/run/qemu/*.pid"), *root.glob("*/run/*.pid")]:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().split()[0])
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if pid != os.getpid() and any(w in comm for w in ("virtiofsd", "qemu", "libvirtd")):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


class Embed:
    """This process's embedded libvirt QEMU driver: its root, connection and event-loop thread."""

    _current: Embed | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> Embed:
        with cls._lock:
            if cls._current is None:
                cls._current = cls()
                atexit.register(cls._current.close)
            return cls._current

    def __init__(self) -> None:
        if os.geteuid() == 0:
            import pwd
            try:
                pwd.getpwnam("libvirt-qemu")
            except KeyError:
                raise SetupError("--backend=libvirt: libvirt 9.0 needs a 'libvirt-qemu' user (./holecheck setup "
                                 "creates it)") from None
        reap_leftovers()
        # libvirt 9.0's embedded driver still makes /run/libvirt/{common,hostdevmgr}: removed at close if it did
        self.made_run_dir = not RUN_DIR.exists()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-", dir=root_parent()))  # 0700
        self.libvirt = libvirt = libvirt_module(self.dir / "libvirt.log")
        (self.dir / "etc").mkdir()
        (self.dir / "etc" / "qemu.conf").write_text(QEMU_CONF)
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions; no stderr noise
        with contextlib.suppress(libvirt.libvirtError):  # already registered by an earlier Embed: fine
            libvirt.virEventRegisterDefaultImpl()
        self._running = True
        self._loop = threading.Thread(target=self._run_loop, name="libvirt-events", daemon=True)
        self._loop.start()
        self.events: list[tuple[float, str, int, int]] = []  # (time, domain, event, detail) of lifecycle events
        try:
            self.conn = libvirt.open(f"qemu:///embed?root={self.dir}")
        except libvirt.libvirtError as exc:
            self._running = False
            shutil.rmtree(self.dir, ignore_errors=True)
            raise SetupError(f"--backend=libvirt: cannot open libvirt's embedded QEMU driver ({exc}); Debian: "
                             "apt-get install libvirt-daemon-driver-qemu") from None
        self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)

    def _run_loop(self) -> None:
        while self._running:
            with contextlib.suppress(Exception):
                self.libvirt.virEventRunDefaultImpl()

    def _on_lifecycle(self, _conn, dom, event: int, detail: int, _opaque) -> None:  # type: ignore[no-untyped-def]
        self.events.append((time.monotonic(), dom.name(), event, detail))

    def close(self) -> None:
        """Destroy every domain still running, close the connection, remove the root. Idempotent."""
        conn, self.__dict__["conn"] = self.__dict__.get("conn"), None
        if conn is not None:
            with contextlib.suppress(self.libvirt.libvirtError):
                for dom in conn.listAllDomains():
                    with contextlib.suppress(self.libvirt.libvirtError):
                        dom.destroy()
            with contextlib.suppress(self.libvirt.libvirtError):
                conn.close()
        self._running = False
        kill_pidfiles(self.dir)
        reap_leftovers_of(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.made_run_dir and {p.name for p in RUN_DIR.glob("*")} <= {"common", "hostdevmgr"}:
            shutil.rmtree(RUN_DIR, ignore_errors=True)
        with Embed._lock:
            if Embed._current is self:
                Embed._current = None


def reap_leftovers_of(root: Path) -> None:
    """SIGKILL anything still naming ``root`` (a domain libvirt failed to destroy)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                if str(root) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    os.kill(int(proc.name), signal.SIGKILL)


def domain_xml(spec: vmmod.VmSpec, name: str, channels: dict[str, Path]) -> str:
    """The transient domain for ``spec``: what ``QemuVm._base_args`` says, in libvirt's words."""
    mmio = spec.machine == "microvm"
    addr = "<address type='virtio-mmio'/>" if mmio else ""
    cpu = ("<cpu mode='host-passthrough' check='none'/>" if spec.accel == "kvm" else
           "<cpu mode='maximum' check='none'/>" if (spec.cpu or vmmod.TCG_CPU) == "max" else
           f"<cpu mode='custom' check='none'><model>{escape(spec.cpu or vmmod.TCG_CPU)}</model></cpu>")
    # writable: no <cache> (libvirt 9.0 knows only none/always): virtiofsd's default 'auto' shows host changes
    cache = {False: "<cache mode='always'/>", True: ""}
    fs = "".join(
        "<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs' queue='1024'/>"
        f"<binary path={quoteattr(vmmod.find_virtiofsd())}>{cache[s.writable]}"
        "<sandbox mode='chroot'/></binary>"
        f"<source dir={quoteattr(str(s.source))}/><target dir={quoteattr(s.tag)}/>{addr}</filesystem>"
        for s in spec.shares)
    serial = f"<controller type='virtio-serial' index='0'>{addr}</controller>" if spec.ports else ""
    chans = "".join(f"<channel type='unix'><source mode='connect' path={quoteattr(str(channels[n]))}/>"
                    f"<target type='virtio' name={quoteattr(n)}/></channel>" for n in spec.ports)
    args = ["-global", "virtio-mmio.force-legacy=false"] if mmio else []
    args += list(spec.extra_args)
    cmdline = "".join(f"<qemu:arg value={quoteattr(a)}/>" for a in args)
    return (
        f"<domain type='{'kvm' if spec.accel == 'kvm' else 'qemu'}' xmlns:qemu='{QEMU_NS}'>"
        f"<name>{escape(name)}</name><memory unit='MiB'>{spec.memory_mib}</memory><vcpu>{spec.cpus}</vcpu>"
        # nosharepages: mem-merge=off (a host-wide ksmd must not merge the L1 VM's RAM)
        "<memoryBacking><nosharepages/><source type='memfd'/><access mode='shared'/></memoryBacking>"
        f"<os><type arch='x86_64' machine={quoteattr(spec.machine)}>hvm</type>"
        f"<kernel>{escape(str(spec.kernel))}</kernel><initrd>{escape(str(spec.initrd))}</initrd>"
        f"<cmdline>{escape(spec.cmdline)}</cmdline></os>"
        f"<features>{'<acpi/>' if spec.acpi or not mmio else ''}</features>{cpu}"
        "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
        f"<devices><emulator>{escape(spec.qemu)}</emulator>"
        f"<serial type='file'><source path={quoteattr(str(spec.console_log))}/><target port='0'/></serial>"
        f"{fs}{serial}{chans}<controller type='usb' model='none'/><memballoon model='none'/></devices>"
        f"<qemu:commandline>{cmdline}</qemu:commandline></domain>")


class LibvirtVm:
    """One L1 VM as a transient domain of this run's embedded driver; same protocol as ``vm.QemuVm``."""

    def __init__(self, spec: vmmod.VmSpec) -> None:
        self.spec = spec
        self.started_at = 0.0
        self.name = f"holecheck-l1-{uuid.uuid4().hex[:8]}"
        self.dir: Path | None = None
        self.listeners: dict[str, socket.socket] = {}
        self.embed: Embed | None = None
        self.dom = None
        self.xml = ""

    def __enter__(self) -> LibvirtVm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LibvirtVm:
        try:
            qemu = shutil.which(self.spec.qemu) or self.spec.qemu  # <emulator> wants an absolute path
            self.spec = replace(self.spec, qemu=os.path.abspath(qemu))
            qemu_binary.check(self.spec.qemu)
            if os.geteuid() != 0:
                raise SetupError("sharing the host's root over virtio-fs needs root (virtiofsd --sandbox=chroot)")
            self.embed = Embed.get()
            self.dir = Path(tempfile.mkdtemp(prefix="l1-", dir=self.embed.dir))  # goes with the root, also if killed
            self.spec.console_log.parent.mkdir(parents=True, exist_ok=True)
            self.spec.console_log.write_bytes(b"")
            channels = {}
            for name in self.spec.ports:
                path = self.dir / f"port-{name}.sock"
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(str(path))
                s.listen(1)
                self.listeners[name], channels[name] = s, path
            self.xml = domain_xml(self.spec, self.name, channels)
            (self.dir / "domain.xml").write_text(self.xml)
            self.started_at = time.monotonic()
            try:
                self.dom = call(self.embed.conn.createXML, self.xml, 0)
            except self.embed.libvirt.libvirtError as exc:
                raise SetupError(f"L1 VM (libvirt): the domain did not start: {exc}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def port(self, name: str, timeout: float) -> socket.socket:
        """The host end of virtio-serial port ``name`` (QEMU connects to it as it starts)."""
        return vmmod.accept_port(self.listeners[name], name, timeout, self.problem)

    def console_tail(self, lines: int = 30) -> str:
        return vmmod.console_tail(self.spec.console_log, lines)

    def qemu_log_tail(self, lines: int = 3) -> str:
        if self.embed is None:
            return ""
        with contextlib.suppress(OSError):
            text = (self.embed.dir / "log" / "qemu" / f"{self.name}.log").read_text(errors="replace")
            return " | ".join([ln for ln in text.splitlines() if ln and not ln.startswith(("LC_", "PATH", "HOME",
                               "USER", "LOGNAME", "XDG_", "QEMU_AUDIO", "TMPDIR", "/"))][-lines:])
        return ""

    def running(self) -> bool:
        if self.dom is None or self.embed is None:
            return False
        try:
            return bool(self.dom.isActive())
        except self.embed.libvirt.libvirtError:
            return False

    def problem(self) -> str | None:
        fatal = [ln for ln in self.console_tail(200).splitlines() if vmmod.FATAL_RE.search(ln)]
        if fatal:
            return "; ".join(ln.strip() for ln in fatal[:3])
        if self.dom is not None and not self.running():
            return "the libvirt domain ended" + (f": {tail}" if (tail := self.qemu_log_tail()) else "")
        return None

    def wait_exit(self, timeout: float) -> bool:
        """Wait for the domain to end by itself (the guest powered off); True if it did."""
        try:
            wait_for(self.running, lambda up: not up, what=f"libvirt domain {self.name} to end", timeout=timeout,
                     interval=0.1)
        except StallError:
            return False
        return True

    def stop(self) -> None:
        """Destroy the domain (libvirt stops QEMU and its virtiofsds), close sockets, remove the dir. Idempotent."""
        dom, self.dom = self.dom, None
        if dom is not None and self.embed is not None:
            with contextlib.suppress(self.embed.libvirt.libvirtError):
                dom.destroy()
            with contextlib.suppress(OSError):  # QEMU's own log, beside the console (the embed root goes at exit)
                shutil.copyfile(self.embed.dir / "log" / "qemu" / f"{self.name}.log",
                                self.spec.console_log.parent / "libvirt-qemu.log")
        for s in self.listeners.values():
            s.close()
        self.listeners = {}
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
