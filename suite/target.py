"""Where the kernel under test runs. Tests only call ``Target.run(scenario) -> Verdict``."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import preflight, runner, uffd
from .cache import full_is_setup_error
from .errors import SetupError
from .kernelspec import KernelSpec
from .scenario import Scenario
from .verdict import Verdict

log = logging.getLogger(__name__)


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

    def run(self, scenario: Scenario, artifacts: Path | None = None) -> Verdict: ...

    def close(self) -> None: ...


def local_features() -> dict[str, bool]:
    """Target.features() answered by the kernel this process runs on (the host's, or the guest's in the agent)."""
    from . import pagemap, thp

    return {"soft_dirty": pagemap.soft_dirty_supported(), "shrink_underused": thp.KNOBS["shrink_underused"].exists()}


class HostTarget:
    """The running kernel is the one under test: scenarios run in this process."""

    def __init__(self, spec: KernelSpec, options: TargetOptions) -> None:
        self.spec, self.options = spec, options
        if problems := preflight.host_problems():
            raise SetupError(f"host kernel {os.uname().release}: " + "; ".join(problems))
        uffd.build()  # into the cache now: a cache that cannot take it stops the session, not each test

    @property
    def kernel_release(self) -> str:
        return os.uname().release

    l2_ram_mib = 256

    def features(self) -> dict[str, bool]:
        return local_features()

    def run(self, scenario: Scenario, artifacts: Path | None = None) -> Verdict:
        opts = runner.RunOptions(trigger=self.options.trigger, timeout=self.options.timeout, artifacts=artifacts,
                                 qemu=self.options.qemu, accel=self.options.accel)
        return runner.run(scenario, opts)

    def close(self) -> None:
        pass


def open_target(spec: KernelSpec, options: TargetOptions) -> Target:
    """The target for ``spec``; SetupError in one line if it cannot run scenarios (a full cache included)."""
    with full_is_setup_error():
        return _open(spec, options)


def _open(spec: KernelSpec, options: TargetOptions) -> Target:
    if spec.kind == "host":
        return HostTarget(spec, options)
    from .guest import GuestTarget  # lazy: a host run imports nothing VM-related

    if spec.kind == "build":
        from kernels import build

        image = build.build_tree(Path(spec.value).expanduser())  # SetupError: not a tree, does not build
        return GuestTarget(KernelSpec("path", str(image)), options)
    return GuestTarget(spec, options)
