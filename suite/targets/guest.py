"""GuestTarget: scenarios run in an L1 VM booted on the kernel under test, through the agent.

Boot recipe (measured on the development machines; README "Set-up and use"): the kernel's PVH vmlinux on ``-M microvm``
(a bzImage without PVH on ``-M pc``), an initramfs with busybox and the needed modules, the host's root shared
read-only over virtio-fs, the artifacts root shared writable at the same path, and the agent on a virtio-serial
port. The guest runs this very checkout with this very venv, so the host builds what the guest cannot (the uffd
helper, into the cache the guest sees read-only) before booting.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import uffd
from ..cache import cache_root
from ..errors import HolecheckError, SetupError
from ..kernelspec import KernelSpec
from ..options import TCG_SLOWDOWN, RunOptions
from ..qemu import bios
from ..scenario import Scenario
from ..verdict import Verdict
from . import backends, vm
from .agent import AgentClient, AgentError
from .program import Ran

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]
PORT = "holecheck"
ROOT_TAG, RW_TAG = "hostroot", "artifacts"
BOOT_TIMEOUT = 60.0
CALL_TIMEOUT = 30.0
PREFLIGHT_TIMEOUT = 60.0  # the guest's first import of numpy & co. over virtio-fs, under TCG
RUN_SLACK = 120.0  # a run's bound beyond its steps' own bounds: runner start-up, memcg reclaim, pagemap reads
REAL_QEMU_SLACK = 600.0  # L2 QEMUs booted and migrated under TCG inside L1
CONSOLE_LINES = 25


@dataclass(frozen=True)
class BootOptions:
    """How the L1 VM is shaped (not part of RunOptions: defaults fit every kernel so far)."""

    memory_mib: int = 2560
    cpus: int = 1
    boot_timeout: float = BOOT_TIMEOUT
    artifacts_root: Path = Path(".holecheck")
    extra_cmdline: tuple[str, ...] = ()


def _artifacts_root(options: RunOptions, boot: BootOptions) -> Path:
    return Path(options.artifacts_root or boot.artifacts_root).resolve()


def kernel_param(name: str, value: object) -> str:
    """``NAME=value`` for the kernel command line, which init gets as its environment. A value with spaces is
    quoted (the kernel strips the quotes); quotes and newlines cannot be carried at all."""
    text = str(value)
    if re.search(r'["\n]', text):
        raise SetupError(f"{name}: {text!r} contains a quote or a newline: it cannot be passed on a kernel command "
                         "line; use a path without them")
    return f'{name}="{text}"' if re.search(r"\s", text) else f"{name}={text}"


# The guest mounts its own tmpfs (and devtmpfs) over these: host paths below them are hidden unless bound back.
GUEST_MASKED = (Path("/tmp"), Path("/run"), Path("/dev/shm"))
MAX_KEPT = 4  # HC_KEEP0..3 in images/init.sh


def hidden_paths(paths: list[Path], masked: tuple[Path, ...] = GUEST_MASKED) -> list[Path]:
    """Of ``paths`` (resolved), those the guest's own mounts would hide, minus any inside another one."""
    hidden = sorted({p for p in paths if any(p.is_relative_to(m) and p != m for m in masked)})
    return [p for p in hidden if not any(p != q and p.is_relative_to(q) for q in hidden)]


