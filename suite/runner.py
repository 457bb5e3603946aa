"""Runs a synthetic scenario next to the kernel under test and judges every page: returns a ``Verdict``.

The model the runner keeps (which pages are placed — in its ``ledger.Ledger`` —, which must be write-protected)
is the expectation; the helper's fault reports and the pagemap oracle are the observation. Every step is followed
by a pagemap snapshot, so a finding names the first phase at which it showed.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import content, ledger, pagemap, shrinker, split_triggers, thp
from .errors import StallError
from .ledger import Ledger
from .memcg import Memcg
from .options import RunOptions
from .oracle import mixed_thp_anchors, runs
from .pagemap import PAGE, PAGES_PER_THP, PageStates
from .qemu import runner as qemu_runner
from .scenario import OPS, Scenario, Step
from .uffd import Faults, Mismatch, UffdHelper
from .verdict import FIRST_SHOWN, Verdict


def run(scenario: Scenario, options: RunOptions | None = None) -> Verdict:
    """Run any scenario where this process runs (the host, or the agent inside L1)."""
    opts = options or RunOptions()
    if scenario.kind == "postcopy-libvirt":  # libvirt-python only when asked for
        from .qemu import libvirt_postcopy
        return libvirt_postcopy.run(scenario, opts)
    if not scenario.synthetic:
        return qemu_runner.run(scenario, opts)
    trigger = opts.trigger or scenario.trigger
    with ledger.recorded(scenario) as verdict, shrinker.scope(trigger, "synthetic") as cg, \
            UffdHelper(argv_prefix=cg.wrap([]) if cg else None, timeout=opts.deadline()) as helper:
        SyntheticRun(scenario, helper, cg, trigger, verdict, opts.artifacts).execute()
    return verdict


def _no_faults() -> Faults:
    return Faults([], [])


class SyntheticRun:
    """Each step is a ``do_<op>(step, selected pages)`` method returning the faults it saw; ``judge`` follows."""

    def __init__(self, scenario: Scenario, helper: UffdHelper, cg: Memcg | None, trigger: str,
                 verdict: Verdict, artifacts: Path | None = None) -> None:
        self.s, self.h, self.cg, self.trigger, self.v = scenario, helper, cg, trigger, verdict
        self.artifacts = artifacts
        n = scenario.npages
        self.ledger = Ledger(verdict, self.snapshot, n)  # its placed pages: present once, not discarded on purpose
        self.wp_expected = np.zeros(n, dtype=bool)  # must be write-protected
        self.nonzero = np.zeros(n, dtype=bool)  # content the model expects to be non-zero (place, touch write)
        self.wp_registered = False
        self.unmapped = np.zeros(n, dtype=bool)  # pages the last split trigger unmapped on purpose (partial-unmap)
        self.wp_async = False  # uffd WP_ASYNC: the kernel resolves WP faults itself; PAGEMAP_SCAN reads them back
        self.written = np.zeros(n, dtype=bool)  # written since the last clear (soft-dirty / written must show it)
        data = scenario.selector("data")
        verdict.name_pages("data", np.nonzero(data)[0])  # what a known finding's signature is stated in
        verdict.name_pages("zero", np.nonzero(~data)[0])
        self.lost = np.zeros(n, dtype=bool)  # sparse data pages already named as lost-data (once each)
        # RWP (Linux 7.3): wp_expected then holds the RWP-protected pages (one uffd PTE bit, pagemap bit 57)
        self.rwp_registered = self.rwp_async = False
        self.accessed = np.zeros(n, dtype=bool)  # read or written since RWP protection (PAGEMAP_SCAN's hot set)
        self.pmd_mapped = np.zeros(n, dtype=bool)  # PMD-mapped just before an async RWP access (PAGE_IS_HUGE)

    # --- driving -------------------------------------------------------------------------------------------

    def execute(self) -> None:
        try:
            self.walk()
        finally:
            ledger.save_page_states(self.artifacts, self.s, self.v, [self.ledger], wp_expected=self.wp_expected)

    def walk(self) -> None:
        for step in self.s.steps:
            t0 = time.monotonic()
            sel = self.s.selector(step.pages)
            before = self.ledger.last
            try:
                faults = getattr(self, step.handler)(step, sel)
            except StallError as exc:
                if not self.h.stalled:  # a wait of the harness (ksmd's scans …), or a helper gone: the run's error
                    raise
                self.ledger.stall(step.phase, [], str(exc))
                return  # the helper sits in a fault: nothing further can be trusted
            self.judge(step, sel, before, faults)
            self.ledger.record(step.phase, t0)
        if self.wp_registered and not any(p.counts["uffd_wp"] for p in self.v.phases):
            self.v.notes.append("kernel reported no uffd-wp bit in pagemap: judged by WP faults alone")

    def snapshot(self, with_thp: bool = False) -> PageStates:
        assert self.h.addr is not None
        return pagemap.snapshot(self.h.pid, self.h.addr, self.s.npages * PAGE, with_thp=with_thp)

    def each_run(self, sel: np.ndarray, call: Callable[[int, int], Faults | None]) -> Faults:
        """Apply ``call(off, length)`` to every run of selected pages; merge the faults they reported."""
        missing: list[int] = []
        wp: list[int] = []
        rwp: list[int] = []
        rwp_repeat: list[int] = []
        for first, count in runs(sel):
            f = call(first * PAGE, count * PAGE)
            if f is not None:
                missing += f.missing
                wp += f.wp
                rwp += f.rwp
                rwp_repeat += f.rwp_repeat
        return Faults(missing, wp, rwp, rwp_repeat)

    # --- the steps (scenario.OPS) --------------------------------------------------------------------------

    def do_map(self, step: Step, sel: np.ndarray) -> Faults:
        self.ledger.base = (self.h.map_memfd if self.s.backing == "memfd" else self.h.map)(self.s.npages * PAGE)
        self.ledger.verdict.region = self.ledger.base
        if self.s.backing == "memfd":  # a zapped shared PTE is no loss: the page cache keeps the page
            self.ledger.judged = False
            self.v.notes.append("memfd: pte_none is not a hole (the page stays in the page cache); data loss is "
                                "judged by MISSING faults on placed pages and by content")
        if self.s.fill.content != "unique":
            self.h.content(self.s.fill.content)
        if step.arg == "hugepage":
            self.h.madvise("hugepage", 0, self.s.npages * PAGE)
        return _no_faults()

    def do_place(self, step: Step, sel: np.ndarray) -> Faults:
        self.nonzero |= sel
        self.written |= sel
        return self.each_run(sel, self.h.place)

    def do_nohugepage(self, step: Step, sel: np.ndarray) -> Faults:
        return self.h.madvise("nohugepage", 0, self.s.npages * PAGE)

    def do_discard(self, step: Step, sel: np.ndarray) -> Faults:
        # memfd: punch the page cache, like QEMU; arg "zap": only the PTEs (MINOR mode maps the cache back)
        advice = "remove" if self.s.backing == "memfd" and step.arg != "zap" else "dontneed"
        return self.each_run(sel, lambda o, n: self.h.madvise(advice, o, n))

    do_sabotage_punch = do_discard  # the same MADV_DONTNEED, but the model still counts the pages as placed

    def do_register(self, step: Step, sel: np.ndarray) -> Faults:
        modes = [m for m in step.arg.split(",") if m in ("missing", "wp", "minor", "rwp")]
        prefix = "rwp" if "rwp" in modes else "wp"  # "async": UFFD_FEATURE_RWP_ASYNC under RWP, else WP_ASYNC
        features = [f"{prefix}-{f}" for f in step.arg.split(",") if f in ("async", "unpopulated")]
        if self.s.backing == "memfd" and "wp" in modes:
            features.append("wp-shmem")  # uffd-wp on shmem: kept in PTE markers across zaps
        if "minor" in modes:
            features.append("minor-shmem")
        if features:
            self.h.features(",".join(features))
        self.h.register(",".join(modes))
        self.wp_registered, self.wp_async = "wp" in modes, "wp-async" in features
        self.rwp_registered, self.rwp_async = "rwp" in modes, "rwp-async" in features
        return _no_faults()

    def do_wp(self, step: Step, sel: np.ndarray) -> Faults:
        on = step.op == "wp" and step.arg.split(",")[0] == "1"
        if on and "unpopulated" not in step.arg:  # like QEMU's snapshot: populate first, so every page is present
            self.h.madvise("populate_read", 0, self.s.npages * PAGE)
        return self.each_run(sel, lambda o, n: self.h.wp(o, n, on))

    do_sabotage_unprotect = do_wp  # un-protects behind the model's back

    def do_clear_soft_dirty(self, step: Step, sel: np.ndarray) -> Faults:
        Path(f"/proc/{self.h.pid}/clear_refs").write_text("4")
        self.written[:] = False
        return _no_faults()

    def do_shrink(self, step: Step, sel: np.ndarray) -> Faults:
        thp.verify(self.s.thp)
        if self.s.split == "shrinker" and not self.s.thp.mthp_kb:
            why_not = "shmem THPs: the underused shrinker splits anonymous THPs only" \
                if self.s.backing == "memfd" else ""
            split_triggers.made_folios(self.ledger, self.h.pid, self.ledger.base, self.s, step.phase)
            self.ledger.shrink(step.phase, self.trigger, self.cg, self.nonzero, why_not=why_not,
                               origin=f"origin {self.s.origin}, backing {self.s.backing}")
        else:  # another trigger, or folios other than PMD THPs: split_triggers fires and judges it
            self.unmapped = split_triggers.split_region(self.ledger, self.h, self.s, step.phase, self.nonzero,
                                                        self.trigger, self.cg)
            self.wp_expected &= ~self.unmapped
            self.accessed &= ~self.unmapped  # a hole is neither hot nor cold (RWP: no longer in the working set)
        return _no_faults()

    def do_touch(self, step: Step, sel: np.ndarray) -> Faults:
        self.note_pmd_mapped()
        if step.arg in ("write", "zero"):
            self.nonzero = self.nonzero | sel if step.arg == "write" else self.nonzero & ~sel
            self.written |= sel
        if step.arg == "zero":
            return self.each_run(sel, self.h.zero)
        faults = self.each_run(sel, lambda o, n: self.h.touch(step.arg, o, n))
        if step.arg == "read" and any(st.op == "register" and "minor" in st.arg for st in self.s.steps):
            self.v.notes.append(f"{step.phase}: {self.h.minor_faults()} MINOR faults resolved with UFFDIO_CONTINUE")
        return faults

    def do_verify(self, step: Step, sel: np.ndarray) -> Faults:
        self.note_pmd_mapped()
        bad: list[Mismatch] = []

        def verify(o: int, n: int) -> Faults:
            mismatch, f = self.h.check(o, n)
            bad.extend(mismatch)
            return f

        faults = self.each_run(sel, verify)
        # sparse data pages that read all zero: the zero detector took them for zero-filled subpages
        zeroed = [m for m in bad if m.zeroed and self.s.fill.content == "sparse" and self.nonzero[m.index]]
        self.report_lost(step.phase, [m.index for m in zeroed if not self.lost[m.index]], "read all zero")
        lost = {m.index for m in zeroed}
        wrong = [m for m in bad if m.index not in lost]
        self.ledger.report("content", step.phase, [m.index for m in wrong], first_bytes(wrong))
        return faults

    def report_lost(self, phase: str, indices: list[int], how: str) -> None:
        """``lost-data``: sparse data pages that read zero, once each, with the byte the model has there."""
        self.lost[indices] = True
        spots = [f"{i}+{content.sparse_spot(i)[0]:#x}" for i in indices[:FIRST_SHOWN]]
        self.ledger.report("lost-data", phase, indices, f"{how}; first differing byte (page index+offset): "
                           + ", ".join(spots) + (", …" if len(indices) > FIRST_SHOWN else ""))

    # --- the memory axes' steps (issue 11; builders in ``memory_axes``) -----------------------------------------

    # --- RWP's steps (issue 21; builder ``memory_axes.rwp_style``) ----------------------------------------------

    def do_rwp(self, step: Step, sel: np.ndarray) -> Faults:
        on = step.arg == "1"
        if on:  # RWP protects present PTEs only: populate first, so every page is protected
            self.h.madvise("populate_read", 0, self.s.npages * PAGE)
        return self.each_run(sel, lambda o, n: self.h.rwp(o, n, on))

    do_sabotage_unrwp = do_rwp  # un-protects behind the model's back

    def do_set_mode(self, step: Step, sel: np.ndarray) -> Faults:
        faults = self.h.set_mode(step.arg)
        self.rwp_async = step.arg == "async"
        return faults

    def dump_accessed(self, step: Step) -> Faults:
        """PAGEMAP_SCAN's hot set (PAGE_IS_ACCESSED) and cold set (inverted, resident pages) against the model: a
        page accessed since protection must read hot, a protected page not accessed since must read cold."""
        n = self.s.npages
        hot_idx, faults = self.h.scan_accessed(0, n * PAGE, cold=False)
        cold_idx, more = self.h.scan_accessed(0, n * PAGE, cold=True)
        hot, cold = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        hot[hot_idx], cold[cold_idx] = True, True
        counts = (f"{int(self.accessed.sum())} pages accessed since protection; the scan: {int(hot.sum())} hot, "
                  f"{int(cold.sum())} cold")
        led = self.ledger
        led.report("accessed-cold", step.phase, np.nonzero(self.accessed & (cold | ~hot))[0], counts)
        led.report("untouched-hot", step.phase, np.nonzero(self.wp_expected & (hot | ~cold))[0], counts)
        return Faults(faults.missing + more.missing, faults.wp + more.wp, faults.rwp + more.rwp,
                      faults.rwp_repeat + more.rwp_repeat)

    def note_pmd_mapped(self) -> None:
        """Before an access in async RWP mode: which pages a PMD maps. The kernel resolves an access to a PMD-mapped
        THP for the whole PMD (do_huge_pmd_uffd_rwp: one uffd bit for 512 pages), to a PTE for that page only."""
        self.pmd_mapped[:] = False
        if self.rwp_registered and self.rwp_async:
            self.pmd_mapped[self.h.scan_huge(0, self.s.npages * PAGE)] = True

    def judge_rwp(self, step: Step, sel: np.ndarray, faults: Faults) -> None:
        """An access step under RWP: in sync mode exactly the protected pages it touched raised one RWP fault each
        (and no other page any); in async mode none did. Either way the touched pages are unprotected now, in async
        mode with every page of a PMD-mapped THP it touched."""
        if self.rwp_async and (self.pmd_mapped & sel).any():
            chunks = (self.pmd_mapped & sel)[: len(sel) // PAGES_PER_THP * PAGES_PER_THP]
            whole = np.repeat(chunks.reshape(-1, PAGES_PER_THP).any(axis=1), PAGES_PER_THP)
            whole = np.resize(whole, len(sel)) & self.pmd_mapped
            self.v.notes.append(f"{step.phase}: async RWP resolved {int(whole.sum()) // PAGES_PER_THP} PMD-mapped "
                                f"THPs whole ({int((whole & ~sel).sum())} pages accessed with them)")
            sel = sel | whole
        trapped, repeat = np.zeros_like(sel), np.zeros_like(sel)
        trapped[faults.rwp], repeat[faults.rwp_repeat] = True, True
        due = np.zeros_like(sel) if self.rwp_async else sel & self.wp_expected
        self.ledger.report("no-rwp-fault", step.phase, np.nonzero(due & ~trapped)[0],
                           f"{int(due.sum())} protected pages accessed in sync mode, {int(trapped.sum())} faulted")
        self.ledger.report("extra-rwp-fault", step.phase, np.nonzero((trapped & ~due) | repeat)[0],
                           f"{int((trapped & ~due).sum())} faults on pages not due one, {int(repeat.sum())} pages "
                           f"faulted more than once" + (" (async mode delivers none)" if self.rwp_async else ""))
        self.wp_expected &= ~sel
        self.accessed |= sel

    def do_collapse(self, step: Step, sel: np.ndarray) -> Faults:
        return self.each_run(sel, self.h.collapse)

    def do_clear_written(self, step: Step, sel: np.ndarray) -> Faults:
        _, faults = self.h.scan(0, self.s.npages * PAGE, clear=True)
        self.written[:] = False
        self.wp_expected = np.ones_like(self.wp_expected)
        return faults

    def do_dump(self, step: Step, sel: np.ndarray) -> Faults:
        """What an incremental dump saves: pages reading soft-dirty (pagemap) or PAGE_IS_WRITTEN (PAGEMAP_SCAN).
        A page written since the clear that it would skip is a finding: the dump restores its stale content."""
        if step.arg == "accessed":
            return self.dump_accessed(step)
        if step.arg == "soft-dirty":
            reported, faults = self.snapshot().soft_dirty, _no_faults()
        else:
            indices, faults = self.h.scan(0, self.s.npages * PAGE, clear=False)
            reported = np.zeros_like(sel)
            reported[indices] = True
        self.ledger.report("stale-dump", step.phase, np.nonzero(self.written & sel & ~reported)[0],
                           f"{int(self.written.sum())} pages written since the clear, {int(reported.sum())} "
                           f"read {step.arg}")
        return faults

    def do_sabotage_clean(self, step: Step, sel: np.ndarray) -> Faults:
        """Negative control: the selected written pages read clean, the model still counts them written."""
        if step.arg == "written":  # WP_ASYNC: re-protecting a page makes it read not-written
            return self.each_run(sel & self.written, lambda o, n: self.h.wp(o, n, True))
        # soft-dirty: clear all, re-dirty the rest. A PMD-mapped THP has one soft-dirty bit for its 512 pages (on
        # a kernel that split nothing, e.g. 6.1), so first PTE-map each THP that holds both kinds: MADV_DONTNEED
        # of one page to be re-dirtied splits the PMD mapping, the rewrite brings that page back
        for i in mixed_thp_anchors(sel):
            self.h.madvise("dontneed", i * PAGE, PAGE)
        Path(f"/proc/{self.h.pid}/clear_refs").write_text("4")
        return self.each_run(~sel, self.h.rewrite)

    def do_sabotage_zero(self, step: Step, sel: np.ndarray) -> Faults:
        """Negative control: data pages zeroed behind the model's back (it still expects their byte)."""
        return self.each_run(sel, self.h.scrub)

    def do_sabotage_fill(self, step: Step, sel: np.ndarray) -> Faults:
        """Negative control: data into zero subpages behind the model's back (it still expects them zero)."""
        return self.each_run(sel, self.h.place)

    # --- judging -------------------------------------------------------------------------------------------

    def judge(self, step: Step, sel: np.ndarray, before: PageStates | None, faults: Faults) -> None:
        led, phase = self.ledger, step.phase
        if step.op == "discard":  # on purpose: these pages will be re-sent (re-supplied on MISSING faults)
            led.placed &= ~sel
        # A MISSING fault on a placed page: QEMU thinks it has the page and never asks the source again.
        led.report("missing-fault", phase, [i for i in faults.missing if led.placed[i]])
        after = led.observe(phase)
        if self.s.fill.content == "sparse":  # a data page mapping the zero page: its byte is gone
            self.report_lost(phase, np.nonzero(after.zero & self.nonzero & ~self.lost)[0].tolist(), "map the zero page")

        if step.op == "wp":
            self.wp_expected = self.wp_expected | sel if step.arg == "1" else self.wp_expected & ~sel
        if step.op == "rwp" and step.arg == "1":
            self.wp_expected |= sel
            self.accessed &= ~sel
            led.report("lost-uffd-wp", phase, np.nonzero(sel & after.present & ~after.uffd_wp)[0],
                       "protected by UFFDIO_RWPROTECT, yet pagemap bit 57 (the uffd PTE bit) is clear")
        if self.rwp_registered and step.op in ("touch", "verify"):
            self.judge_rwp(step, sel, faults)
        elif step.op == "touch" and step.arg in ("write", "zero"):
            trapped = np.zeros_like(sel)
            trapped[faults.wp] = True
            if not self.wp_async:  # WP_ASYNC: no fault messages; the dump (PAGEMAP_SCAN) judges instead
                led.report("no-wp-fault", phase, np.nonzero(sel & self.wp_expected & ~trapped)[0])
            self.wp_expected &= ~sel  # the handler un-protected what it trapped, as QEMU does

        if before is not None and OPS[step.op]:  # this step must not clear protection bits
            keep = ~sel if step.op == "discard" else ~self.unmapped if step.op == "shrink" else np.ones_like(sel)
            led.lost_bits(phase, before, after, wp=self.wp_expected & keep, keep=keep)


def first_bytes(bad: list[Mismatch]) -> str:
    """The first differing byte of the first few bad pages, for a finding's detail."""
    if not bad:
        return ""
    shown = ", ".join(f"{m.index}+{m.first:#x}" for m in bad[:FIRST_SHOWN])
    return f"first differing byte (page index+offset): {shown}" + (", …" if len(bad) > FIRST_SHOWN else "")
