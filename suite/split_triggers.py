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
                    absent); a kernel in lockdown refuses it: the cell then says it cannot split.
- ``ksm`` / ``ksm-zero``  ``MADV_MERGEABLE`` (by the process), ksmd run on demand with ``use_zero_pages`` 0 / 1;
                    every KSM knob restored.

Migration and compaction are not triggers: on these one-node machines ``move_pages`` to the same node moves
nothing and ``compact_memory`` skips THPs (measured: 0 splits of 16 THPs). Counting: vmstat ``thp_split_page``
and the per-size ``hugepages-*kB/stats/split``; folio sizes before and after from kpageflags' compound bits.
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
from .errors import SetupError
from .ledger import Ledger
from .memcg import Memcg
from .pagemap import PAGE, PAGES_PER_THP, PageStates
from .scenario import SPLITS, Scenario
from .uffd import UffdHelper
from .verdict import Finding

SIZES_DIR = Path("/sys/kernel/mm/transparent_hugepage")
KSM = Path("/sys/kernel/mm/ksm")
KSM_SCANS = 20  # full scans (~2 ms each here): with use_zero_pages=0 the first splits fail (6 scans split 8 of 32)
KSM_TIMEOUT = 10.0
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL = 15, 16
MADV_PAGEOUT = 21
SYS_PROCESS_MADVISE = 440  # x86-64


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


