"""L1 VM lifecycle: boot a kernel under test with the host's root shared over virtio-fs and named
virtio-serial ports, watch its console, and stop everything it started.

``VmSpec`` says what to boot; a backend turns it into a running VM behind the ``Vm`` protocol. ``QemuVm`` runs
QEMU directly (plus one virtiofsd per share); ``libvirt_vm.LibvirtVm`` (``--backend=libvirt``) the same as a
transient libvirt domain (memfd memory backing, virtiofs ``<filesystem>``, ``<channel type='unix'>``).

``QemuVm`` is a ``qemu_process.QemuProcess``: every child process and file lives in a private 0700 temporary
directory and is removed by ``stop()``, which also runs on exceptions and Ctrl-C (use the VM as a context
manager). Children get PR_SET_PDEATHSIG, so even a SIGKILLed pytest leaves no QEMU behind.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import SetupError, StallError
from ..qemu import binary as qemu_binary
from ..qemu.process import QemuProcess
from ..waits import wait_for

log = logging.getLogger(__name__)

VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/bin/virtiofsd")
# Console lines that end a boot for good: report them instead of waiting for a timeout.
FATAL_RE = re.compile(r"Kernel panic - not syncing|Attempted to kill init|"
                      r"holecheck-init: (\[[\d.]+\] )?(FAILED|agent exited)")
# TCG's default qemu64 lacks SSSE3/SSE4.2, which numpy's x86-64 baseline needs (SIGILL in the agent).
TCG_CPU = os.environ.get("HOLECHECK_TCG_CPU", "max")


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts with ``mount -t virtiofs TAG``."""

    tag: str
    source: Path
    writable: bool = False


@dataclass(frozen=True)
class VmSpec:
    kernel: Path  # -kernel: a PVH vmlinux (microvm) or a bzImage (pc)
    initrd: Path
    cmdline: str
    console_log: Path
    machine: str = "microvm"  # "microvm" or "pc"
    acpi: bool = True  # microvm without ACPI names its virtio-mmio devices on the kernel command line
    accel: str = "tcg"  # "tcg" or "kvm" (see choose_accel)
    memory_mib: int = 2560  # room for the L2 RAM machines the scenarios start
    cpus: int = 1
    shares: tuple[Share, ...] = ()
    ports: tuple[str, ...] = ("holecheck",)  # virtio-serial port names; the host side is a stream socket each
    qemu: str = "qemu-system-x86_64"
    cpu: str = ""  # -cpu model; "" picks host (KVM) or TCG_CPU
    extra_args: tuple[str, ...] = field(default=())


class Vm(Protocol):
    """What the rest of holecheck needs from an L1 VM, whatever starts it."""

    spec: VmSpec
    started_at: float  # time.monotonic() when the VM was started

    def start(self) -> Vm: ...

    def port(self, name: str, timeout: float) -> socket.socket: ...

    def problem(self) -> str | None:
        """Why this VM will never answer (QEMU exited, kernel panic, init failed), or None while it may."""
        ...

    def console_tail(self, lines: int = 30) -> str: ...

    def wait_exit(self, timeout: float) -> bool:
        """Wait for the VM to end by itself (the guest reset after its agent exited); True if it did."""
        ...

    def stop(self) -> None: ...


# --- choices made at run time ------------------------------------------------------------------------------------

def hardware_virtualization() -> bool:
    """A /dev/kvm backed by VT-x/AMD-V (not, e.g., PVM, which cannot boot stock kernels)."""
    if not Path("/dev/kvm").exists():
        return False
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    if {"vmx", "svm"} & set(flags.split()):
        return True
    return any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))


