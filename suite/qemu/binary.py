"""Which QEMU binary runs: one check, used by conftest at session start, by every RAM machine and at VM boot.

``check(path)`` answers with the binary's version or one SetupError line (what, why, what to do). It takes a
path (or a name on $PATH); ``--qemu=system|debian:VERSION|PATH`` specs (``parse_many``) become one with ``resolve``.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import SetupError

# postcopy + background snapshot + pause-before-switchover as this suite drives them
MIN_QEMU = (7, 1, 0)
VERSION_TIMEOUT = 10.0
WHAT_TO_DO = "point --qemu at a qemu-system-x86_64 >= {min} (Debian: apt-get install qemu-system-x86)"


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _todo() -> str:
    return WHAT_TO_DO.format(min=_dotted(MIN_QEMU))


def qemu_version(binary: str) -> tuple[int, int, int]:
    """(major, minor, micro) from ``binary --version``; SetupError in one line if it is not a QEMU system emulator."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT,
                             check=False)
    except FileNotFoundError:
        raise SetupError(f"QEMU binary {binary!r} not found: {_todo()}") from None
    except PermissionError:
        raise SetupError(f"QEMU binary {binary!r} is not executable: {_todo()}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"QEMU binary {binary}: `--version` failed ({exc}): {_todo()}") from None
    m = re.search(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?", out.stdout)
    if not m:
        first = (out.stdout or out.stderr).strip().splitlines()[:1]
        printed = repr(first[0]) if first else "nothing"
        raise SetupError(f"{binary} is not a QEMU system emulator (`--version` printed {printed}): {_todo()}")
    return int(m[1]), int(m[2]), int(m[3] or 0)


def check(binary: str) -> tuple[int, int, int]:
    """The version of a QEMU system emulator holecheck can drive; else SetupError in one line."""
    path = binary if "/" in binary else shutil.which(binary)
    if path is None:
        raise SetupError(f"QEMU binary {binary!r} is not on $PATH: {_todo()}")
    if not os.path.exists(path):
        raise SetupError(f"QEMU binary {path} does not exist: {_todo()}")
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise SetupError(f"QEMU binary {path} is not an executable file: {_todo()}")
    version = qemu_version(path)
    if version < MIN_QEMU:
        raise SetupError(f"{path} is QEMU {_dotted(version)}, too old: holecheck needs >= {_dotted(MIN_QEMU)} "
                         f"(postcopy, background snapshot, pause-before-switchover): {_todo()}")
    return version


# --- which QEMUs a session runs: --qemu=system|debian:VERSION|debian:newest|PATH ---------------------------------

SYSTEM = "qemu-system-x86_64"


@dataclass(frozen=True)
class QemuSpec:
    """``system`` (qemu-system-x86_64 on $PATH), ``debian:VERSION`` / ``debian:newest`` (Debian's package, fetched
    into the cache by ``kernels.qemu`` and run side by side), or a PATH (a maintainer's own build)."""

    kind: str  # "system", "debian" or "path"
    value: str = ""

    def __str__(self) -> str:
        return {"system": "system", "debian": f"debian:{self.value}"}.get(self.kind, self.value)


def parse(text: str) -> QemuSpec:
    text = text.strip()
    if text in ("system", SYSTEM):
        return QemuSpec("system")
    kind, sep, value = text.partition(":")
    if sep and kind == "debian":
        if not value:
            raise SetupError(f"--qemu={text}: missing version after 'debian:' (e.g. debian:10.0.2, debian:newest)")
        return QemuSpec("debian", value)
    return QemuSpec("path", text)


def parse_many(values: list[str]) -> list[QemuSpec]:
    """Each --qemu may be repeated or comma-separated; none means the system's."""
    specs = [parse(v) for raw in values for v in raw.split(",") if v.strip()]
    return list(dict.fromkeys(specs)) or [QemuSpec("system")]


@functools.cache
def resolve(spec: QemuSpec) -> str:
    """The executable for ``spec`` (Debian's fetched first), checked: SetupError in one line if unusable."""
    if spec.kind == "debian":
        from kernels import qemu as debian_qemu  # lazy: only a session that asks for one needs apt

        path = str(debian_qemu.fetch(spec.value))
    else:
        path = SYSTEM if spec.kind == "system" else spec.value
    check(path)
    return path
