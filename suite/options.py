"""How a session runs scenarios (``RunOptions``: one frozen value from conftest through the targets to the agent
and the runners), and checks of the option values, made when pytest configures: a bad value is one SetupError line
(what, why, what to do) before anything starts, not an exception half-way through a test."""
from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SetupError

log = logging.getLogger(__name__)
MIB = 1 << 20
TCG_SLOWDOWN = 2.0  # an L2 QEMU under TCG inside a TCG L1 VM: QMP and qtest answer several times slower than KVM


@dataclass(frozen=True)
class RunOptions:
    """The command line's say in how scenarios run. conftest makes one per session; a target narrows it per cell
    with ``dataclasses.replace`` (the cell's artifacts, its QEMU) and an L1 target sends it to the agent as JSON."""

    qemu: str = "qemu-system-x86_64"  # the L2 QEMU of real-QEMU scenarios (--qemu)
    accel: str = "auto"  # kvm, tcg or auto (--accel)
    backend: str = "qemu"  # how an L1 VM is started (--backend)
    trigger: str | None = None  # overrides each scenario's shrinker trigger (--trigger)
    timeout: float = 10.0  # per helper command / destination read / QMP wait: longer means a stall (--helper-timeout)
    slowdown: float = 1.0  # every deadline × this: the target sets TCG_SLOWDOWN where its L2 QEMU runs under TCG
    artifacts_root: str = ".holecheck"  # the session's artifacts (--artifacts); an L1 VM reaches it by a share
    artifacts: Path | None = None  # this cell's artifacts directory, under artifacts_root
    snapshot_rate: int = 4 * MIB  # bytes/s of a background snapshot's stream

    def deadline(self, multiple: float = 1.0) -> float:
        """The one source of a wait's deadline: ``multiple`` × --helper-timeout × the accelerator's slowdown
        (a QMP wait is 1, a migration's completion 3, a snapshot's stream 6)."""
        return self.timeout * multiple * self.slowdown

    def to_wire(self) -> dict[str, Any]:
        """JSON for the agent."""
        return {**dataclasses.asdict(self), "artifacts": str(self.artifacts) if self.artifacts else None}

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> RunOptions:
        """From ``to_wire``; fields a newer host sent that this runner does not know are ignored with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(fields) - known):
            log.warning("ignoring run options this runner does not know: %s", ", ".join(unknown))
        kwargs = {k: v for k, v in fields.items() if k in known}
        if kwargs.get("artifacts"):
            kwargs["artifacts"] = Path(kwargs["artifacts"])
        return cls(**kwargs)


def positive_seconds(option: str, text: str | float) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SetupError(f"{option}={text}: not a number of seconds: give e.g. {option}=10") from None
    if not math.isfinite(value) or value <= 0:
        raise SetupError(f"{option}={text}: must be a finite number of seconds above 0 (every bounded wait uses it): "
                         f"give e.g. {option}=10") from None
    return value


def writable_dir(option: str, text: str) -> Path:
    """A directory that exists or can be created, and can be written, checked by creating (and removing) a
    probe directory in it or in its nearest existing ancestor. Creates nothing that stays."""
    path = Path(text).expanduser()
    todo = f"give {option} a directory you can write"
    probe_in = path
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise SetupError(f"{option}={text}: {probe_in} is not a directory: {todo}")
    try:
        Path(tempfile.mkdtemp(prefix=".holecheck-probe-", dir=probe_in)).rmdir()
    except OSError as exc:
        raise SetupError(f"{option}={text}: cannot create directories in {probe_in} "
                         f"({exc.strerror or exc}): {todo}") from None
    return path
