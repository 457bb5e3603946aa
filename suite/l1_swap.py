"""Swap that lives and dies inside an L1 VM, for the ``pageout-swap`` split trigger: a zram device, never the host's.

``zram_swap()`` sets ``/dev/zram0`` up as swap (disksize, mkswap, swapon at top priority) and always takes it down
again (swapoff, which swaps every page back in, then zram ``reset``), also on error. It refuses outside an L1 VM:
the agent's environment carries ``HOLECHECK_L1=1`` (set by ``images/init.sh``), the host's never does, and the
host's swap is never touched. The zram module comes in the initramfs when the kernel builds it as a module
(``kernels.kernel.OPTIONAL``).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

ZRAM = Path("/sys/block/zram0")
DEVICE = "/dev/zram0"
DISKSIZE = "512M"  # compressed in guest RAM; a 64 MiB region of mostly zero pages needs far less
TIMEOUT = 60.0  # swapoff under TCG swaps every page back in


class SwapUnavailable(Exception):
    """Why swap cannot be set up here (the cell says so: a trigger that cannot run, never a silent pass)."""


def in_l1() -> bool:
    return os.environ.get("HOLECHECK_L1") == "1"


def why_not() -> str:
    """'' when ``zram_swap`` can run here, else why not."""
    if not in_l1():
        return "swap is only set up inside an L1 VM (--kernel=debian:…): the host's swap is never changed"
    if not ZRAM.is_dir():
        return "this kernel has no zram device (CONFIG_ZRAM not built, or its module not in the initramfs)"
    if (ZRAM / "disksize").read_text().strip() != "0":
        return f"{DEVICE} is already in use (disksize {(ZRAM / 'disksize').read_text().strip()})"
    return ""


def _run(*cmd: str) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=TIMEOUT)
    except subprocess.CalledProcessError as exc:
        raise SwapUnavailable(f"{' '.join(cmd)}: {exc.stderr.decode(errors='replace').strip()}") from None
    except subprocess.TimeoutExpired:
        raise SwapUnavailable(f"{' '.join(cmd)}: not done within {TIMEOUT:.0f} s") from None
    except FileNotFoundError:
        raise SwapUnavailable(f"{cmd[0]}: not installed (util-linux)") from None


def swaps() -> str:
    return Path("/proc/swaps").read_text()


@contextlib.contextmanager
def zram_swap() -> Iterator[None]:
    """zram0 as the VM's swap for the duration; swapoff and zram reset after, whatever happened."""
    if reason := why_not():
        raise SwapUnavailable(reason)
    try:
        (ZRAM / "disksize").write_text(DISKSIZE)
        _run("mkswap", DEVICE)
        _run("swapon", "-p", "32767", DEVICE)
        yield
    finally:
        try:
            if DEVICE in swaps():
                _run("swapoff", DEVICE)
        finally:
            (ZRAM / "reset").write_text("1")