def folio_pages(present_data: np.ndarray, pfn: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Per page, the number of pages of the large folio it belongs to as mapped here (0: not in a large folio).

    A folio is a compound head followed, in address order, by tails at consecutive PFNs (kpageflags bits 15/16).
    Only pages in ``present_data`` count (zero-page and absent pages are never part of a folio)."""
    head = present_data & ((flags >> np.uint64(KPF_COMPOUND_HEAD)) & np.uint64(1) == 1)
    tail = present_data & ((flags >> np.uint64(KPF_COMPOUND_TAIL)) & np.uint64(1) == 1)
    cont = np.zeros_like(tail)
    cont[1:] = tail[1:] & (pfn[1:].astype(np.int64) == pfn[:-1].astype(np.int64) + 1)
    seg = np.cumsum(~cont)  # a segment: one page that does not continue the one before, and its continuations
    valid = np.zeros(int(seg.max()) + 1 if seg.size else 1, dtype=bool)
    valid[seg[~cont]] = head[~cont]  # a segment is a folio when it starts at a head (not mapped from its middle)
    sizes = np.bincount(seg)
    out = np.where(valid[seg], sizes[seg], 0)
    return np.where(out > 1, out, 0)


def by_size(pages: np.ndarray) -> dict[str, int]:
    """Folio counts by size: ``{"2048kB": 16, "64kB": 3}`` from ``folio_pages``' per-page sizes."""
    out: dict[str, int] = {}
    for n in sorted(set(pages[pages > 0].tolist()), reverse=True):
        out[f"{n * PAGE // 1024}kB"] = int((pages == n).sum()) // n
    return out


def folios(pid: int, start: int, npages: int) -> dict[str, int]:
    """Large folios mapped in [start, start + npages pages) of ``pid``, by size."""
    states = pagemap.snapshot(pid, start, npages * PAGE)
    data = states.data
    flags = np.zeros(states.npages, dtype=np.uint64)
    idx = np.nonzero(data)[0]
    flags[idx] = pagemap.read_kpageflags(states.pfn[idx])
    return by_size(folio_pages(data, states.pfn, flags))


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
def debugfs() -> Iterator[Path]:
    """debugfs, mounted (in a private 0700 dir, unmounted after) where /sys/kernel/debug has no split file."""
    sys_dir = Path("/sys/kernel/debug")
    if (sys_dir / "split_huge_pages").exists():
        yield sys_dir
        return
    # never TemporaryDirectory: its cleanup would walk into a debugfs that is still mounted
    tmp = tempfile.mkdtemp(prefix="holecheck-debugfs-")
    try:
        subprocess.run(["mount", "-t", "debugfs", "none", tmp], check=True, capture_output=True, timeout=10)
    except BaseException:
        os.rmdir(tmp)
        raise
    try:
        yield Path(tmp)
    finally:
        done = subprocess.run(["umount", tmp], check=False, capture_output=True, timeout=10)
        if done.returncode != 0:  # the directory stays: removing it would remove what is mounted there
            raise SetupError(f"cannot unmount debugfs from {tmp}: {done.stderr.decode(errors='replace').strip()}")
        os.rmdir(tmp)


def debugfs_split(pid: int, start: int, length: int) -> str:
    try:
        with debugfs() as d:
            (d / "split_huge_pages").write_text(f"{pid},{start:#x},{start + length:#x}")
    except subprocess.CalledProcessError as exc:
        return f"cannot mount debugfs: {exc.stderr.decode(errors='replace').strip()}"
    except FileNotFoundError:
        return "this kernel has no debugfs split_huge_pages (CONFIG_DEBUG_FS or THP debug missing)"
    except OSError as exc:
        why = " (kernel lockdown restricts debugfs)" if exc.errno == errno.EPERM else ""
        return f"debugfs split_huge_pages refused: {exc.strerror}{why}"
    return ""


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


def split_region(led: Ledger, helper: UffdHelper, scenario: Scenario, phase: str, nonzero: np.ndarray,
                 shrink_trigger: str, cg: Memcg | None) -> np.ndarray:
    """One synthetic split step by ``scenario.split``: the process's own part (MADV_DONTNEED for partial-unmap,
    MADV_MERGEABLE for KSM), then ``judged_split``. Returns the pages the trigger unmapped on purpose
    (partial-unmap): no longer placed, nor protected."""
    unmapped = np.zeros(scenario.npages, dtype=bool)

    def own_part() -> None:
        nonlocal unmapped
        if scenario.split == "partial-unmap":
            unmapped = partial_mask(nonzero, scenario.thp.mthp_kb)
            for first, count in oracle.runs(unmapped):
                helper.madvise("dontneed", first * PAGE, count * PAGE)
            led.placed &= ~unmapped
        elif scenario.split.startswith("ksm"):
            helper.madvise("mergeable", 0, scenario.npages * PAGE)

    judged_split(led, helper.pid, led.base, scenario, phase, shrink_trigger, cg, own_part)
    return unmapped


def judged_split(led: Ledger, pid: int, start: int, scenario: Scenario, phase: str, shrink_trigger: str,
                 cg: Memcg | None, own_part: Callable[[], None] | None = None) -> tuple[PageStates, PageStates]:
    """Fire ``scenario.split`` on ``pid``'s [start, +npages) between two THP-aware snapshots (kept for the
    artifacts) and judge it by folio counts: a due split that split nothing is a ``no-split`` finding; a trigger
    that cannot split here says why in the verdict. Returns the snapshots before and after."""
    split, folio_kb, n = scenario.split, scenario.thp.mthp_kb, scenario.npages
    prefix = f"{led.name}-" if led.name else ""
    before_folios = folios(pid, start, n)
    before = led.around_shrinks[f"{prefix}before-{phase}"] = led.snapshot(with_thp=True)
    if own_part is not None:
        own_part()
    result = fire(split, pid, start, n * PAGE, shrink_trigger=shrink_trigger, cg=cg)
    after = led.around_shrinks[f"{prefix}after-{phase}"] = led.observe(phase, with_thp=True)
    after_folios = folios(pid, start, n)
    support = thp.ShrinkerSupport.now().no_split_reason()
    reason = result.cannot or no_split_reason(split, folio_kb, before_folios, support)
    v, who = led.verdict, f"{led.name}: " if led.name else ""
    total_before, total_after = sum(before_folios.values()), sum(after_folios.values())
    v.shrinks.append({"phase": phase, **({"side": led.name} if led.name else {}), "trigger": result.how,
                      "split": split, "seconds": result.seconds, "thp_before": total_before,
                      "thp_after": total_after, "folios_before": before_folios, "folios_after": after_folios,
                      "vmstat": result.counters, "split_expected": not reason, "no_split_reason": reason})
    if reason:
        v.no_split_reason = v.no_split_reason or f"{who}{split}: {reason}"
        return before, after
    v.split_expected = True
    if total_after >= total_before:
        counted = ", ".join(f"{k} +{c}" for k, c in result.counters.items() if k.startswith(("thp_split", "split-")))
        v.findings.append(Finding("no-split", phase, total_after, [], led.space,
                                  f"{who}{split}: large folios {before_folios} before, {after_folios} after "
                                  f"{result.how} ({counted or 'no split counted'})"))
    return before, after