def choose_accel(requested: str = "auto") -> str:
    """'kvm' or 'tcg'. auto: KVM only on hardware virtualization, else TCG (slow but boots any kernel)."""
    if requested in ("kvm", "tcg"):
        if requested == "kvm" and not hardware_virtualization():
            log.warning("--accel=kvm without VT-x/AMD-V (kvm_intel/kvm_amd): stock kernels may not boot")
        return requested
    if hardware_virtualization():
        return "kvm"
    log.warning("no hardware virtualization (/dev/kvm %s, no vmx/svm): L1 VMs run under TCG, ~10x slower",
                "present but not VT-x/AMD-V" if Path("/dev/kvm").exists() else "missing")
    return "tcg"


def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz, from /proc/cpuinfo's 'cpu MHz'."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("cpu MHz"))
        return int(float(line.split(":")[1]) * 1000)
    return None


def base_cmdline(machine: str, accel: str) -> list[str]:
    """Kernel parameters every holecheck boot wants."""
    args = ["console=ttyS0", "panic=-1", "loglevel=4", "rdinit=/init", "mitigations=off", "nokaslr",
            "random.trust_cpu=on", "i8042.noaux", "i8042.nokbd", "i8042.nopnp",
            "cryptomgr.notests"]  # crypto self-tests: ~0.5 s of a TCG boot, nothing holecheck relies on
    if machine == "microvm" and accel == "tcg" and (khz := host_tsc_khz()):
        # Under TCG microvm, 1 boot in 3 hangs calibrating the TSC against a PIT it lacks.
        args.append(f"tsc_early_khz={khz}")
    return args


def find_virtiofsd() -> str:
    for cand in [os.environ.get("HOLECHECK_VIRTIOFSD", ""), *VIRTIOFSD_CANDIDATES, shutil.which("virtiofsd") or ""]:
        if cand and os.access(cand, os.X_OK):
            return cand
    raise SetupError("virtiofsd not found (Debian: qemu-system-common ships /usr/lib/qemu/virtiofsd)")


def accept_port(listener: socket.socket, name: str, timeout: float, problem: Callable[[], str | None]) -> socket.socket:
    """QEMU's connection to the listening host end of port ``name`` (both backends); a VM that died meanwhile
    (``problem()`` says how) or never connects is a SetupError."""
    listener.settimeout(0.2)  # each attempt blocks this long in accept(), so no sleep between attempts

    def attempt() -> socket.socket | str | None:
        """The connection, or why the VM cannot connect any more (a string), or None: not yet."""
        if what := problem():
            return what
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return None
        conn.settimeout(None)
        return conn

    try:
        got = wait_for(attempt, lambda v: v is not None, what=f"QEMU to connect to the L1 VM's port {name}",
                       timeout=timeout, interval=0, max_interval=0)
    except StallError as exc:
        raise SetupError(f"L1 VM: {exc}") from None
    if isinstance(got, str):
        raise SetupError(f"L1 VM: {got}")
    return got


def console_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a console log (its last 64 KiB read)."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
    return ""


# --- the QEMU backend -------------------------------------------------------------------------------------------

