"""Every way holecheck makes the kernel split a large anonymous folio, and how it counts what was split.

A scenario's ``split`` names the trigger its ``shrink`` steps fire (``scenario.SPLITS``):

- ``shrinker``      the deferred-split shrinker on underused PMD THPs (``shrinker.fire``; PMD only).
- ``pageout``       reclaim: ``process_madvise(MADV_PAGEOUT)`` from outside the process. Without swap (the host:
                    its swap is never touched) the kernel still splits each THP before add_to_swap fails.
- ``pageout-swap`` the same with swap available: a zram device inside the L1 VM (``l1_swap``; never the host's
                    swap: on the host the cell says it cannot), swapped off again (every page back in) before the
                    pages are observed.
- ``partial-unmap`` the deferred-split queue: ``MADV_DONTNEED`` of one zero subpage of every large folio (done by
                    the process itself), then the shrinker splits the partially mapped folios.
- ``debugfs``       ``split_huge_pages`` with the exact pid and range (debugfs mounted in a private dir if
                    absent); a kernel in lockdown refuses it: the cell then says it cannot split (any other
                    failure is a ``SplitError``).
- ``ksm`` / ``ksm-zero``  ``MADV_MERGEABLE`` (by the process), ksmd run on demand with ``use_zero_pages`` 0 / 1;
                    every KSM knob restored.

Migration and compaction are not triggers: on these one-node machines ``move_pages`` to the same node moves
nothing and ``compact_memory`` skips THPs (measured: 0 splits of 16 THPs). Counting: vmstat ``thp_split_page``
and the per-size ``hugepages-*kB/stats/split``; folio sizes before and after from kpageflags' compound bits.
Judging (``judged_split``): folio by folio — each folio the trigger was due to (``due_pages``) and still whole
after it is a ``no-split`` finding; the folios a cell made must be of the size its id names (``size_check``).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import l1_swap, oracle, pagemap, shrinker, thp, waits
from .errors import HolecheckError, SetupError
from .ledger import Ledger
from .memcg import Memcg
from .pagemap import PAGE, PAGES_PER_THP, PageStates
from .scenario import SPLITS, Scenario
from .thp import ThpSettings
from .uffd import UffdHelper

SIZES_DIR = Path("/sys/kernel/mm/transparent_hugepage")
KSM = Path("/sys/kernel/mm/ksm")
LOCKDOWN = Path("/sys/kernel/security/lockdown")
KSM_SCANS = 20  # full scans (~2 ms each here): with use_zero_pages=0 the first splits fail (6 scans split 8 of 32)
KSM_TIMEOUT = 40.0  # sparse pages under TCG: ksmd memcmp()s them up to their one byte, 11-14 full scans in 10 s
FIRINGS = 4  # a due split fires at most this often while folios it was due to are left (ksm splits 8-100 % a firing)
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL = 15, 16
MADV_PAGEOUT = 21
SYS_PROCESS_MADVISE = 440  # x86-64


class SplitError(HolecheckError):
    """A split trigger failed other than by the kernel's refusal, or a cell made folios of another size."""


def parse_counters(vmstat_text: str, size_stats: dict[str, str] | None = None) -> dict[str, int]:
    """Split counters from /proc/vmstat text and per-size ``stats/split`` contents (``{"64kB": "3\\n"}``):
    ``thp_split_page``, ``thp_split_page_failed``, ``thp_deferred_split_page`` and ``split-<size>``."""
    wanted = ("thp_split_page", "thp_split_page_failed", "thp_deferred_split_page", "thp_underused_split_page",
              "thp_swpout_fallback", "thp_swpout", "pswpout", "pswpin")
    out = {}
    for line in vmstat_text.splitlines():
        key, _, value = line.partition(" ")
        if key in wanted:
            out[key] = int(value)
    for size, text in (size_stats or {}).items():
        out[f"split-{size}"] = int(text.strip())
    return out


def counters() -> dict[str, int]:
    """The split counters now (host-wide: other processes' splits count too)."""
    stats = {p.parent.parent.name.removeprefix("hugepages-"): p.read_text()
             for p in sorted(SIZES_DIR.glob("hugepages-*kB/stats/split"))}
    return parse_counters(shrinker.VMSTAT.read_text(), stats)


