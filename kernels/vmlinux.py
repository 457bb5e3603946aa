"""The uncompressed ELF ``vmlinux`` inside a bzImage/vmlinuz, as the kernel's scripts/extract-vmlinux finds it.

Why: QEMU boots an ELF vmlinux with a PVH entry note directly (``-kernel vmlinux``), skipping the decompressor —
about 3 s of a TCG boot. The payload is located by its compression magic and decompressed with the matching
decoder; a candidate counts only if it decompresses to an ELF file. Debian uses xz (6.1) and zstd (6.12):
Python 3.11 has no zstd module, so zstd goes through the ``zstd`` program (or the ``zstandard`` package).
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import lzma
import os
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

from . import elf

log = logging.getLogger(__name__)

XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b\x08"


def _xz(blob: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)  # stops at the end of the stream


def _gzip(blob: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(blob)


def _zstd(blob: bytes) -> bytes:
    try:
        zstandard = importlib.import_module("zstandard")
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    except ImportError:
        pass
    tool = shutil.which("zstd")
    if not tool:
        raise RuntimeError("zstd-compressed kernel: install the zstd program (apt-get install zstd)")
    # The payload is followed by the bzImage's trailer: zstd decodes the first frame, then complains (rc 1).
    proc = subprocess.run([tool, "-dc", "-q"], input=blob, capture_output=True, timeout=120, check=False)
    return proc.stdout


DECODERS: list[tuple[str, bytes, Callable[[bytes], bytes]]] = [
    ("xz", XZ_MAGIC, _xz), ("zstd", ZSTD_MAGIC, _zstd), ("gzip", GZIP_MAGIC, _gzip),
]


def extract(image: bytes) -> tuple[bytes, str] | None:
    """(vmlinux ELF bytes, compression) from a bzImage, or None if no payload decompresses to ELF."""
    if image[:4] == elf.MAGIC:
        return image, "none"
    for name, magic, decode in DECODERS:
        pos = image.find(magic)
        while pos >= 0:
            try:
                out = decode(image[pos:])
            except (lzma.LZMAError, zlib.error, OSError, EOFError):
                out = b""  # a false magic inside the image: try the next occurrence
            if out[:4] == elf.MAGIC:
                return out, name
            pos = image.find(magic, pos + 1)
    return None


def cached_vmlinux(bzimage: Path, cache_dir: Path) -> Path | None:
    """The PVH-bootable vmlinux for ``bzimage``, extracted once into ``cache_dir`` (named by the image's hash);
    None when the image has no ELF payload or its vmlinux lacks a PVH entry (boot the bzImage then)."""
    data = bzimage.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    target = cache_dir / f"vmlinux-{digest}"
    marker = cache_dir / f"vmlinux-{digest}.no-pvh"
    if target.is_file():
        return target
    if marker.exists():
        return None
    found = extract(data)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if found is None or not elf.has_pvh_entry(found[0]):
        why = "no ELF payload found" if found is None else "vmlinux has no PVH entry note"
        log.info("%s: %s; booting the compressed image", bzimage, why)
        marker.write_text(why + "\n")
        return None
    fd, tmp = tempfile.mkstemp(prefix=".vmlinux-", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(found[0])
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("extracted %s vmlinux (%d MiB) from %s", found[1], len(found[0]) >> 20, bzimage)
    return target
