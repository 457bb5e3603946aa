"""HostTarget: the running kernel is the one under test, and scenarios run in this process."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import runner, uffd
from ..errors import SetupError
from ..kernelspec import KernelSpec
from ..options import RunOptions
from ..scenario import Scenario
from ..verdict import Verdict
from . import preflight
from .program import Ran, execute


class HostTarget:
    """The running kernel is the one under test: scenarios run in this process."""

    def __init__(self, spec: KernelSpec, options: RunOptions) -> None:
        self.spec, self.options = spec, options
        self._features: dict[str, Any] | None = None
        if problems := preflight.host_problems():
            raise SetupError(f"host kernel {os.uname().release}: " + "; ".join(problems))
        uffd.build()  # into the cache now: a cache that cannot take it stops the session, not each test

    @property
    def kernel_release(self) -> str:
        return os.uname().release

    l2_ram_mib = 256

    def features(self) -> dict[str, Any]:
        if self._features is None:  # probed once per session
            self._features = preflight.local_features()
        return self._features

    def run(self, scenario: Scenario, artifacts: Path | None = None, qemu: str | None = None) -> Verdict:
        return runner.run(scenario, replace(self.options, artifacts=artifacts, qemu=qemu or self.options.qemu))

    def execute(self, argv: list[str], timeout: float, cwd: str | None = None) -> Ran:
        return execute(argv, timeout, cwd)

    def close(self) -> None:
        pass
