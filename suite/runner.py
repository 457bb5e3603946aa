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

from . import ledger, pagemap, shrinker, thp
from .errors import StallError
from .ledger import Ledger
from .memcg import Memcg
from .options import RunOptions
from .oracle import runs
from .pagemap import PAGE, PageStates
from .qemu import runner as qemu_runner
from .scenario import OPS, Scenario, Step
from .uffd import Faults, UffdHelper
from .verdict import Verdict


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
            UffdHelper(argv_prefix=cg.wrap([]) if cg else None, timeout=opts.timeout) as helper:
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
        for first, count in runs(sel):
            f = call(first * PAGE, count * PAGE)
            if f is not None:
                missing += f.missing
                wp += f.wp
        return Faults(missing, wp)

    # --- the steps (scenario.OPS) --------------------------------------------------------------------------

    def do_map(self, step: Step, sel: np.ndarray) -> Faults:
        self.ledger.base = self.h.map(self.s.npages * PAGE)
        if step.arg == "hugepage":
            self.h.madvise("hugepage", 0, self.s.npages * PAGE)
        return _no_faults()

    def do_place(self, step: Step, sel: np.ndarray) -> Faults:
        self.nonzero |= sel
        return self.each_run(sel, self.h.place)

    def do_nohugepage(self, step: Step, sel: np.ndarray) -> Faults:
        return self.h.madvise("nohugepage", 0, self.s.npages * PAGE)

    def do_discard(self, step: Step, sel: np.ndarray) -> Faults:
        return self.each_run(sel, lambda o, n: self.h.madvise("dontneed", o, n))

    do_sabotage_punch = do_discard  # the same MADV_DONTNEED, but the model still counts the pages as placed

    def do_register(self, step: Step, sel: np.ndarray) -> Faults:
        self.h.register(step.arg)
        self.wp_registered = "wp" in step.arg
        return _no_faults()

    def do_wp(self, step: Step, sel: np.ndarray) -> Faults:
        on = step.op == "wp" and step.arg == "1"
        if on:  # like QEMU's snapshot: populate first, so every page is present to protect
            self.h.madvise("populate_read", 0, self.s.npages * PAGE)
        return self.each_run(sel, lambda o, n: self.h.wp(o, n, on))

    do_sabotage_unprotect = do_wp  # un-protects behind the model's back

    def do_clear_soft_dirty(self, step: Step, sel: np.ndarray) -> Faults:
        Path(f"/proc/{self.h.pid}/clear_refs").write_text("4")
        return _no_faults()

    def do_shrink(self, step: Step, sel: np.ndarray) -> Faults:
        thp.verify(self.s.thp)
        self.ledger.shrink(step.phase, self.trigger, self.cg, self.nonzero)
        return _no_faults()

    def do_touch(self, step: Step, sel: np.ndarray) -> Faults:
        if step.arg == "write":
            self.nonzero |= sel
        return self.each_run(sel, lambda o, n: self.h.touch(step.arg, o, n))

    def do_verify(self, step: Step, sel: np.ndarray) -> Faults:
        bad: list[int] = []

        def verify(o: int, n: int) -> Faults:
            mismatch, f = self.h.verify(o, n)
            bad.extend(mismatch)
            return f

        faults = self.each_run(sel, verify)
        self.ledger.report("content", step.phase, bad)
        return faults

    # --- judging -------------------------------------------------------------------------------------------

    def judge(self, step: Step, sel: np.ndarray, before: PageStates | None, faults: Faults) -> None:
        led, phase = self.ledger, step.phase
        if step.op == "discard":  # on purpose: these pages will be re-sent (re-supplied on MISSING faults)
            led.placed &= ~sel
        # A MISSING fault on a placed page: QEMU thinks it has the page and never asks the source again.
        led.report("missing-fault", phase, [i for i in faults.missing if led.placed[i]])
        after = led.observe(phase)

        if step.op == "wp":
            self.wp_expected = self.wp_expected | sel if step.arg == "1" else self.wp_expected & ~sel
        if step.op == "touch" and step.arg == "write":
            trapped = np.zeros_like(sel)
            trapped[faults.wp] = True
            led.report("no-wp-fault", phase, np.nonzero(sel & self.wp_expected & ~trapped)[0])
            self.wp_expected &= ~sel  # the handler un-protected what it trapped, as QEMU does

        if before is not None and OPS[step.op]:  # this step must not clear protection bits
            keep = ~sel if step.op == "discard" else np.ones_like(sel)
            led.lost_bits(phase, before, after, wp=self.wp_expected & keep, keep=keep)