def _segments(present_data: np.ndarray, pfn: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per page, its segment (a page that does not continue the one before, and its continuations) and whether
    that segment is a folio mapped from its head."""
    head = present_data & ((flags >> np.uint64(KPF_COMPOUND_HEAD)) & np.uint64(1) == 1)
    tail = present_data & ((flags >> np.uint64(KPF_COMPOUND_TAIL)) & np.uint64(1) == 1)
    cont = np.zeros_like(tail)
    cont[1:] = tail[1:] & (pfn[1:].astype(np.int64) == pfn[:-1].astype(np.int64) + 1)
    seg = np.cumsum(~cont)
    valid = np.zeros(int(seg.max()) + 1 if seg.size else 1, dtype=bool)
    valid[seg[~cont]] = head[~cont]  # a segment is a folio when it starts at a head (not mapped from its middle)
    return seg, valid[seg]


def folio_pages(present_data: np.ndarray, pfn: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Per page, the number of pages of the large folio it belongs to as mapped here (0: not in a large folio).

    A folio is a compound head followed, in address order, by tails at consecutive PFNs (kpageflags bits 15/16).
    Only pages in ``present_data`` count (zero-page and absent pages are never part of a folio)."""
    seg, valid = _segments(present_data, pfn, flags)
    sizes = np.bincount(seg)
    out = np.where(valid, sizes[seg], 0)
    return np.where(out > 1, out, 0)


def by_size(pages: np.ndarray) -> dict[str, int]:
    """Folio counts by size: ``{"2048kB": 16, "64kB": 3}`` from ``folio_pages``' per-page sizes."""
    out: dict[str, int] = {}
    for n in sorted(set(pages[pages > 0].tolist()), reverse=True):
        out[f"{n * PAGE // 1024}kB"] = int((pages == n).sum()) // n
    return out


@dataclass(frozen=True)
class FolioMap:
    """The large folios mapped in a range, in address order: first page index, pages mapped, PFN of the head."""

    first: np.ndarray
    pages: np.ndarray
    pfn: np.ndarray

    @classmethod
    def of(cls, present_data: np.ndarray, pfn: np.ndarray, flags: np.ndarray) -> FolioMap:
        pages, seg = folio_pages(present_data, pfn, flags), _segments(present_data, pfn, flags)[0]
        starts = np.ones(pages.size, dtype=bool)
        starts[1:] = seg[1:] != seg[:-1]
        first = np.nonzero(starts & (pages > 0))[0]
        return cls(first, pages[first].astype(np.int64), pfn[first].astype(np.uint64))

    def __len__(self) -> int:
        return int(self.first.size)

    def select(self, keep: np.ndarray) -> FolioMap:
        return FolioMap(self.first[keep], self.pages[keep], self.pfn[keep])

    def by_size(self) -> dict[str, int]:
        sizes, counts = np.unique(self.pages, return_counts=True)
        return {f"{int(n) * PAGE // 1024}kB": int(c) for n, c in sorted(zip(sizes, counts, strict=True),
                                                                        reverse=True)}

    def holding(self, mask: np.ndarray) -> np.ndarray:
        """Per folio: does it hold a page of ``mask``?"""
        acc = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
        return acc[self.first + self.pages] > acc[self.first]

    def still_whole(self, after: FolioMap) -> np.ndarray:
        """Per folio: still a large folio ``after``, headed by the same PFN at the same address (a split leaves
        only order-0 pages; a folio reclaimed and faulted back would have another PFN)."""
        kept = set(zip(after.first.tolist(), after.pfn.tolist(), strict=True))
        return np.array([k in kept for k in zip(self.first.tolist(), self.pfn.tolist(), strict=True)], dtype=bool)


def folio_map(pid: int, start: int, npages: int) -> FolioMap:
    """Large folios mapped in [start, start + npages pages) of ``pid``."""
    states = pagemap.snapshot(pid, start, npages * PAGE)
    data = states.data
    flags = np.zeros(states.npages, dtype=np.uint64)
    idx = np.nonzero(data)[0]
    flags[idx] = pagemap.read_kpageflags(states.pfn[idx])
    return FolioMap.of(data, states.pfn, flags)


def partial_mask(nonzero: np.ndarray, folio_kb: int) -> np.ndarray:
    """The pages ``partial-unmap`` discards: the last subpage of every folio-sized block that holds data, when
    that subpage is zero-filled (it leaves the folio partially mapped, with zero subpages to remap)."""
    n = max(1, folio_kb * 1024 // PAGE) if folio_kb else PAGES_PER_THP
    blocks = nonzero[: nonzero.size // n * n].reshape(-1, n)
    mask = np.zeros_like(nonzero)
    last = np.arange(blocks.shape[0]) * n + n - 1
    pick = blocks.any(axis=1) & ~blocks[:, -1]
    mask[last[pick]] = True
    return mask


@dataclass
class SplitResult:
    split: str
    how: str  # what was done, for the verdict
    seconds: float
    counters: dict[str, int] = field(default_factory=dict)  # deltas
    cannot: str = ""  # why this kernel refused the trigger ("" if it ran)


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def fire(split: str, pid: int, start: int, length: int, *, shrink_trigger: str = "auto",
         cg: Memcg | None = None) -> SplitResult:
    """Fire ``split`` on [start, start+length) of ``pid`` (the in-process part — MADV_DONTNEED for
    partial-unmap, MADV_MERGEABLE for KSM — is the caller's, done before)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split trigger {split!r} (one of {', '.join(SPLITS)})")
    before, t0, cannot = counters(), time.monotonic(), ""
    if split in ("shrinker", "partial-unmap"):
        how = shrinker.fire(shrink_trigger, cg).trigger
    elif split == "pageout":
        how, cannot = "process_madvise(MADV_PAGEOUT)", pageout(pid, start, length)
    elif split == "pageout-swap":
        how = f"process_madvise(MADV_PAGEOUT) with {l1_swap.DEVICE} swap, then swapoff"
        try:
            with l1_swap.zram_swap():
                cannot = pageout(pid, start, length)
        except l1_swap.SwapUnavailable as exc:
            cannot = str(exc)
    elif split == "debugfs":
        how, cannot = "debugfs split_huge_pages", debugfs_split(pid, start, length)
    else:
        how, cannot = f"ksmd use_zero_pages={int(split == 'ksm-zero')}", ksm_scan(split == "ksm-zero")
    return SplitResult(split, how, round(time.monotonic() - t0, 4), _delta(before, counters()), cannot)


def pageout(pid: int, start: int, length: int) -> str:
    """Reclaim the range from outside (QEMU's RAM or the helper's region); '' or why the kernel refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        return f"pidfd_open: {exc.strerror}"
    try:
        iov = (ctypes.c_uint64 * 2)(start, length)
        if libc.syscall(SYS_PROCESS_MADVISE, pidfd, ctypes.byref(iov), 1, MADV_PAGEOUT, 0) < 0:
            return f"process_madvise(MADV_PAGEOUT): {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(pidfd)
    return ""


@contextlib.contextmanager
def mounted(fstype: str, where: Path, probe: str) -> Iterator[Path]:
    """``where`` if it has ``probe``, else ``fstype`` mounted in a private 0700 dir (unmounted after)."""
    if (where / probe).exists():
        yield where
        return
    # never TemporaryDirectory: its cleanup would walk into a debugfs that is still mounted
    tmp = tempfile.mkdtemp(prefix=f"holecheck-{fstype}-")
    try:
        subprocess.run(["mount", "-t", fstype, "none", tmp], check=True, capture_output=True, timeout=10)
    except BaseException:
        os.rmdir(tmp)
        raise
    try:
        yield Path(tmp)
    finally:
        done = subprocess.run(["umount", tmp], check=False, capture_output=True, timeout=10)
        if done.returncode != 0:  # the directory stays: removing it would remove what is mounted there
            raise SetupError(f"cannot unmount {fstype} from {tmp}: {done.stderr.decode(errors='replace').strip()}")
        os.rmdir(tmp)


def debugfs() -> contextlib.AbstractContextManager[Path]:
    """debugfs, mounted (in a private dir, unmounted after) where /sys/kernel/debug has no split file."""
    return mounted("debugfs", Path("/sys/kernel/debug"), "split_huge_pages")


def lockdown() -> str:
    """The kernel's lockdown modes as /sys/kernel/security/lockdown shows them (securityfs mounted privately
    where it is not), "" where the kernel has no lockdown LSM or securityfs cannot be mounted."""
    try:
        with mounted("securityfs", LOCKDOWN.parent, LOCKDOWN.name) as d:
            return (d / LOCKDOWN.name).read_text().strip() if (d / LOCKDOWN.name).exists() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def debugfs_split(pid: int, start: int, length: int) -> str:
    """Split every large folio of the range through debugfs; '' or why the kernel refused (lockdown only).
    Any other failure (no debugfs, a mount that fails, the write refused otherwise) is a ``SplitError``."""
    try:
        with debugfs() as d:
            (d / "split_huge_pages").write_text(f"{pid},{start:#x},{start + length:#x}")
    except subprocess.CalledProcessError as exc:
        raise SplitError(f"cannot mount debugfs for split_huge_pages: "
                         f"{exc.stderr.decode(errors='replace').strip()}") from None
    except OSError as exc:
        return debugfs_refusal(exc, lockdown())
    return ""


def debugfs_refusal(exc: OSError, lockdown: str) -> str:
    """The reason of a failed ``split_huge_pages`` write when the kernel's lockdown refused it (EPERM while
    ``lockdown`` — /sys/kernel/security/lockdown's text, "" if unreadable — selects a mode other than none);
    any other failure is an error of the run, never "cannot split"."""
    mode = lockdown[lockdown.index("[") + 1 : lockdown.index("]")] if "[" in lockdown else ""
    if exc.errno == errno.EPERM and mode not in ("", "none"):
        return f"debugfs split_huge_pages refused: {exc.strerror} (kernel lockdown {mode} restricts debugfs)"
    raise SplitError(f"debugfs split_huge_pages write failed: {exc.strerror or exc} (errno {exc.errno}; "
                     f"lockdown {mode or 'not active or unknown'}): not a refusal by lockdown") from None


def ksm_writable() -> list[str]:
    """Every knob of KSM's this kernel has (the files it lets root write), ``run`` last: restored in this order,
    ksmd starts again only once the others are as found."""
    if not KSM.is_dir():
        return []
    names = sorted(p.name for p in KSM.iterdir() if p.is_file() and p.stat().st_mode & stat.S_IWUSR)
    return [n for n in names if n != "run"] + [n for n in names if n == "run"]


def ksm_current() -> dict[str, str]:
    """KSM's knobs as now (``ksm/run`` …, every writable one), for checks that a run left them as found."""
    return {f"ksm/{k}": (KSM / k).read_text().strip() for k in ksm_writable()}


@contextlib.contextmanager
def ksm_knobs(use_zero_pages: bool) -> Iterator[None]:
    """KSM set for a quick on-demand scan; every knob restored as found, also on error."""
    saved = {k: (KSM / k).read_text().strip() for k in ksm_writable()}
    try:
        (KSM / "run").write_text("0")
        for k, v in (("use_zero_pages", str(int(use_zero_pages))), ("pages_to_scan", "100000"),
                     ("sleep_millisecs", "0"), ("smart_scan", "0")):
            if k in saved:
                (KSM / k).write_text(v)
        yield
    finally:
        (KSM / "run").write_text("0")
        for k, v in saved.items():  # only what changed (advisor_mode reads "[none] scan-time", not writable back)
            with contextlib.suppress(OSError):
                if (KSM / k).read_text().strip() != v:
                    (KSM / k).write_text(v)


def ksm_scan(use_zero_pages: bool) -> str:
    """Run ksmd for ``KSM_SCANS`` full scans (bounded), then stop it; '' or why it cannot."""
    if not (KSM / "run").exists():
        return "this kernel has no KSM (/sys/kernel/mm/ksm)"
    with ksm_knobs(use_zero_pages):
        first = int((KSM / "full_scans").read_text())
        (KSM / "run").write_text("1")
        waits.wait_for(lambda: int((KSM / "full_scans").read_text()) - first, lambda n: n >= KSM_SCANS,
                       what=f"{KSM_SCANS} full KSM scans (full_scans - start)", timeout=KSM_TIMEOUT)
    return ""


def no_split_reason(split: str, folio_kb: int, before: dict[str, int], shrinker_reason: str) -> str:
    """Why a split is not due here ('' if it is): the trigger cannot split this size, or nothing to split."""
    if not before:
        return "no large folio was mapped at the split"
    if split == "shrinker":
        if folio_kb:
            return f"the underused shrinker only splits PMD-sized THPs: cannot split {folio_kb}kB mTHPs"
        return shrinker_reason
    return ""


def due_pages(split: str, nonzero: np.ndarray, content: str, cut: np.ndarray | None = None) -> np.ndarray:
    """The pages whose folios ``split`` must split (a folio holding one of them is due):

    - partial-unmap: the pages the unmap cut (``cut``): only a partially mapped folio is queued for the split;
    - ksm / ksm-zero: pages ksmd can merge, which it splits the folio for — zero subpages (with the shared zero
      page for ksm-zero; with each other for ksm, so only if there are two) and data pages with a twin (content
      ``same``); a unique or sparse data page has no twin;
    - pageout, pageout-swap, debugfs: every page (reclaim and debugfs take every folio of the range)."""
    if split == "partial-unmap":
        if cut is None:
            raise ValueError("partial-unmap: the pages the unmap cut are needed")
        return cut.copy()
    if split.startswith("ksm"):
        zero = ~nonzero
        mergeable = zero if split == "ksm-zero" or zero.sum() > 1 else np.zeros_like(zero)
        return mergeable | (nonzero if content == "same" and nonzero.sum() > 1 else np.zeros_like(nonzero))
    return np.ones_like(nonzero)


def folio_pages_named(thp_settings: ThpSettings) -> int:
    """The pages of one folio of the size a cell's id names (PMD: 512)."""
    return thp_settings.mthp_kb * 1024 // PAGE if thp_settings.mthp_kb else PAGES_PER_THP


def size_check(made: FolioMap, thp_settings: ThpSettings, where: str) -> str:
    """The large folios a cell made are of the size its id names. A larger folio is an error of the run (the
    kernel only allocates the one enabled order or falls back to 4 KiB pages: a larger one means the knobs are
    not what the cell says, e.g. a per-size knob as found outside holecheck's control). Smaller ones (a folio
    partially mapped by the cell's own discards) and none at all of that size (the kernel fell back to 4 KiB
    pages, e.g. under memory pressure) are said in the returned note ('' if every folio is of the size)."""
    want = folio_pages_named(thp_settings)
    kb = want * PAGE // 1024
    if (made.pages > want).any():
        raise SplitError(f"{where}a {kb}kB cell mapped larger folios: {made.by_size()} (knobs {thp.current()}, "
                         f"sizes {thp.sizes_current()})")
    smaller = made.select(made.pages < want)
    if not len(made) or not len(smaller):
        return ""
    if len(smaller) == len(made):
        return f"{where}no {kb}kB folio was mapped, only smaller ones {made.by_size()}"
    return f"{where}{len(smaller)} of {len(made)} large folios mapped smaller than {kb}kB: {smaller.by_size()}"


def made_folios(led: Ledger, pid: int, start: int, scenario: Scenario, phase: str) -> FolioMap:
    """The large folios of ``pid``'s [start, +npages) before a split, checked against the cell's size
    (``size_check``: a note in the verdict, or an error of the run)."""
    made = folio_map(pid, start, scenario.npages)
    if note := size_check(made, scenario.thp, f"{phase}: {led.name + ': ' if led.name else ''}"):
        led.verdict.notes.append(note)
    return made


def split_region(led: Ledger, helper: UffdHelper, scenario: Scenario, phase: str, nonzero: np.ndarray,
                 shrink_trigger: str, cg: Memcg | None) -> np.ndarray:
    """One synthetic split step by ``scenario.split``: the process's own part (MADV_DONTNEED for partial-unmap,
    MADV_MERGEABLE for KSM), then ``judged_split``. Returns the pages the trigger unmapped on purpose
    (partial-unmap): no longer placed, nor protected."""
    unmapped = np.zeros(scenario.npages, dtype=bool)

    def own_part() -> np.ndarray | None:
        nonlocal unmapped
        if scenario.split == "partial-unmap":
            unmapped = partial_mask(nonzero, scenario.thp.mthp_kb)
            for first, count in oracle.runs(unmapped):
                helper.madvise("dontneed", first * PAGE, count * PAGE)
            led.placed &= ~unmapped
            return unmapped
        if scenario.split.startswith("ksm"):
            helper.madvise("mergeable", 0, scenario.npages * PAGE)
        return None

    judged_split(led, helper.pid, led.base, scenario, phase, nonzero, shrink_trigger, cg, own_part)
    return unmapped


def judged_split(led: Ledger, pid: int, start: int, scenario: Scenario, phase: str, nonzero: np.ndarray,
                 shrink_trigger: str, cg: Memcg | None,
                 own_part: Callable[[], np.ndarray | None] | None = None) -> tuple[PageStates, PageStates]:
    """Fire ``scenario.split`` on ``pid``'s [start, +npages) between two THP-aware snapshots (kept for the
    artifacts) and judge it folio by folio: each folio the split was due to (``due_pages``; ``own_part`` returns
    the pages it cut, for partial-unmap) and that is still whole after ``FIRINGS`` firings is a ``no-split``
    finding naming its first page, size and origin; a trigger that cannot split here says why in the verdict.
    Returns the snapshots before and after (after the last firing)."""
    split, folio_kb, n = scenario.split, scenario.thp.mthp_kb, scenario.npages
    prefix = f"{led.name}-" if led.name else ""
    v, who = led.verdict, f"{led.name}: " if led.name else ""
    made = made_folios(led, pid, start, scenario, phase)
    before = led.around_shrinks[f"{prefix}before-{phase}"] = led.snapshot(with_thp=True)
    cut = own_part() if own_part is not None else None
    result = fire(split, pid, start, n * PAGE, shrink_trigger=shrink_trigger, cg=cg)
    after = led.around_shrinks[f"{prefix}after-{phase}"] = led.observe(phase, with_thp=True)
    now = folio_map(pid, start, n)
    support = thp.ShrinkerSupport.now().no_split_reason()
    reason = result.cannot or no_split_reason(split, folio_kb, made.by_size(), support)
    due = made.select(made.holding(due_pages(split, nonzero, scenario.fill.content, cut)))
    if not reason and not len(due):
        reason = f"no large folio held a page {split} was due to split it for"
    record = {"phase": phase, **({"side": led.name} if led.name else {}), "trigger": result.how, "split": split,
              "seconds": result.seconds, "thp_before": len(made), "thp_after": len(now),
              "folios_before": made.by_size(), "folios_after": now.by_size(), "folios_due": len(due),
              "vmstat": result.counters, "split_expected": not reason, "no_split_reason": reason}
    v.shrinks.append(record)
    if reason:
        v.no_split_reason = v.no_split_reason or f"{who}{split}: {reason}"
        return before, after
    v.split_expected = True
    # fired again while due folios are left: a folio locked or under I/O at that moment is skipped, not refused,
    # and ksmd fails to split a folio while it holds a reference to its zero twin in that same folio
    skipped, firings = due.select(due.still_whole(now)), 1
    first = len(skipped)
    while len(skipped) and firings < FIRINGS:
        again = fire(split, pid, start, n * PAGE, shrink_trigger=shrink_trigger, cg=cg)
        after = led.around_shrinks[f"{prefix}after-{phase}"] = led.observe(phase, with_thp=True)
        now, firings = folio_map(pid, start, n), firings + 1
        skipped = skipped.select(skipped.still_whole(now))
        record.update(thp_after=len(now), folios_after=now.by_size(), firings=firings,
                      **{f"vmstat_firing{firings}": again.counters})
    if first > len(skipped):
        v.notes.append(f"{phase}: {who}{first - len(skipped)} of {len(due)} due folios split by {split} only on "
                       f"firing 2 to {firings}")
    name_skipped(led, phase, scenario, len(due), skipped, f"{result.how}, fired {firings} times", result.counters)
    return before, after


def name_skipped(led: Ledger, phase: str, scenario: Scenario, due: int, skipped: FolioMap, how: str,
                 counters: dict[str, int]) -> None:
    """One ``no-split`` finding per size of the folios a due split skipped, naming the first page of each, its
    size and origin (``due``: how many folios the split was due to)."""
    who = f"{led.name}: " if led.name else ""
    origin = f"origin {scenario.origin}, backing {scenario.backing}" if scenario.synthetic else "QEMU's RAM"
    counted = ", ".join(f"{k} +{c}" for k, c in counters.items() if k.startswith(("thp_split", "split-")))
    for pages in sorted(set(skipped.pages.tolist()), reverse=True):
        group = skipped.select(skipped.pages == pages)
        led.report("no-split", phase, group.first,
                   f"{who}{pages * PAGE // 1024}kB folios ({origin}) that {scenario.split} was due to split, still "
                   f"whole after {how} ({len(group)} of {due} due; first page of each folio named; "
                   f"{counted or 'no split counted'})")
