"""holecheck's cache (the uffd helper, initramfs images, vmlinux extracts, Debian kernels, kernel builds) and
what a full one means: one line, and no half-written file a later run would trust (every cache writer writes a
temporary name and renames it)."""
from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import SetupError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
ALMOST_FULL = 128 << 20  # less free than a Debian kernel package and its vmlinux take


def cache_root() -> Path:
    """Where holecheck caches built artefacts: $HOLECHECK_CACHE, else ~/.cache/holecheck."""
    env = os.environ.get("HOLECHECK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "holecheck"


def no_space() -> SetupError:
    return SetupError(f"no space left in the cache {cache_root()}: free space or point HOLECHECK_CACHE elsewhere")


def _cache_is_full(filename: object) -> bool:
    """Was it the cache that ran out? By the failed path; a failed write() names no path, then by the space the
    cache's file system has left."""
    root = cache_root()
    if isinstance(filename, str | os.PathLike):
        return Path(os.fsdecode(filename)).resolve().is_relative_to(root.resolve())
    while not root.exists() and root != root.parent:
        root = root.parent
    try:
        st = os.statvfs(root)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < ALMOST_FULL


@contextlib.contextmanager
def full_is_setup_error() -> Iterator[None]:
    """A write into the cache that fails for want of space becomes ``no_space()``; other errors pass."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE and _cache_is_full(exc.filename):
            raise no_space() from None
        raise