class QemuVm(QemuProcess):
    """QEMU started directly, with one virtiofsd per share."""

    def __init__(self, spec: VmSpec) -> None:
        super().__init__("l1", spec.qemu, extra_args=spec.extra_args)
        self.spec = spec
        self.listeners: dict[str, socket.socket] = {}
        self._fs_sockets: dict[str, Path] = {}
        self._port_sockets: dict[str, Path] = {}

    def _pre_launch(self) -> None:
        qemu_binary.check(self.spec.qemu)  # one line for a missing, old or wrong binary, before any daemon starts
        self.spec.console_log.parent.mkdir(parents=True, exist_ok=True)
        self.spec.console_log.write_bytes(b"")
        self._fs_sockets = {share.tag: self._start_virtiofsd(share) for share in self.spec.shares}
        self._port_sockets = {name: self._listen(name) for name in self.spec.ports}

    def _post_shutdown(self) -> None:
        for s in self.listeners.values():
            s.close()

    def _start_virtiofsd(self, share: Share) -> Path:
        if os.geteuid() != 0:
            raise SetupError("sharing the host's root over virtio-fs needs root (virtiofsd --sandbox=chroot)")
        assert self.dir is not None
        sock = self.dir / f"fs-{share.tag}.sock"
        argv = [find_virtiofsd(), f"--socket-path={sock}", "-o", f"source={share.source}", "-o", "sandbox=chroot",
                # read-only root: the guest may cache everything; the writable share must show host-side changes
                "-o", "cache=always" if not share.writable else "cache=auto"]
        proc = self.spawn_helper(f"virtiofsd[{share.tag}]", argv, f"virtiofsd-{share.tag}.log")

        def probe() -> str:
            if proc.poll() is not None:
                raise SetupError(f"virtiofsd for {share.source} exited with status {proc.returncode}: "
                                 + self.log_tail(3, f"virtiofsd-{share.tag}.log"))
            return "socket ready" if sock.exists() else "no socket yet"

        wait_for(probe, lambda s: s == "socket ready", what=f"virtiofsd's socket {sock.name}", timeout=10)
        return sock

    def _listen(self, name: str) -> Path:
        assert self.dir is not None
        path = self.dir / f"port-{name}.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(1)
        self.listeners[name] = s
        return path

    def _base_args(self) -> list[str]:
        s = self.spec
        fs_sockets, port_sockets = self._fs_sockets, self._port_sockets
        mmio = s.machine == "microvm"
        acpi = "" if s.acpi or not mmio else ",acpi=off"
        # mem-merge=off: QEMU's default madvises guest RAM MERGEABLE, for a host-wide ksmd to merge
        argv = ["-M", f"{s.machine},memory-backend=mem{acpi},mem-merge=off", "-accel", s.accel,
                "-m", f"{s.memory_mib}M", "-smp", str(s.cpus),
                # virtio-fs needs guest RAM that virtiofsd can map: a shared memfd
                "-object", f"memory-backend-memfd,id=mem,size={s.memory_mib}M,share=on",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-chardev", f"file,id=con,path={s.console_log}", "-serial", "chardev:con",
                "-kernel", str(s.kernel), "-initrd", str(s.initrd), "-append", s.cmdline]
        argv += ["-cpu", s.cpu or ("host" if s.accel == "kvm" else TCG_CPU)]
        if mmio:
            argv += ["-global", "virtio-mmio.force-legacy=false"]
        for i, share in enumerate(s.shares):
            argv += ["-chardev", f"socket,id=fs{i},path={fs_sockets[share.tag]}",
                     "-device", f"vhost-user-fs-{'device' if mmio else 'pci'},chardev=fs{i},tag={share.tag}"]
        if s.ports:
            argv += ["-device", "virtio-serial-device" if mmio else "virtio-serial-pci"]
        for i, name in enumerate(s.ports):
            argv += ["-chardev", f"socket,id=port{i},path={port_sockets[name]}",
                     "-device", f"virtserialport,chardev=port{i},name={name}"]
        return argv

    def port(self, name: str, timeout: float) -> socket.socket:
        """The host end of virtio-serial port ``name`` (QEMU connects to it as it starts)."""
        return accept_port(self.listeners[name], name, timeout, self.problem)

    def console_tail(self, lines: int = 30) -> str:
        return console_tail(self.spec.console_log, lines)

    def problem(self) -> str | None:
        console = self.console_tail(200)
        fatal = [ln for ln in console.splitlines() if FATAL_RE.search(ln)]
        if fatal:
            return "; ".join(ln.strip() for ln in fatal[:3])
        if (rc := self.exitcode()) is not None:
            return f"QEMU exited with status {rc}" + (f": {tail}" if (tail := self.log_tail(3)) else "")
        return self.helper_problem()

    def wait_exit(self, timeout: float) -> bool:
        """Wait for QEMU to exit by itself (the guest powered off); True if it did."""
        if self._proc is None:
            return True
        try:
            self._proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

