"""Where the kernel under test runs. Tests only call ``Target.run(scenario) -> Verdict``."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import preflight, runner
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


class Target(Protocol):
    spec: KernelSpec

    @property
    def kernel_release(self) -> str: ...

    def run(self, scenario: Scenario, artifacts: Path | None = None) -> Verdict: ...

    def close(self) -> None: ...


class HostTarget:
    """The running kernel is the one under test: scenarios run in this process."""

    def __init__(self, spec: KernelSpec, options: TargetOptions) -> None:
        self.spec, self.options = spec, options
        if problems := preflight.host_problems():
            raise SetupError(f"host kernel {os.uname().release}: " + "; ".join(problems))

    @property
    def kernel_release(self) -> str:
        return os.uname().release

    def run(self, scenario: Scenario, artifacts: Path | None = None) -> Verdict:
        opts = runner.RunOptions(trigger=self.options.trigger, timeout=self.options.timeout, artifacts=artifacts,
                                 qemu=self.options.qemu, accel=self.options.accel)
        return runner.run(scenario, opts)

    def close(self) -> None:
        pass


def open_target(spec: KernelSpec, options: TargetOptions) -> Target:
    if spec.kind == "host":
        return HostTarget(spec, options)
    raise SetupError(f"--kernel={spec}: booting a kernel under test in a VM is not available yet (use --kernel=host)")
