"""The initramfs an L1 VM boots: static busybox, the kernel's needed modules (decompressed, in load order) and
``init.sh`` as ``/init``. Written as cpio newc, cached by content hash under ``<cache>/images/``.

Everything per-run (share tags, paths, the port name) goes on the kernel command line, not into the image, so
one image serves every run of a kernel.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kernels.modules import Module
from suite.cache import cache_root
from suite.errors import SetupError

from .cpio import CpioWriter

INIT = Path(__file__).with_name("init.sh")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
PT_INTERP = 3


def find_busybox() -> Path:
    """A statically linked busybox (the initramfs has no libc): Debian's busybox-static."""
    for cand in [shutil.which("busybox") or "", *BUSYBOX_CANDIDATES]:
        if cand and Path(cand).is_file() and is_static(Path(cand)):
            return Path(cand)
    raise SetupError("no statically linked busybox found: apt-get install busybox-static")


def is_static(path: Path) -> bool:
    """An ELF executable with no PT_INTERP program header (no dynamic loader needed)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != PT_INTERP for i in range(phnum))


def archive(modules: Sequence[Module], busybox: Path | None = None, init: bytes | None = None) -> bytes:
    """The initramfs's bytes."""
    w = CpioWriter()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "newroot", "proc", "sys", "tmp"):
        w.directory(d)
    # The kernel opens /dev/console for init's stdio before anything is mounted.
    w.char_device("dev/console", 5, 1)
    w.char_device("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", (busybox or find_busybox()).read_bytes(), 0o755)
    w.symlink("bin/sh", "busybox")
    w.file("init", init if init is not None else INIT.read_bytes(), 0o755)
    order = []
    for i, mod in enumerate(modules):
        name = f"{i:02d}-{mod.name}.ko"
        w.file(f"lib/modules/{name}", mod.data)
        order.append(name)
    w.file("etc/modules.order", "".join(f"{n}\n" for n in order).encode())
    return bytes(w)


def build(modules: Sequence[Module], cache_dir: Path | None = None) -> Path:
    """Write the initramfs for ``modules`` once (named by its content hash); return its path."""
    data = archive(modules)
    directory = (cache_dir or cache_root()) / "images"
    target = directory / f"initramfs-{hashlib.sha256(data).hexdigest()[:16]}.cpio"
    if target.is_file() and target.stat().st_size == len(data):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".initramfs-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # atomic: a concurrent builder writes identical bytes
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
