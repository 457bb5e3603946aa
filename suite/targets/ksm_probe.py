"""Does this kernel's KSM merge keep the uffd-wp bit? Measured, not looked up by version: two private anonymous pages
with the same (random) bytes, registered with userfaultfd WP and write-protected, merged by ksmd; then pagemap.

The feature ``ksm_merge_keeps_uffd_wp`` (``preflight.local_features``) is what the known finding
``ksm-merge-of-duplicates-drops-uffd-wp-and-soft-dirty`` keys on: a kernel carrying the fix in
``kernels/patches/ksm-keep-uffd-wp/`` answers True and that entry stops applying to it by itself.
False also where it cannot be measured (no KSM, no userfaultfd WP, the pair was not merged within the scans),
with the reason logged: on such a kernel the finding's cells cannot show a merge either.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

from .. import pagemap, split_triggers, thp, waits
from ..errors import StallError

log = logging.getLogger(__name__)

NR_USERFAULTFD = 323  # x86_64
UFFD_API = 0xAA
# _IOWR(0xAA, nr, size): UFFDIO_API (24 B), UFFDIO_REGISTER (32 B), UFFDIO_WRITEPROTECT (24 B)
UFFDIO_API, UFFDIO_REGISTER, UFFDIO_WRITEPROTECT = 0xC018AA3F, 0xC020AA00, 0xC018AA06
UFFDIO_REGISTER_MODE_WP, UFFDIO_WRITEPROTECT_MODE_WP = 1 << 1, 1 << 0
PROT_RW, MAP_PRIVATE_ANON = 0x3, 0x22
MADV_MERGEABLE, MADV_NOHUGEPAGE = 12, 15
PAGES = 2


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _ioctl(libc: ctypes.CDLL, fd: int, request: int, *words: int) -> bool:
    arg = (ctypes.c_uint64 * len(words))(*words)
    return libc.ioctl(fd, ctypes.c_ulong(request), arg) == 0


def _uffd_wp(entry: int) -> bool:
    return bool(entry >> pagemap.UFFD_WP & 1)


def measure() -> tuple[bool | None, str]:
    """(True: both pages merged and kept the bit; False: merged, a bit lost; None: not measurable), and how."""
    if not (split_triggers.KSM / "run").exists():
        return None, "no KSM (/sys/kernel/mm/ksm)"
    libc = _libc()
    uffd = libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if uffd < 0:
        return None, f"userfaultfd: {os.strerror(ctypes.get_errno())}"
    length = PAGES * pagemap.PAGE
    addr = libc.mmap(None, length, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
    try:
        if addr in (None, ctypes.c_void_p(-1).value):
            return None, f"mmap: {os.strerror(ctypes.get_errno())}"
        libc.madvise(addr, length, MADV_NOHUGEPAGE)
        data = os.urandom(pagemap.PAGE)  # duplicates of each other only: nothing else on the machine merges in
        for i in range(PAGES):
            ctypes.memmove(addr + i * pagemap.PAGE, data, pagemap.PAGE)
        if not (_ioctl(libc, uffd, UFFDIO_API, UFFD_API, 0, 0)
                and _ioctl(libc, uffd, UFFDIO_REGISTER, addr, length, UFFDIO_REGISTER_MODE_WP, 0)
                and _ioctl(libc, uffd, UFFDIO_WRITEPROTECT, addr, length, UFFDIO_WRITEPROTECT_MODE_WP)):
            return None, f"userfaultfd WP on anonymous memory: {os.strerror(ctypes.get_errno())}"
        if not all(_uffd_wp(e) for e in pagemap.read_raw("self", addr, length).tolist()):
            return None, "UFFDIO_WRITEPROTECT set no uffd-wp bit in pagemap"
        with thp.exclusive(), split_triggers.ksm_knobs(use_zero_pages=False):
            if libc.madvise(addr, length, MADV_MERGEABLE):
                return None, f"MADV_MERGEABLE: {os.strerror(ctypes.get_errno())}"
            (split_triggers.KSM / "run").write_text("1")
            try:
                after = waits.wait_for(
                    lambda: pagemap.read_raw("self", addr, length).tolist(),
                    lambda entries: len({e & pagemap.PFN_MASK for e in entries}) == 1,
                    what="ksmd to merge the two duplicate pages (one PFN in pagemap)",
                    timeout=split_triggers.KSM_TIMEOUT)
            except StallError as exc:
                return None, str(exc)
        kept = sum(_uffd_wp(e) for e in after)
        return kept == PAGES, f"merged: {kept} of {PAGES} pages kept uffd-wp"
    finally:
        if addr not in (None, ctypes.c_void_p(-1).value):
            libc.munmap(addr, length)
        os.close(uffd)


@functools.cache
def ksm_merge_keeps_uffd_wp() -> bool:
    """The feature: measured once per process (the kernel does not change under it)."""
    kept, how = measure()
    log.info("ksm_merge_keeps_uffd_wp: %s (%s)", kept, how)
    return bool(kept)
