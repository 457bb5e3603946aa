"""A program the host built (a kselftest, a C reproducer) run by the kernel under test: on the host, or by the L1
agent (``{"method": "exec"}``), with the same bounded run and the same result either way."""
from __future__ import annotations

import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import StallError
from ..procs import stop_group


@dataclass(frozen=True)
class Ran:
    """One finished run: exit status (negative: killed by that signal), its output, how long it took."""

    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Ran:
        return cls(tuple(d["argv"]), int(d["rc"]), d["stdout"], d["stderr"], float(d["seconds"]))


def execute(argv: list[str], timeout: float, cwd: str | None = None) -> Ran:
    """Run ``argv`` (in ``cwd``: selftests find their helpers as ./NAME) in its own process group; StallError (the
    whole group stopped) if it outlives ``timeout``."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc, what=argv[0])  # SIGTERM first: a kselftest restores the knobs it changed
        out, err = proc.communicate()
        tail = (out + err).strip().splitlines()[-3:]
        raise StallError(f"{' '.join(argv)}: not finished within {timeout:g} s (stopped); last output: "
                         f"{' | '.join(tail) or 'none'}") from None
    except BaseException:
        stop_group(proc, what=argv[0])
        raise
    return Ran(tuple(argv), proc.returncode, stdout, stderr, round(time.monotonic() - t0, 2))
