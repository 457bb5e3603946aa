"""Page-state oracle, reading side: per-4 KiB page state of a process's virtual range.

Sources: /proc/PID/pagemap (one u64 per page; Documentation/admin-guide/mm/pagemap.rst) and, only where asked
and only for present non-zero pages, /proc/kpageflags (THP). Zero pages are recognised by PFN: the shared zero
page's PFN is probed once at run time (cheaper than one kpageflags read per page).
"""
from __future__ import annotations

import ctypes
import functools
import gc
import mmap
import os
from dataclasses import dataclass

import numpy as np

PAGE = 4096
PAGES_PER_THP = 512
THP_SIZE = PAGE * PAGES_PER_THP

# pagemap bits
PFN_MASK = (1 << 55) - 1
SOFT_DIRTY = 55
EXCLUSIVE = 56
UFFD_WP = 57
FILE_SHARED = 61
SWAPPED = 62
PRESENT = 63

# kpageflags bits (include/uapi/linux/kernel-page-flags.h)
KPF_THP = 22
KPF_ZERO_PAGE = 24

_U = np.uint64


def _bit(raw: np.ndarray, n: int) -> np.ndarray:
    return (raw >> _U(n)) & _U(1) == 1


@dataclass(frozen=True)
class ZeroPfns:
    """The shared zero page, and the huge zero page's first PFN if the kernel has one mapped (else -1)."""

    small: int
    huge: int = -1


@dataclass
class PageStates:
    """Decoded state of ``raw.size`` consecutive pages starting at virtual address ``start``."""

    start: int
    raw: np.ndarray  # uint64 pagemap entries
    zero_pfns: ZeroPfns
    thp: np.ndarray | None = None  # bool per page, from kpageflags; None when not read

    @property
    def npages(self) -> int:
        return int(self.raw.size)

    @functools.cached_property
    def present(self) -> np.ndarray:
        return _bit(self.raw, PRESENT)

    @functools.cached_property
    def swapped(self) -> np.ndarray:
        return _bit(self.raw, SWAPPED)

    @functools.cached_property
    def pfn(self) -> np.ndarray:
        """PFN of present pages, 0 elsewhere (also 0 for everything when not root)."""
        return np.where(self.present, self.raw & _U(PFN_MASK), _U(0))

    @functools.cached_property
    def zero(self) -> np.ndarray:
        """Present and mapping the shared zero page (or a subpage of the huge zero page)."""
        pfn = self.pfn
        zero = self.present & (pfn == _U(self.zero_pfns.small))
        if self.zero_pfns.huge >= 0:
            h = _U(self.zero_pfns.huge)
            zero |= self.present & (pfn >= h) & (pfn < h + _U(PAGES_PER_THP))
        return zero

    @property
    def data(self) -> np.ndarray:
        """Present pages with their own frame (not the zero page)."""
        return self.present & ~self.zero

    @property
    def hole(self) -> np.ndarray:
        """pte_none: neither present nor swapped."""
        return ~self.present & ~self.swapped

    @functools.cached_property
    def uffd_wp(self) -> np.ndarray:
        return _bit(self.raw, UFFD_WP)

    @functools.cached_property
    def soft_dirty(self) -> np.ndarray:
        return _bit(self.raw, SOFT_DIRTY)

    @functools.cached_property
    def exclusive(self) -> np.ndarray:
        return _bit(self.raw, EXCLUSIVE)

    def address(self, index: int) -> int:
        return self.start + index * PAGE

    def counts(self) -> dict[str, int]:
        """Page-state counts for verdicts (one line of a phase record)."""
        out = {
            "pages": self.npages,
            "data": int(self.data.sum()),
            "zeropage": int(self.zero.sum()),
            "hole": int(self.hole.sum()),
            "swapped": int(self.swapped.sum()),
            "uffd_wp": int(self.uffd_wp.sum()),
            "soft_dirty": int(self.soft_dirty.sum()),
        }
        if self.thp is not None:
            out["thp_pages"] = int(self.thp.sum())
        return out


def decode(raw: bytes | np.ndarray, start: int, zero_pfns: ZeroPfns, thp: np.ndarray | None = None) -> PageStates:
    arr = np.frombuffer(raw, dtype="<u8") if isinstance(raw, bytes | bytearray | memoryview) else raw
    return PageStates(start=start, raw=arr.astype(np.uint64, copy=False), zero_pfns=zero_pfns, thp=thp)


