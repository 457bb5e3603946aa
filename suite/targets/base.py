"""What a target is: where the kernel under test runs. Tests only call ``Target.run(scenario) -> Verdict``.

The two targets live by subject: ``host.HostTarget`` (this kernel, this process) and ``guest.GuestTarget``
(a kernel booted in an L1 VM); ``opening.open_target`` picks one for a ``KernelSpec``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..kernelspec import KernelSpec
from ..scenario import Scenario
from ..verdict import Verdict
from .program import Ran


class Target(Protocol):
    spec: KernelSpec

    @property
    def kernel_release(self) -> str: ...

    @property
    def l2_ram_mib(self) -> int:
        """Largest L2 guest RAM the real-QEMU scenarios use here (small under TCG, where every page costs)."""
        ...

    def features(self) -> dict[str, Any]:
        """What the kernel under test offers (``preflight.local_features``, probed once per kernel):
        ``soft_dirty``, ``shrink_underused``, ``uffd_*``, ``pagemap_scan``, ``shmem_thp``, ``ksm``,
        ``debugfs_split``, ``zram`` (booleans), ``mthp_kb`` (sizes with a knob), ``numa_nodes`` (int)."""
        ...

    def run(self, scenario: Scenario, artifacts: Path | None = None, qemu: str | None = None) -> Verdict:
        """``qemu``: the L2 QEMU of a real-QEMU scenario (default: RunOptions.qemu)."""
        ...

    def execute(self, argv: list[str], timeout: float, cwd: str | None = None) -> Ran:
        """Run a program (a path the kernel under test sees, e.g. in an artifacts dir) there, in ``cwd``; bounded."""
        ...

    def close(self) -> None: ...
