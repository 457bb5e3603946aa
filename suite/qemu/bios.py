"""A 64 KiB BIOS whose guest never touches RAM: the reset vector runs ``cli; hlt`` forever.

The test, not the guest, owns guest RAM (it writes and reads it through qtest), so the only code the vCPU
runs is the 4 bytes at the reset vector. The image is generated, then cached by content hash so that
concurrent runs (and QEMU's ``-bios``) can share one read-only file.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

SIZE = 64 * 1024
RESET_VECTOR = 0xFFF0  # the CPU starts at F000:FFF0, the image's last 16 bytes (mapped just below 4 GiB and 1 MiB)
# cli; hlt; jmp short -3 (back to the hlt: an NMI or SMI that wakes the vCPU puts it straight back to sleep)
RESET_CODE = bytes([0xFA, 0xF4, 0xEB, 0xFD])
FILL = 0xFF  # what erased flash reads as; nothing else in the image is ever executed


def image() -> bytes:
    """The BIOS image: FILL everywhere, RESET_CODE at the reset vector."""
    img = bytearray([FILL]) * SIZE
    img[RESET_VECTOR : RESET_VECTOR + len(RESET_CODE)] = RESET_CODE
    return bytes(img)


def cache_dir() -> Path:
    """$HOLECHECK_CACHE, else ~/.cache/holecheck."""
    env = os.environ.get("HOLECHECK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "holecheck"


def path(directory: Path | None = None) -> Path:
    """A file holding ``image()``, named by its content hash; written once, atomically (rename)."""
    data = image()
    directory = directory or cache_dir()
    target = directory / f"bios-halt-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    if target.is_file() and target.read_bytes() == data:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bios-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide it from a QEMU running as another user
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)  # a concurrent writer renames identical bytes: harmless
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