def read_raw(pid: int | str, start: int, length: int) -> np.ndarray:
    """Raw pagemap entries for [start, start+length) of ``pid`` ('self' allowed)."""
    if start % PAGE or length % PAGE:
        raise ValueError(f"range {start:#x}+{length:#x} is not page aligned")
    n = length // PAGE
    buf = bytearray(n * 8)
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        view = memoryview(buf)
        done = 0
        while done < len(buf):  # pagemap reads may come back short
            got = os.preadv(fd, [view[done:]], (start // PAGE) * 8 + done)
            if got <= 0:
                raise OSError(f"short read of /proc/{pid}/pagemap at {start + done // 8 * PAGE:#x}")
            done += got
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype="<u8")


def read_kpageflags(pfns: np.ndarray, gap: int = 64) -> np.ndarray:
    """kpageflags (uint64) for each PFN in ``pfns``; nearby PFNs are read in one pread (a THP's 512 at once)."""
    out = np.zeros(pfns.size, dtype=np.uint64)
    if pfns.size == 0:
        return out
    order = np.argsort(pfns, kind="stable")
    sorted_pfns = pfns[order].astype(np.int64)
    breaks = np.nonzero(np.diff(sorted_pfns) > gap)[0] + 1
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        for run in np.split(np.arange(sorted_pfns.size), breaks):
            lo, hi = int(sorted_pfns[run[0]]), int(sorted_pfns[run[-1]])
            flags = np.frombuffer(os.pread(fd, (hi - lo + 1) * 8, lo * 8), dtype="<u8")
            out[order[run]] = flags[sorted_pfns[run] - lo]
    finally:
        os.close(fd)
    return out


@functools.cache
def zero_pfns() -> ZeroPfns:
    """Probe the shared zero page's PFN: read-fault a private anonymous page and look it up in our pagemap."""
    small = _probe_read_fault(PAGE, hugepage=False)
    huge = -1
    try:  # the huge zero page is used for read faults in THP-enabled regions when use_zero_page is set
        pfn = _probe_read_fault(2 * THP_SIZE, hugepage=True)
        if pfn not in (small, 0) and read_kpageflags(np.array([pfn])) >> _U(KPF_ZERO_PAGE) & _U(1):
            huge = pfn
    except OSError:
        pass
    return ZeroPfns(small=small, huge=huge)


def _probe_read_fault(size: int, hugepage: bool) -> int:
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        addr = (base + THP_SIZE - 1) // THP_SIZE * THP_SIZE if hugepage else base
        if hugepage:
            m.madvise(mmap.MADV_HUGEPAGE, addr - base, THP_SIZE)
        _ = m[addr - base]  # read fault: maps the (huge) zero page
        raw = int(read_raw("self", addr, PAGE)[0])
        if not raw >> PRESENT & 1 or not raw & PFN_MASK:
            raise OSError("zero-page probe: pagemap shows no PFN (not root?)")
        return raw & PFN_MASK
    finally:
        gc.collect()  # drop the ctypes export so the mmap can close
        m.close()


def snapshot(pid: int | str, start: int, length: int, *, with_thp: bool = False) -> PageStates:
    """State of every page in [start, start+length) of ``pid``; ``with_thp`` adds kpageflags THP bits."""
    raw = read_raw(pid, start, length)
    states = decode(raw, start, zero_pfns())
    if with_thp:
        idx = np.nonzero(states.data)[0]
        thp = np.zeros(states.npages, dtype=bool)
        flags = read_kpageflags(states.pfn[idx])
        thp[idx] = (flags >> _U(KPF_THP)) & _U(1) == 1
        states.thp = thp
    return states


@functools.cache
def soft_dirty_supported() -> bool:
    """CONFIG_MEM_SOFT_DIRTY: a freshly written page of a new mapping reports bit 55 only when the kernel has it."""
    m = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m[0] = 1
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        return bool(int(read_raw("self", addr, PAGE)[0]) >> SOFT_DIRTY & 1)
    finally:
        gc.collect()
        m.close()


def save(path: str | os.PathLike[str], states: PageStates, **masks: np.ndarray) -> None:
    """One oracle snapshot as an artifact (``load`` reads it back); ``masks`` add per-page model arrays
    such as ``placed``."""
    np.savez_compressed(path, raw=states.raw, start=states.start, zero_small=states.zero_pfns.small,
                        zero_huge=states.zero_pfns.huge,
                        thp=states.thp if states.thp is not None else np.zeros(0, dtype=bool), **masks)


def load(path: str | os.PathLike[str]) -> tuple[PageStates, dict[str, np.ndarray]]:
    """An artifact written by ``save``: the page states and the extra masks."""
    z = np.load(path)
    thp = z["thp"] if "thp" in z and z["thp"].size else None
    states = decode(z["raw"], int(z["start"]), ZeroPfns(int(z["zero_small"]), int(z["zero_huge"])), thp)
    extra = {k: z[k] for k in z.files if k not in ("raw", "start", "zero_small", "zero_huge", "thp")}
    return states, extra