class GuestTarget:
    """An L1 VM on the kernel under test; ``run`` sends the scenario to the agent inside it."""

    def __init__(self, spec: KernelSpec, options: RunOptions, boot: BootOptions | None = None) -> None:
        from images import initramfs
        from kernels import kernel as kernels

        self.spec, self.options, self.boot = spec, options, boot or BootOptions()
        self._features: dict[str, Any] | None = None
        self.kernel = kernels.resolve(spec.kind, spec.value)  # SetupError: no image, config lacks options
        initrd = initramfs.build(self.kernel.modules)
        # The guest sees the host's cache read-only: build there now what it would otherwise build itself.
        uffd.build()
        bios.path()
        self.accel = vm.choose_accel(options.accel)
        root = _artifacts_root(options, self.boot)
        (root / "vm").mkdir(parents=True, exist_ok=True)
        # console.log, boot.json: one directory per boot, unique even for parallel sessions
        self.vm_dir = Path(tempfile.mkdtemp(prefix=f"{spec.id}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=root / "vm"))
        self.vm_dir.chmod(0o755)
        python, cache = self._python(), cache_root().resolve()
        # The checkout, its venv and the cache may live anywhere, also under a path the guest mounts over.
        kept = hidden_paths([PROJECT, Path(sys.prefix).resolve(), cache])
        if len(kept) > MAX_KEPT:
            raise SetupError(f"{len(kept)} paths to bind into the guest, init takes {MAX_KEPT}: {kept}")
        cmdline = [*vm.base_cmdline(self.kernel.machine, self.accel), *self.boot.extra_cmdline,
                   f"HC_ROOT_TAG={ROOT_TAG}", f"HC_RW_TAG={RW_TAG}", kernel_param("HC_RW_PATH", root),
                   kernel_param("HC_PROJECT", PROJECT), kernel_param("HC_PYTHON", python),
                   f"HC_PORT={PORT}", kernel_param("HC_CACHE", cache),
                   *(kernel_param(f"HC_KEEP{i}", p) for i, p in enumerate(kept))]
        self.vm_spec = vm.VmSpec(
            kernel=self.kernel.image, initrd=initrd, cmdline=" ".join(cmdline),
            console_log=self.vm_dir / "console.log", machine=self.kernel.machine, acpi=self.kernel.acpi,
            accel=self.accel,
            memory_mib=self.boot.memory_mib, cpus=self.boot.cpus,
            shares=(vm.Share(ROOT_TAG, Path("/")), vm.Share(RW_TAG, root, writable=True)), ports=(PORT,))
        self.artifacts_root = root
        self.vm: vm.Vm | None = None
        self.client: AgentClient | None = None
        self._calls_in_flight = 0
        self.boot_seconds = 0.0  # QEMU start → the agent's hello
        self.hello: dict[str, Any] = {}  # release, python version, guest uptime and agent start-up at the hello
        self._release = ""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _python() -> Path:
        """The venv's python the guest runs: inside the venv's resolved directory (a symlinked checkout need not
        exist in the guest), its last link not followed (the venv's own path makes python pick the venv)."""
        return Path(sys.prefix).resolve() / "bin" / Path(sys.executable).name

    def _start(self) -> None:
        t0 = time.monotonic()
        self.vm = backends.open_vm(self.vm_spec, self.options.backend)
        try:
            self.client = AgentClient(self.vm.port(PORT, timeout=10), watch=self.vm.problem)
            hello = self.client.hello(timeout=self.boot.boot_timeout)
        except HolecheckError as exc:
            raise SetupError(self._boot_failure(str(exc))) from None
        self.boot_seconds = round(time.monotonic() - t0, 3)
        self.hello = hello
        self._release = str(hello["hello"])
        record = {"kernel": str(self.spec), "release": self._release, "accel": self.accel,
                  "machine": self.kernel.machine, "boot_to_agent_seconds": self.boot_seconds, "hello": hello}
        (self.vm_dir / "boot.json").write_text(json.dumps(record, indent=1) + "\n")
        log.info("%s: L1 VM (%s, %s) up, agent answered after %.2f s", self.spec, self.accel, self.kernel.machine,
                 self.boot_seconds)
        if problems := self.call("preflight", timeout=PREFLIGHT_TIMEOUT)["problems"]:
            raise SetupError(f"{self.spec}: guest kernel {self._release}: " + "; ".join(problems))

    def _boot_failure(self, what: str) -> str:
        assert self.vm is not None
        tail = self.vm.console_tail(CONSOLE_LINES)
        indented = "\n".join("    " + ln for ln in tail.splitlines())
        return (f"{self.spec}: L1 VM did not bring up the agent ({self.accel}, {self.kernel.machine}): {what}\n"
                f"  console ({self.vm_spec.console_log}), last lines:\n{indented}")

    @property
    def kernel_release(self) -> str:
        return self._release

    @property
    def l2_ram_mib(self) -> int:
        # under TCG every guest page costs: 128 MiB keeps a real-QEMU cell around half a minute
        return 256 if self.accel == "kvm" else 128

    def features(self) -> dict[str, Any]:
        if self._features is None:  # probed once per kernel (the VM's kernel does not change while it runs)
            reply = self.call("features")
            self._features = {k: v for k, v in reply.items() if k != "id"}  # preflight.local_features' keys
        return self._features

    def call(self, method: str, timeout: float = CALL_TIMEOUT, **params: object) -> dict[str, Any]:
        """One agent request; an agent-side failure carries the console's last lines."""
        if self.client is None:
            raise SetupError(f"{self.spec}: the L1 VM is closed")
        self._calls_in_flight += 1
        try:
            reply = self.client.call(method, timeout, **params)
            self._calls_in_flight -= 1  # only on an answer: an interrupted call leaves the agent busy
            return reply
        except AgentError as exc:
            raise AgentError(f"{exc}\n  console ({self.vm_spec.console_log}), last lines:\n"
                             + "\n".join("    " + ln for ln in self._console_tail().splitlines())) from None

    def _console_tail(self) -> str:
        return self.vm.console_tail(CONSOLE_LINES) if self.vm is not None else ""

    def run(self, scenario: Scenario, artifacts: Path | None = None, qemu: str | None = None) -> Verdict:
        if artifacts is not None and not artifacts.resolve().is_relative_to(self.artifacts_root):
            log.warning("artifacts dir %s is outside the shared %s: the guest cannot write it", artifacts,
                        self.artifacts_root)
            artifacts = None
        timeout = RUN_SLACK + len(scenario.steps) * (self.options.deadline(TCG_SLOWDOWN) + 5.0)
        if not getattr(scenario, "synthetic", True):
            timeout += REAL_QEMU_SLACK
        # L2 QEMUs run inside L1: /dev/kvm there only with nested virtualization, so let them choose
        options = replace(self.options, artifacts=artifacts.resolve() if artifacts else None, backend="qemu",
                          slowdown=1.0 if self.accel == "kvm" else TCG_SLOWDOWN,
                          qemu=qemu or self.options.qemu, accel="tcg" if self.options.accel == "tcg" else "auto")
        reply = self.call("run", timeout, scenario=scenario.to_json(), options=options.to_wire())
        return Verdict.from_json(reply["verdict"])

    def execute(self, argv: list[str], timeout: float, cwd: str | None = None) -> Ran:
        return Ran.from_wire(self.call("exec", timeout + CALL_TIMEOUT, argv=argv, seconds=timeout, cwd=cwd))

    def close(self) -> None:
        """Ask the guest to power off; stop the VM whatever happens."""
        client, machine, self.client, self.vm = self.client, self.vm, None, None
        try:
            # Ask only an agent that said hello and is not busy with a call we gave up on (Ctrl-C mid-run): one
            # that cannot answer would just cost the shutdown's timeout.
            if client is not None and machine is not None and machine.problem() is None and self.hello \
                    and not self._calls_in_flight:
                try:
                    client.call("shutdown", timeout=10)
                    machine.wait_exit(5)
                except HolecheckError as exc:
                    log.warning("%s: clean shutdown failed (%s): stopping the VM", self.spec, exc)
        finally:
            if client is not None:
                client.close()
            if machine is not None:
                machine.stop()
