"""Change another process's memory state from outside, for negative controls that re-create a buggy kernel's
effect inside a real QEMU: ``madvise_inject.c`` stops the process's main thread with ptrace, makes it call
madvise(), and lets it go on (why not gdb: see the C file's header)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from .. import uffd
from ..errors import HolecheckError

MADV_DONTNEED = 4
SOURCE = Path(__file__).with_name("madvise_inject.c")


def build() -> Path:
    """The injector's binary, compiled once per source version into the cache (like the uffd helper)."""
    return uffd.build(source_file=SOURCE, name="madvise-inject")


def madvise_in(pid: int, ranges: list[tuple[int, int]], advice: int = MADV_DONTNEED, timeout: float = 60.0) -> None:
    """madvise(addr, length, advice) for each (addr, length) inside process ``pid``; each must return 0."""
    argv = [str(build()), str(pid), str(advice), *(f"{addr:#x}:{length}" for addr, length in ranges)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise HolecheckError(f"madvise() in pid {pid} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        raise HolecheckError(f"madvise() in pid {pid} failed (exit {proc.returncode}): "
                             f"{(proc.stdout + proc.stderr).strip()[-400:]}")
