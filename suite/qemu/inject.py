"""Change another process's memory state from outside, for negative controls that re-create a buggy kernel's
effect inside a real QEMU: gdb attaches, calls madvise() in the target, detaches."""
from __future__ import annotations

import re
import shutil
import subprocess

from ..errors import HolecheckError, SetupError

MADV_DONTNEED = 4


def madvise_in(pid: int, ranges: list[tuple[int, int]], advice: int = MADV_DONTNEED, timeout: float = 300.0) -> None:
    """madvise(addr, length, advice) for each (addr, length) inside process ``pid``."""
    if shutil.which("gdb") is None:
        raise SetupError("gdb not found: the real-QEMU negative controls need it (apt-get install gdb)")
    calls = [a for addr, length in ranges for a in ("-ex", f"call (int)madvise((void*){addr:#x}, {length}, {advice})")]
    try:
        # only libc's symbols: QEMU links ~100 libraries, and reading them all takes minutes in a TCG guest
        fast = ["-iex", "set debuginfod enabled off", "-iex", "set auto-solib-add off",
                "-ex", "sharedlibrary libc\\.so"]
        out = subprocess.run(["gdb", "-nx", "-batch", *fast, "-p", str(pid), *calls], capture_output=True, text=True,
                             timeout=timeout, check=False).stdout
    except subprocess.TimeoutExpired:
        raise HolecheckError(f"gdb did not finish madvise() in pid {pid} within {timeout:g} s") from None
    results = re.findall(r"^\$\d+ = (-?\d+)$", out, re.M)
    if results != ["0"] * len(ranges):
        raise HolecheckError(f"madvise() in pid {pid} via gdb returned {results or 'nothing'}: {out[-300:]!r}")
