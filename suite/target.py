"""What a target is: where the kernel under test runs. Tests only call ``Target.run(scenario) -> Verdict``.

The two targets live by subject: ``host.HostTarget`` (this kernel, this process) and ``guest.GuestTarget``
(a kernel booted in an L1 VM); ``targets.open_target`` picks one for a ``KernelSpec``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .kernelspec import KernelSpec
from .scenario import Scenario
from .verdict import Verdict


@dataclass(frozen=True)
class TargetOptions:
    qemu: str = "qemu-system-x86_64"
    accel: str = "auto"
    backend: str = "qemu"
    trigger: str | None = None
    timeout: float = 10.0
    artifacts: str = ".holecheck"  # the guest writes artifacts through a share of this directory


class Target(Protocol):
    spec: KernelSpec

    @property
    def kernel_release(self) -> str: ...

    @property
    def l2_ram_mib(self) -> int:
        """Largest L2 guest RAM the real-QEMU scenarios use here (small under TCG, where every page costs)."""
        ...

    def features(self) -> dict[str, bool]:
        """What the kernel under test offers: ``soft_dirty`` (CONFIG_MEM_SOFT_DIRTY), ``shrink_underused``."""
        ...

    def run(self, scenario: Scenario, artifacts: Path | None = None, qemu: str | None = None) -> Verdict:
        """``qemu``: the L2 QEMU of a real-QEMU scenario (default: TargetOptions.qemu)."""
        ...

    def close(self) -> None: ...
